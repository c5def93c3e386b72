//! Loading a tree's metadata across shards: each part of the tree is loaded by the shard
//! that keeps it (see [`RoutingTable::load_targets`]), through that shard's leader, with
//! progress summed over the parts.

use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_common::{FsError, FsResult};
use granary_protos::v1::namespace_client::NamespaceClient;
use granary_protos::v1::{LoadMetadataReply, LoadMetadataRequest};
use granary_protos::LEADER_METADATA_KEY;

use crate::RoutingTable;

/// Hints to the leader followed per shard.
const LEADER_HINTS: usize = 5;

/// Loads the tree at `path` (just that directory unless `recursive`; listing again what
/// is loaded if `force`), calling `progress` with running totals; returns the totals.
pub async fn load_tree(
    table: &RoutingTable,
    path: &[u8],
    recursive: bool,
    force: bool,
    token: &AttachToken,
    mut progress: impl FnMut(&LoadMetadataReply),
) -> FsResult<LoadMetadataReply> {
    let mut total = LoadMetadataReply::default();
    for (shard, part) in table.load_targets(path) {
        let masters = table.masters(shard).unwrap_or_default();
        let done = load_part(shard, masters, &part, recursive, force, token, |p| {
            progress(&LoadMetadataReply {
                directories: total.directories + p.directories,
                files: total.files + p.files,
                done: false,
            })
        })
        .await?;
        total.directories += done.directories;
        total.files += done.files;
    }
    total.done = true;
    progress(&total);
    Ok(total)
}

async fn load_part(
    shard: u16,
    masters: &[String],
    path: &[u8],
    recursive: bool,
    force: bool,
    token: &AttachToken,
    mut progress: impl FnMut(&LoadMetadataReply),
) -> FsResult<LoadMetadataReply> {
    let shown = String::from_utf8_lossy(path);
    let mut last = FsError::Unavailable(format!("shard {shard} lists no masters"));
    let mut targets: Vec<String> = masters.to_vec();
    let mut hints = 0;
    while let Some(addr) = targets.first().cloned() {
        targets.remove(0);
        let channel = granary_common::net::lazy_channel(
            &addr,
            Duration::from_secs(2),
            Duration::from_secs(3600),
        )
        .map_err(|e| FsError::InvalidArgument(format!("master `{addr}`: {e}")))?;
        let mut client = NamespaceClient::with_interceptor(channel, token.clone());
        let req = LoadMetadataRequest {
            path: path.to_vec(),
            recursive,
            force,
        };
        let mut stream = match client.load_metadata(req).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                let hint = status
                    .metadata()
                    .get(LEADER_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                last = FsError::from(status);
                if let Some(leader) = hint.filter(|_| hints < LEADER_HINTS) {
                    hints += 1;
                    targets.insert(0, leader);
                }
                continue;
            }
        };
        while let Some(msg) = stream.message().await.map_err(FsError::from)? {
            if msg.done {
                return Ok(msg);
            }
            progress(&msg);
        }
        return Err(FsError::Unavailable(format!(
            "shard {shard} ended the load of {shown} before it finished"
        )));
    }
    Err(FsError::io(format!(
        "shard {shard}: loading {shown}: {last}"
    )))
}
