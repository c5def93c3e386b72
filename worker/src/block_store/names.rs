//! On-disk names of the cache (all fields hex). A block cached on its own is one file,
//! `blocks/<shard>/<file id>.<index>.<fp size>.<fp mtime>.<len>.<crc>`: its name carries
//! the UFS version it was read at, its length and its CRC32C, so it is committed by one
//! rename. The blocks of a file that share a data file live at their offsets in
//! `files/<shard>/<file id>.<fp size>.<fp mtime>.<incarnation>`, each committed by an
//! empty marker beside it, `<data file name>.<index>.<offset>.<len>.<crc>`. The
//! incarnation is new each time the file's data file is made, so a name once handed out
//! never stands for a later data file that lacks some of its blocks.

use super::{BlockId, Fingerprint};

/// Shard directories under `blocks/` and `files/`: bounded, created once, so caching a
/// block never makes a directory.
pub(super) const SHARDS: u64 = 256;

pub(super) fn shard_name(file_id: u64) -> String {
    format!("{:02x}", file_id % SHARDS)
}

pub(super) fn block_name((file_id, index): BlockId, fp: Fingerprint, len: u64, crc: u32) -> String {
    format!(
        "{file_id:016x}.{index:x}.{:x}.{:x}.{len:x}.{crc:08x}",
        fp.size, fp.mtime_ns as u64
    )
}

pub(super) fn data_name(file_id: u64, fp: Fingerprint, incarnation: u64) -> String {
    format!(
        "{file_id:016x}.{:x}.{:x}.{incarnation:016x}",
        fp.size, fp.mtime_ns as u64
    )
}

pub(super) fn marker_name(
    (file_id, index): BlockId,
    fp: Fingerprint,
    incarnation: u64,
    offset: u64,
    len: u64,
    crc: u32,
) -> String {
    format!(
        "{}.{index:x}.{offset:x}.{len:x}.{crc:08x}",
        data_name(file_id, fp, incarnation)
    )
}

fn hex_fields<const N: usize>(name: &str) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut parts = name.split('.');
    for field in &mut out {
        *field = u64::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A block file's block and metadata.
pub(super) fn parse_block_name(name: &str) -> Option<(BlockId, Fingerprint, u64, u32)> {
    let [file_id, index, size, mtime, len, crc] = hex_fields(name)?;
    let fp = Fingerprint {
        size,
        mtime_ns: mtime as i64,
    };
    Some((
        (file_id, u32::try_from(index).ok()?),
        fp,
        len,
        u32::try_from(crc).ok()?,
    ))
}

/// What a name under `files/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FilesName {
    Data(u64, Fingerprint, u64),
    Marker {
        id: BlockId,
        fp: Fingerprint,
        incarnation: u64,
        offset: u64,
        len: u64,
        crc: u32,
    },
}

pub(super) fn parse_files_name(name: &str) -> Option<FilesName> {
    let fp = |size, mtime: u64| Fingerprint {
        size,
        mtime_ns: mtime as i64,
    };
    if let Some([file_id, size, mtime, incarnation]) = hex_fields(name) {
        return Some(FilesName::Data(file_id, fp(size, mtime), incarnation));
    }
    let [file_id, size, mtime, incarnation, index, offset, len, crc] = hex_fields(name)?;
    Some(FilesName::Marker {
        id: (file_id, u32::try_from(index).ok()?),
        fp: fp(size, mtime),
        incarnation,
        offset,
        len,
        crc: u32::try_from(crc).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        let fp = Fingerprint {
            size: 3 << 20,
            mtime_ns: 1_700_000_000_123_456_789,
        };
        let name = block_name((42, 3), fp, 1000, 0xdead_beef);
        assert_eq!(
            parse_block_name(&name),
            Some(((42, 3), fp, 1000, 0xdead_beef))
        );
        assert_eq!(
            parse_files_name(&data_name(42, fp, u64::MAX)),
            Some(FilesName::Data(42, fp, u64::MAX))
        );
        let marker = marker_name((42, 2), fp, 9, 2 << 20, 1 << 20, 7);
        assert_eq!(
            parse_files_name(&marker),
            Some(FilesName::Marker {
                id: (42, 2),
                fp,
                incarnation: 9,
                offset: 2 << 20,
                len: 1 << 20,
                crc: 7
            })
        );
        assert_eq!(parse_block_name("0a.1.2"), None);
        assert_eq!(parse_files_name("0a.1.2"), None);
        assert_eq!(parse_files_name("zz.1.2"), None);
    }
}
