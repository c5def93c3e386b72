//! `granary bench read --ufs s3`: a dataset in an S3-compatible server (moto, started
//! here) read through `granary local --ufs s3://…`: the first epoch cold (S3 → worker →
//! mount) and the second warm (worker cache), side by side with a plain S3 client
//! (boto3) reading the same objects from the same server in the same run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use granary::dataset;
use granary::local::{self, LocalArgs};
use granary_common::bytesize::ByteSize;
use granary_common::ufs::S3Options;
use granary_integration_tests::s3::{S3Server, ACCESS_KEY, SECRET_KEY};

use super::read::{drop_page_cache, list_files, sequential, small_files, ReadBench, BIG};
use super::report::{machine, median, render_against, write_section, Row};

const BUCKET: &str = "bench";
const PREFIX: &str = "ds";

/// (files, bytes, seconds) of the plain client reading every object under `prefix`.
fn plain_client(s3: &S3Server, prefix: &str, threads: usize) -> anyhow::Result<(f64, f64, f64)> {
    let out = s3.tool(&["read-all", BUCKET, prefix, &threads.to_string()])?;
    let v: Vec<f64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("s3tool read-all printed `{out}`"))?;
    anyhow::ensure!(v.len() == 3, "s3tool read-all printed `{out}`");
    Ok((v[0], v[1], v[2]))
}

pub fn run(b: ReadBench) -> anyhow::Result<()> {
    // Beside the local bench's dataset, which stays.
    let dir = b.dir.join("s3");
    // A previous run killed midway may have left its mount behind.
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(dir.join("mnt"))
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("dataset");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(src.join("small"))?;
    std::fs::create_dir_all(&mnt)?;
    eprintln!("generating the dataset ...");
    dataset::write_file(&src.join(BIG), b.big_size, 1)?;
    dataset::write_small_files(&src.join("small"), b.small_files, b.small_size)?;
    let mut small: Vec<PathBuf> = Vec::new();
    list_files(&src, &src.join("small"), &mut small)?;

    eprintln!("starting an S3 server (moto) and uploading ...");
    let s3 = S3Server::start()?;
    s3.make_bucket(BUCKET)?;
    s3.put_tree(&src, BUCKET, PREFIX)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let capacity = (b.big_size + b.small_files * (b.small_size + 4096)) * 2;
    let state = dir.join("state");
    let args = LocalArgs {
        ufs: format!("s3://{BUCKET}/{PREFIX}"),
        mountpoint: mnt.clone(),
        state_dir: state.clone(),
        cache_dir: state.join("cache"),
        master_listen: "127.0.0.1:0".parse()?,
        capacity: ByteSize(capacity),
        metrics_listen: None,
        shards: 1,
        s3: S3Options {
            endpoint: Some(s3.endpoint.clone()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            // moto copies the whole object for every ranged GET (41 ms for 1 MiB of a
            // 64 MiB object, 327 ms of a 512 MiB one), so it serves a block fastest
            // with one GET; a real store serves parallel parts faster than one stream.
            read_part_size: ByteSize(64 << 20),
            ..Default::default()
        },
        mount: Default::default(),
        master: Default::default(),
    };
    let cluster = rt.block_on(local::start(&args))?;
    let result = measure(&b, &s3, &mnt, &small);
    let reported = result.and_then(|rows| report(&b, &rows));
    rt.block_on(cluster.stop())?;
    reported
}

fn measure(
    b: &ReadBench,
    s3: &S3Server,
    mnt: &Path,
    small: &[PathBuf],
) -> anyhow::Result<Vec<Row>> {
    let is_root = unsafe { libc::geteuid() } == 0;
    let drop_cache = || -> anyhow::Result<()> {
        if is_root {
            drop_page_cache()?;
        }
        Ok(())
    };
    let big_mb = b.big_size as f64 / 1e6;
    let mut rows = Vec::new();

    // The plain client first: its reads warm nothing Granary uses.
    let mut plain_big = Vec::new();
    let mut plain_small = Vec::new();
    for _ in 0..b.runs {
        let (_, bytes, secs) = plain_client(s3, &format!("{PREFIX}/{BIG}"), 1)?;
        plain_big.push(bytes / 1e6 / secs);
        let (files, _, secs) = plain_client(s3, &format!("{PREFIX}/small/"), b.small_threads)?;
        plain_small.push(files / secs);
    }

    // First epoch: nothing cached (metadata is listed from S3 on the way).
    drop_cache()?;
    let start = Instant::now();
    sequential(&mnt.join(BIG), 1)?;
    let cold_big = big_mb / start.elapsed().as_secs_f64();
    let (cold_small, _) = small_files(mnt, small, b.small_threads)?;

    // Second epoch: the worker cache holds everything.
    let (mut warm_big, mut warm_small) = (Vec::new(), Vec::new());
    for _ in 0..b.runs {
        drop_cache()?;
        warm_big.push(sequential(&mnt.join(BIG), 1)?);
        drop_cache()?;
        warm_small.push(small_files(mnt, small, b.small_threads)?.0);
    }
    let page = if is_root {
        "page cache dropped"
    } else {
        "page cache as is (not root)"
    };
    let plain_big = median(plain_big);
    let plain_small = median(plain_small);
    rows.push(Row {
        case: "big file, 1 reader, first epoch (S3 → worker → mount)".to_string(),
        unit: "MB/s",
        raw: plain_big,
        others: Vec::new(),
        granary: cold_big,
    });
    rows.push(Row {
        case: format!("big file, 1 reader, second epoch (worker cache, {page})"),
        unit: "MB/s",
        raw: plain_big,
        others: Vec::new(),
        granary: median(warm_big),
    });
    let threads = b.small_threads;
    rows.push(Row {
        case: format!(
            "{} small files, {threads} threads, first epoch",
            small.len()
        ),
        unit: "files/s",
        raw: plain_small,
        others: Vec::new(),
        granary: cold_small,
    });
    rows.push(Row {
        case: format!(
            "{} small files, {threads} threads, second epoch ({page})",
            small.len()
        ),
        unit: "files/s",
        raw: plain_small,
        others: Vec::new(),
        granary: median(warm_small),
    });
    Ok(rows)
}

fn report(b: &ReadBench, rows: &[Row]) -> anyhow::Result<()> {
    let table = render_against(rows, "plain S3 client", &[]);
    println!("\n{table}");
    if let Some(path) = &b.write_docs {
        let body = format!(
            "Machine: {}. S3: moto (in-memory, on this machine). Dataset: one {} object; {} objects of {}. The plain S3 client is boto3 (`integration-tests/s3/s3tool.py read-all`) reading the same objects, with as many threads as Granary's readers; the first epoch is one run, the rest are medians of {}.\n\nCommand: `granary bench read --ufs s3 --big-size {} --small-files {} --small-size {} --small-threads {} --runs {}`\n\n{table}",
            machine(),
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            b.runs,
            ByteSize(b.big_size),
            b.small_files,
            ByteSize(b.small_size),
            b.small_threads,
            b.runs
        );
        write_section(path, "bench-read-s3", &body)?;
    }
    Ok(())
}
