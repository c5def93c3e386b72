//! Synthetic datasets for the demo and the benchmarks: deterministic pseudo-random bytes,
//! generated fast enough that a 2 GiB file takes seconds.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// xorshift64* stream; `seed` picks the content.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545f4914f6cdd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

pub fn write_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    let mut n = 0u64;
    while left > 0 {
        let take = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..take], seed ^ n);
        w.write_all(&buf[..take])?;
        left -= take as u64;
        n += 1;
    }
    w.flush()
}

pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// `count` files of `size` bytes under `dir`, 1000 per subdirectory.
pub fn write_small_files(dir: &Path, count: u64, size: u64) -> std::io::Result<()> {
    let pb = progress(count, "small files");
    for i in 0..count {
        let sub = dir.join(format!("part-{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        write_file(&sub.join(format!("sample-{i:07}.bin")), size, i)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(())
}

/// The `granary local --demo` dataset: a small image-classification-like tree.
pub fn write_demo(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for split in ["train", "val"] {
        for class in ["cat", "dog", "bird"] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d)?;
            let n = if split == "train" { 200 } else { 40 };
            for i in 0..n {
                write_file(
                    &d.join(format!("{class}-{i:04}.jpg")),
                    16 * 1024 + i * 37,
                    i ^ 0xfeed,
                )?;
            }
        }
    }
    write_file(&dir.join("shard-00000.tar"), 96 << 20, 7)?;
    std::fs::write(
        dir.join("README.txt"),
        "Granary demo dataset: train/ and val/ hold small sample files, shard-00000.tar is one 96 MiB shard.\n",
    )?;
    Ok(())
}
