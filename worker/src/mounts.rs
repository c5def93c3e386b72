//! The UFS mounts this worker may read from, as each shard's masters' mount table says
//! (shards may mount different under-storages under the same mount id). A read request
//! names a file (whose id carries its shard), a mount id and a path inside it, never a
//! raw URI, so a client cannot make a worker read outside the mounted under-storage.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use granary_common::ufs::{open_ufs, S3Options, Ufs};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{MountPoint, MountTable};

#[derive(Debug, Default)]
pub struct MountRegistry {
    /// This worker's own S3 settings: they win over those a mount carries.
    s3: S3Options,
    /// By (shard, mount id).
    mounts: RwLock<HashMap<(u16, u32), OpenMount>>,
}

/// A UFS and the mount it was opened from.
type OpenMount = (Arc<dyn Ufs>, MountPoint);

impl MountRegistry {
    pub fn new(s3: S3Options) -> Self {
        MountRegistry {
            s3,
            mounts: Default::default(),
        }
    }

    /// Adopts mounts from a master's table: opens new ones and reopens one whose URI or
    /// options changed. Mounts are never dropped here: a master that has not caught up yet (a new
    /// member) answers with an empty or older table, and dropping on its word would fail
    /// reads that every other master can serve.
    pub fn update(&self, shard: u16, table: &MountTable) {
        let mut mounts = self.mounts.write().expect("mounts lock");
        for m in &table.mounts {
            if mounts
                .get(&(shard, m.mount_id))
                .is_some_and(|(_, known)| known == m)
            {
                continue;
            }
            match open_ufs(&m.ufs_uri, &self.s3.with_shared(&m.ufs_options)) {
                Ok(ufs) => {
                    tracing::info!(shard, mount = m.mount_id, uri = %m.ufs_uri, "UFS mount available");
                    mounts.insert((shard, m.mount_id), (ufs, m.clone()));
                }
                Err(e) => {
                    tracing::error!(shard, mount = m.mount_id, uri = %m.ufs_uri, error = %e, "cannot open UFS mount")
                }
            }
        }
    }

    /// Serves shard `shard`'s `mount_id` from an already opened UFS.
    pub fn insert(&self, shard: u16, mount_id: u32, ufs: Arc<dyn Ufs>) {
        let mount = MountPoint {
            mount_id,
            path: b"/".to_vec(),
            ufs_uri: ufs.uri().to_string(),
            ufs_options: ufs.shared_options(),
        };
        self.mounts
            .write()
            .expect("mounts lock")
            .insert((shard, mount_id), (ufs, mount));
    }

    /// Whether shard `shard` has a mount here.
    pub fn knows_shard(&self, shard: u16) -> bool {
        self.mounts
            .read()
            .expect("mounts lock")
            .keys()
            .any(|&(s, _)| s == shard)
    }

    pub fn get(&self, shard: u16, mount_id: u32) -> FsResult<Arc<dyn Ufs>> {
        self.mounts
            .read()
            .expect("mounts lock")
            .get(&(shard, mount_id))
            .map(|(ufs, _)| ufs.clone())
            .ok_or_else(|| {
                FsError::Unavailable(format!(
                    "UFS mount {mount_id} of shard {shard} is not known to this worker (yet)"
                ))
            })
    }
}
