//! Mapping of file byte ranges onto fixed-size blocks. A file no larger than the block
//! size is exactly one block (and an empty file has none).

pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024 * 1024;

pub fn block_count(file_size: u64, block_size: u64) -> u64 {
    file_size.div_ceil(block_size)
}

/// Length of block `index` of a file of `file_size` bytes (0 past the end).
pub fn block_len(file_size: u64, block_size: u64, index: u64) -> u64 {
    let start = index.saturating_mul(block_size);
    file_size.saturating_sub(start).min(block_size)
}

/// One piece of a read that falls inside a single block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    pub index: u64,
    /// Offset inside the block.
    pub offset: u64,
    pub len: u64,
}

/// Splits the read `[offset, offset+len)` (clipped to the file) into per-block spans.
pub fn spans(file_size: u64, block_size: u64, offset: u64, len: u64) -> Vec<BlockSpan> {
    let end = offset.saturating_add(len).min(file_size);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let index = pos / block_size;
        let in_block = pos % block_size;
        let take = (block_size - in_block).min(end - pos);
        out.push(BlockSpan {
            index,
            offset: in_block,
            len: take,
        });
        pos += take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 1024;

    #[test]
    fn counts_and_lengths_at_the_edges() {
        for (size, count) in [(0, 0), (1, 1), (B - 1, 1), (B, 1), (B + 1, 2), (3 * B, 3)] {
            assert_eq!(block_count(size, B), count, "size {size}");
            let total: u64 = (0..count).map(|i| block_len(size, B, i)).sum();
            assert_eq!(total, size);
        }
        assert_eq!(block_len(B + 1, B, 1), 1);
        assert_eq!(block_len(B + 1, B, 2), 0);
    }

    #[test]
    fn spans_cover_the_read_exactly() {
        let size = 3 * B + 17;
        for offset in [0, 1, B - 1, B, 2 * B + 5, size - 1, size, size + 10] {
            for len in [0, 1, B - 1, B, B + 1, 4 * B] {
                let s = spans(size, B, offset, len);
                let want = offset.saturating_add(len).min(size).saturating_sub(offset);
                assert_eq!(s.iter().map(|x| x.len).sum::<u64>(), want);
                let mut pos = offset;
                for x in &s {
                    assert_eq!(x.index * B + x.offset, pos);
                    assert!(x.offset + x.len <= B);
                    pos += x.len;
                }
            }
        }
    }
}
