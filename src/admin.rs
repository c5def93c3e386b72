//! `granary admin …`: cluster state for operators.

use anyhow::Context;
use granary_common::bytesize::ByteSize;
use granary_protos::v1::master_client::MasterClient;
use granary_protos::v1::ReportRequest;

pub async fn report(master: &str) -> anyhow::Result<()> {
    let mut client = MasterClient::connect(format!("http://{master}"))
        .await
        .with_context(|| format!("cannot reach master {master}"))?;
    let r = client.report(ReportRequest {}).await?.into_inner();
    println!(
        "shard {}  applied index {}  inodes {}  cached blocks {}",
        r.shard_id, r.applied_index, r.inodes, r.cached_blocks
    );
    for m in r.mounts.map(|m| m.mounts).unwrap_or_default() {
        println!(
            "mount {} {} -> {}",
            m.mount_id,
            String::from_utf8_lossy(&m.path),
            m.ufs_uri
        );
    }
    println!(
        "{:<38} {:<24} {:>10} {:>10} {:>8} {:>8}",
        "WORKER", "ADDRESS", "CAPACITY", "USED", "BLOCKS", "LAST HB"
    );
    for w in r.workers {
        println!(
            "{:<38} {:<24} {:>10} {:>10} {:>8} {:>6}ms",
            w.worker_id,
            format!("{}:{}", w.host, w.data_port),
            ByteSize(w.capacity_bytes).to_string(),
            ByteSize(w.used_bytes).to_string(),
            w.blocks,
            w.last_heartbeat_ms_ago
        );
    }
    Ok(())
}
