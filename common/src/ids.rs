//! Inode ids are 64-bit and global: the high 16 bits name the metadata shard, so a FUSE
//! inode number routes to its shard without a lookup table.

pub const SHARD_BITS: u32 = 16;
const LOCAL_BITS: u32 = 64 - SHARD_BITS;
const LOCAL_MASK: u64 = (1u64 << LOCAL_BITS) - 1;

/// Local id of every shard's root directory.
pub const ROOT_LOCAL_ID: u64 = 1;

pub fn inode_id(shard: u16, local: u64) -> u64 {
    debug_assert!(local <= LOCAL_MASK, "local inode id overflow");
    ((shard as u64) << LOCAL_BITS) | (local & LOCAL_MASK)
}

pub fn shard_of(id: u64) -> u16 {
    (id >> LOCAL_BITS) as u16
}

pub fn local_of(id: u64) -> u64 {
    id & LOCAL_MASK
}

pub fn root_inode(shard: u16) -> u64 {
    inode_id(shard, ROOT_LOCAL_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_bits_round_trip() {
        let id = inode_id(0xbeef, 12345);
        assert_eq!(shard_of(id), 0xbeef);
        assert_eq!(local_of(id), 12345);
        assert_eq!(root_inode(0), 1, "shard 0's root is the FUSE root inode");
    }
}
