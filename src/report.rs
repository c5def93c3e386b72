//! `granary admin report [--json]`: every shard's members (role, commit, applied and how
//! far each lags), leader and term, mounts, workers (capacity, use, blocks, heartbeat age,
//! cache hit ratio) and the cluster's hit ratio. Members that do not answer are reported
//! as such; the report itself fails only when the routing table cannot be had.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use granary_common::bytesize::ByteSize;
use granary_protos::v1::{QuorumInfoReply, QuorumInfoRequest, ReportReply, ReportRequest};
use serde::Serialize;

use crate::admin::client;

/// One call to one master.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct Report {
    pub routing_version: u64,
    pub shards: Vec<ShardReport>,
    /// Over every worker (each counted once, though it serves every shard).
    pub cache: CacheReport,
}

#[derive(Debug, Default, Serialize)]
pub struct ShardReport {
    pub id: u32,
    pub leader: Option<u64>,
    pub term: u64,
    /// The leader's commit index.
    pub commit: u64,
    pub inodes: u64,
    pub cached_blocks: u64,
    pub members: Vec<MemberReport>,
    pub mounts: Vec<MountReport>,
    pub workers: Vec<WorkerReport>,
    /// Why the shard could not be described (no member answered).
    pub error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct MemberReport {
    pub id: u64,
    pub addr: String,
    /// `leader`, `follower`, `learner`, …, or `unreachable`.
    pub role: String,
    pub commit: Option<u64>,
    pub applied: Option<u64>,
    /// Entries the leader committed that this member has not applied yet.
    pub apply_lag: Option<u64>,
    /// Entries the leader committed that this member has not stored yet (the leader's
    /// view of its replication).
    pub replication_lag: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MountReport {
    pub id: u32,
    pub path: String,
    pub ufs: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub id: String,
    pub address: String,
    pub hostname: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
    pub last_heartbeat_ms: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct CacheReport {
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: Option<f64>,
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let all = hits + misses;
    (all > 0).then(|| hits as f64 / all as f64)
}

async fn quorum(addr: &str, token: &str) -> anyhow::Result<QuorumInfoReply> {
    let mut c = client(addr, token)?;
    let call = c.quorum_info(QuorumInfoRequest {});
    Ok(tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .context("no answer")??
        .into_inner())
}

async fn shard_state(addr: &str, token: &str) -> anyhow::Result<ReportReply> {
    let mut c = client(addr, token)?;
    let call = c.report(ReportRequest {});
    Ok(tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .context("no answer")??
        .into_inner())
}

/// Describes one shard from whichever of `masters` answer.
async fn shard(id: u32, masters: &[String], token: &str) -> ShardReport {
    let mut out = ShardReport {
        id,
        ..Default::default()
    };
    // Every member's own view: the member list comes from the first that answers.
    let mut views: BTreeMap<String, anyhow::Result<QuorumInfoReply>> = BTreeMap::new();
    for addr in masters {
        views.insert(addr.clone(), quorum(addr, token).await);
    }
    let Some(first) = views.values().find_map(|v| v.as_ref().ok()).cloned() else {
        out.error = Some(format!("no master answered ({})", masters.join(", ")));
        return out;
    };
    for p in &first.peers {
        if !views.contains_key(&p.addr) {
            views.insert(p.addr.clone(), quorum(&p.addr, token).await);
        }
    }
    let leader_id = first.leader_id;
    let leader_addr = first
        .peers
        .iter()
        .find(|p| p.id == leader_id)
        .map(|p| p.addr.clone());
    let leader_view = leader_addr
        .as_ref()
        .and_then(|a| views.get(a))
        .and_then(|v| v.as_ref().ok())
        .cloned();
    out.leader = (leader_id != 0).then_some(leader_id);
    out.term = leader_view.as_ref().map_or(first.term, |l| l.term);
    out.commit = leader_view.as_ref().map_or(first.commit, |l| l.commit);
    for p in &first.peers {
        let mut m = MemberReport {
            id: p.id,
            addr: p.addr.clone(),
            ..Default::default()
        };
        match views.get(&p.addr) {
            Some(Ok(v)) => {
                m.role = v.role.clone();
                m.commit = Some(v.commit);
                m.applied = Some(v.applied);
                m.apply_lag = Some(out.commit.saturating_sub(v.applied));
            }
            Some(Err(e)) => {
                m.role = "unreachable".into();
                m.error = Some(format!("{e:#}"));
            }
            None => m.role = "unknown".into(),
        }
        if let Some(l) = &leader_view {
            // A member that has not answered this leader yet (down, or it just took
            // over) has no progress known to it: its lag is unknown, not the whole log.
            if let Some(progress) = l
                .peers
                .iter()
                .find(|q| q.id == p.id && q.progress_known && q.answered)
            {
                m.replication_lag = Some(l.commit.saturating_sub(progress.matched));
            }
        }
        out.members.push(m);
    }
    // The leader's state; any member's will do when the leader is away.
    let mut order: Vec<String> = leader_addr.into_iter().collect();
    order.extend(views.keys().cloned());
    for addr in order {
        let Ok(r) = shard_state(&addr, token).await else {
            continue;
        };
        out.inodes = r.inodes;
        out.cached_blocks = r.cached_blocks;
        out.mounts = r
            .mounts
            .map(|m| m.mounts)
            .unwrap_or_default()
            .into_iter()
            .map(|m| MountReport {
                id: m.mount_id,
                path: String::from_utf8_lossy(&m.path).into_owned(),
                ufs: m.ufs_uri,
            })
            .collect();
        out.workers = r
            .workers
            .into_iter()
            .map(|w| WorkerReport {
                address: format!("{}:{}", w.host, w.data_port),
                hit_ratio: ratio(w.cache_hits, w.cache_misses),
                id: w.worker_id,
                hostname: w.hostname,
                capacity_bytes: w.capacity_bytes,
                used_bytes: w.used_bytes,
                blocks: w.blocks,
                last_heartbeat_ms: w.last_heartbeat_ms_ago,
                cache_hits: w.cache_hits,
                cache_misses: w.cache_misses,
            })
            .collect();
        break;
    }
    out
}

/// The whole cluster, as the routing table at `master` lists it.
pub async fn collect(master: &str, token: &str) -> anyhow::Result<Report> {
    let table = crate::shards_cmd::table(master, token).await?;
    let mut shards = Vec::new();
    for s in &table.shards {
        shards.push(shard(s.id, &s.masters, token).await);
    }
    let mut workers: BTreeMap<&str, &WorkerReport> = BTreeMap::new();
    for w in shards.iter().flat_map(|s| &s.workers) {
        // The freshest report of each worker (its counters only grow).
        let newer = workers
            .get(w.id.as_str())
            .is_none_or(|old| old.cache_hits + old.cache_misses < w.cache_hits + w.cache_misses);
        if newer {
            workers.insert(&w.id, w);
        }
    }
    let hits = workers.values().map(|w| w.cache_hits).sum();
    let misses = workers.values().map(|w| w.cache_misses).sum();
    Ok(Report {
        routing_version: table.version,
        cache: CacheReport {
            hits,
            misses,
            hit_ratio: ratio(hits, misses),
        },
        shards,
    })
}

fn percent(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

fn or_dash(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn print(r: &Report) {
    println!(
        "routing table version {}: {} shard(s); cache hit ratio {} ({} hits, {} misses)",
        r.routing_version,
        r.shards.len(),
        percent(r.cache.hit_ratio),
        r.cache.hits,
        r.cache.misses
    );
    for s in &r.shards {
        println!();
        if let Some(e) = &s.error {
            println!("shard {}: {e}", s.id);
            continue;
        }
        println!(
            "shard {}  leader {}  term {}  commit {}  inodes {}  cached blocks {}",
            s.id,
            or_dash(s.leader),
            s.term,
            s.commit,
            s.inodes,
            s.cached_blocks
        );
        println!(
            "  {:<4} {:<24} {:<12} {:>10} {:>10} {:>9} {:>9}",
            "ID", "MEMBER", "ROLE", "COMMIT", "APPLIED", "APPLY LAG", "REPL LAG"
        );
        for m in &s.members {
            println!(
                "  {:<4} {:<24} {:<12} {:>10} {:>10} {:>9} {:>9}",
                m.id,
                m.addr,
                m.role,
                or_dash(m.commit),
                or_dash(m.applied),
                or_dash(m.apply_lag),
                or_dash(m.replication_lag)
            );
        }
        for m in &s.mounts {
            println!("  mount {} {} -> {}", m.id, m.path, m.ufs);
        }
        println!(
            "  {:<38} {:<22} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "WORKER", "ADDRESS", "CAPACITY", "USED", "BLOCKS", "LAST HB", "HIT"
        );
        for w in &s.workers {
            println!(
                "  {:<38} {:<22} {:>10} {:>10} {:>8} {:>6}ms {:>8}",
                w.id,
                w.address,
                ByteSize(w.capacity_bytes).to_string(),
                ByteSize(w.used_bytes).to_string(),
                w.blocks,
                w.last_heartbeat_ms,
                percent(w.hit_ratio)
            );
        }
    }
}
