//! Metadata clients: [`MetadataService`] is what a filesystem (or a proxy) needs of the
//! namespace; [`GrpcMetadataClient`] serves it from one shard's masters.

mod shard_client;

use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    BlockLocationsReply, CommitContent, CreateRequest, Inode, LinkRequest, RenameRequest,
    SetAttributes, StatFsReply, WorkerInfo,
};

pub use shard_client::{ClientOptions, GrpcMetadataClient};

/// A routing table's version and its pinned prefixes with the shard of each.
pub type Pins = (u64, Vec<(Vec<u8>, u16)>);

/// Metadata operations the filesystem needs. The mutations have read-only defaults so a
/// read-only service (a test double) need not spell them out.
pub trait MetadataService: Send + Sync {
    fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode>;
    fn getattr(&self, id: u64) -> FsResult<Inode>;
    /// [`Self::getattr`] as of now, whatever reads the client is set up for (a writer's
    /// commit must not store under a path a stale member still has).
    fn getattr_latest(&self, id: u64) -> FsResult<Inode> {
        self.getattr(id)
    }
    /// One page of a directory, after `start_after`; the flag says whether more remain.
    fn readdir(&self, id: u64, start_after: &[u8], limit: u32) -> FsResult<(Vec<Inode>, bool)>;
    fn workers(&self) -> FsResult<Vec<WorkerInfo>>;
    /// The workers that serve shard `shard` (a separate cluster's may serve only some).
    fn workers_of(&self, shard: u16) -> FsResult<Vec<WorkerInfo>> {
        let _ = shard;
        self.workers()
    }
    fn block_locations(&self, file_id: u64) -> FsResult<BlockLocationsReply>;
    fn statfs(&self) -> FsResult<StatFsReply>;

    /// Creates a file, directory or symlink (`req.symlink_target`).
    fn create(&self, req: CreateRequest) -> FsResult<Inode> {
        Err(read_only(&req.name))
    }
    fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        let _ = (parent, directory);
        Err(read_only(name))
    }
    fn rename(&self, req: RenameRequest) -> FsResult<Inode> {
        Err(read_only(&req.name))
    }
    /// A new name for file `req.id` (link(2)); answers the inode under that name.
    fn link(&self, req: LinkRequest) -> FsResult<Inode> {
        Err(read_only(&req.new_name))
    }
    fn set_attr(&self, attrs: SetAttributes) -> FsResult<Inode> {
        let _ = attrs;
        Err(read_only(b""))
    }
    /// The inode at a namespace path (where a referral points).
    fn resolve_path(&self, path: &[u8]) -> FsResult<Inode> {
        Err(FsError::Unsupported(format!(
            "{}: this metadata service cannot resolve paths",
            String::from_utf8_lossy(path)
        )))
    }

    /// Lists a directory again from the UFS (a file in it changed behind Granary's back).
    fn refresh(&self, dir: u64) -> FsResult<()> {
        Err(FsError::Unsupported(format!(
            "directory {dir:#x}: this metadata service cannot refresh"
        )))
    }

    /// The routing table's version and its pinned prefixes with their shards (none for
    /// an unsharded service): a mount drops what it caches of a prefix that moves.
    fn pins(&self) -> Pins {
        (0, Vec::new())
    }

    /// The shard that owns namespace path `path` (absolute, not `/`) by the routing
    /// table in use now; `None` for an unsharded service.
    fn owner(&self, path: &[u8]) -> Option<u16> {
        let _ = path;
        None
    }

    /// Makes inode `id`'s UFS object durable as it is now (fsync(2) of a file or a
    /// directory); a read-only service has nothing to make durable.
    fn sync(&self, id: u64) -> FsResult<()> {
        let _ = id;
        Ok(())
    }

    /// Records that a file's content reached the UFS.
    fn commit(&self, content: CommitContent) -> FsResult<Inode> {
        let _ = content;
        Err(read_only(b""))
    }
}

fn read_only(name: &[u8]) -> FsError {
    FsError::ReadOnly(format!(
        "{}: this metadata service is read-only",
        String::from_utf8_lossy(name)
    ))
}
