//! `granary fs …`: look at and load the namespace from the command line.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use granary_common::path::components;
use granary_fuse_client::cli::ClusterArgs;
use granary_fuse_client::fs::GranaryFs;
use granary_fuse_client::MountConfig;
use granary_meta_client::MetadataService;
use granary_protos::v1::{FileKind, Inode};

pub struct FsClient {
    pub fs: GranaryFs,
    pub meta: Arc<dyn MetadataService>,
}

pub fn connect(cluster: &ClusterArgs) -> anyhow::Result<FsClient> {
    let mut cfg = MountConfig {
        masters: vec![cluster.master().to_string()],
        retry_deadline_ms: 5_000,
        meta_cache_ttl_ms: 60_000,
        meta_cache_entries: 100_000,
        read_only: true,
        ..Default::default()
    };
    cluster.apply_to(&mut cfg);
    let meta: Arc<dyn MetadataService> = granary_fuse_client::connect_metadata(&cfg)?;
    let fs = granary_fuse_client::build_fs_over(&cfg, meta.clone())?;
    Ok(FsClient { fs, meta })
}

impl FsClient {
    pub fn resolve(&self, path: &str) -> anyhow::Result<Inode> {
        let mut node = self.fs.getattr(granary_common::ids::root_inode(0))?;
        for part in components(path.as_bytes())? {
            node = self.fs.lookup(node.id, part).with_context(|| {
                format!("{path}: cannot resolve `{}`", String::from_utf8_lossy(part))
            })?;
        }
        Ok(node)
    }
}

fn kind_char(i: &Inode) -> char {
    match FileKind::try_from(i.kind) {
        Ok(FileKind::Directory) => 'd',
        Ok(FileKind::Symlink) => 'l',
        Ok(FileKind::Fifo) => 'p',
        Ok(FileKind::Socket) => 's',
        Ok(FileKind::CharDevice) => 'c',
        Ok(FileKind::BlockDevice) => 'b',
        _ => '-',
    }
}

fn line(i: &Inode) -> String {
    let name = String::from_utf8_lossy(&i.name);
    let target = if i.kind == FileKind::Symlink as i32 {
        format!(" -> {}", String::from_utf8_lossy(&i.symlink_target))
    } else {
        String::new()
    };
    format!(
        "{}{:o} {:>14} {name}{target}",
        kind_char(i),
        i.mode & 0o7777,
        i.size
    )
}

pub fn ls(t: &ClusterArgs, path: &str) -> anyhow::Result<()> {
    let c = connect(t)?;
    let node = c.resolve(path)?;
    if node.kind != FileKind::Directory as i32 {
        println!("{}", line(&node));
        return Ok(());
    }
    let (fh, _) = c.fs.opendir(node.id)?;
    let mut offset = 2;
    loop {
        let page = c.fs.readdir(fh, offset, 4096)?;
        let Some(last) = page.last() else { break };
        offset = last.offset;
        for e in &page {
            println!("{}", line(&e.inode));
        }
    }
    c.fs.releasedir(fh);
    Ok(())
}

pub fn stat(t: &ClusterArgs, path: &str) -> anyhow::Result<()> {
    let c = connect(t)?;
    let i = c.resolve(path)?;
    let fp = i.fingerprint.unwrap_or_default();
    println!("path:        {path}");
    println!(
        "inode:       {:#x} (shard {})",
        i.id,
        granary_common::ids::shard_of(i.id)
    );
    println!("type:        {}", kind_char(&i));
    println!("size:        {}", i.size);
    println!("mode:        {:o}", i.mode & 0o7777);
    let links = match i.kind == FileKind::Directory as i32 {
        true => 2 + i.subdirs,
        false => 1 + i.links.len() as u64,
    };
    println!("links:       {links}");
    if matches!(
        FileKind::try_from(i.kind),
        Ok(FileKind::CharDevice | FileKind::BlockDevice)
    ) {
        println!(
            "device:      {}:{}",
            libc::major(i.rdev as libc::dev_t),
            libc::minor(i.rdev as libc::dev_t)
        );
    }
    println!("mtime_ns:    {}", i.mtime_ns);
    println!(
        "ufs path:    mount {} / {}",
        i.mount_id,
        String::from_utf8_lossy(&i.ufs_path)
    );
    if i.kind == FileKind::File as i32 {
        let blocks = granary_common::blocks::block_count(i.size, i.block_size.max(1));
        println!("fingerprint: size {} mtime_ns {}", fp.size, fp.mtime_ns);
        println!("block size:  {} ({blocks} blocks)", i.block_size);
        let locs = c.meta.block_locations(i.id)?;
        let cached = locs.blocks.len();
        let bytes: u64 = locs
            .blocks
            .iter()
            .map(|b| granary_common::blocks::block_len(i.size, i.block_size, b.index as u64))
            .sum();
        println!(
            "cached:      {cached} of {blocks} blocks, {}",
            fraction(bytes, i.size)
        );
        for b in locs.blocks {
            println!("  block {:>5}: {}", b.index, b.worker_ids.join(", "));
        }
    }
    if i.kind == FileKind::Directory as i32 {
        let (cached, total) = crate::warmup_cmd::cached(t, path)?;
        println!("cached:      {} (whole tree)", fraction(cached, total));
    }
    if i.kind == FileKind::Symlink as i32 {
        println!(
            "target:      {}",
            String::from_utf8_lossy(&i.symlink_target)
        );
    }
    Ok(())
}

/// `cached` of `total` bytes, with the percentage.
fn fraction(cached: u64, total: u64) -> String {
    let pct = match total {
        0 => 100.0,
        t => cached as f64 * 100.0 / t as f64,
    };
    format!(
        "{} of {} ({pct:.1}%)",
        indicatif::HumanBytes(cached),
        indicatif::HumanBytes(total)
    )
}

pub fn cat(t: &ClusterArgs, path: &str) -> anyhow::Result<()> {
    let c = connect(t)?;
    let i = c.resolve(path)?;
    let (fh, _) = c.fs.open(i.id, libc::O_RDONLY)?;
    let mut out = std::io::stdout().lock();
    let mut offset = 0u64;
    while offset < i.size {
        let chunk = c.fs.read(fh, offset, 1 << 20)?;
        if chunk.is_empty() {
            bail!(
                "{path}: read returned no data at offset {offset} of {}",
                i.size
            );
        }
        out.write_all(&chunk)?;
        offset += chunk.len() as u64;
    }
    c.fs.release(fh);
    Ok(())
}

pub async fn load_metadata(
    master: &str,
    token: &str,
    path: &str,
    recursive: bool,
    force: bool,
) -> anyhow::Result<()> {
    // Each part of the tree is loaded by the shard that keeps it.
    let table =
        granary_shard_router::RoutingTable::new(crate::shards_cmd::table(master, token).await?)?;
    let token = granary_common::auth::AttachToken::new(token).map_err(anyhow::Error::msg)?;
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(Duration::from_millis(120));
    let path_bytes = match path.trim_end_matches('/') {
        "" => b"/".to_vec(),
        p => p.as_bytes().to_vec(),
    };
    let done =
        granary_shard_router::load_tree(&table, &path_bytes, recursive, force, &token, |p| {
            pb.set_message(format!("{} directories, {} files", p.directories, p.files));
        })
        .await;
    pb.finish_and_clear();
    let done = done.with_context(|| format!("loading {path}"))?;
    println!(
        "loaded {path}: {} directories, {} files",
        done.directories, done.files
    );
    Ok(())
}
