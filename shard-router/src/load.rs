//! Loading a tree's metadata across shards: each part of the tree is loaded by the shard
//! that keeps it (see [`RoutingTable::load_targets`]), through that shard's leader, with
//! progress summed over the parts.

use std::time::Duration;

use granary_common::auth::AttachToken;
use granary_common::{FsError, FsResult};
use granary_protos::v1::namespace_client::NamespaceClient;
use granary_protos::v1::{LoadMetadataReply, LoadMetadataRequest};

use crate::leader::{channel_to, on_leader};
use crate::RoutingTable;

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
    let req = LoadMetadataRequest {
        path: path.to_vec(),
        recursive,
        force,
    };
    let started = on_leader(masters.to_vec(), |addr| {
        let client = channel_to(&addr, Duration::from_secs(3600))
            .map(|c| NamespaceClient::with_interceptor(c, token.clone()));
        let req = req.clone();
        async move { client?.load_metadata(req).await }
    })
    .await;
    let mut stream = match started {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return Err(FsError::io(format!(
                "shard {shard}: loading {shown}: {}",
                FsError::from(status)
            )))
        }
    };
    while let Some(msg) = stream.message().await.map_err(FsError::from)? {
        if msg.done {
            return Ok(msg);
        }
        progress(&msg);
    }
    Err(FsError::Unavailable(format!(
        "shard {shard} ended the load of {shown} before it finished"
    )))
}
