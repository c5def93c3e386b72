//! Namespace changes made through Granary: create (file, directory, symlink), remove,
//! rename, attribute changes and content commits. The leader checks each against its
//! state (a dry run of the state machine, so the rules live in one place), makes the UFS
//! change, then proposes the command: apply stays free of I/O, and a crash between the two
//! leaves the UFS ahead of the namespace, which the next listing of that directory
//! reconciles. Mutations of the same directories take turns on the leader
//! ([`crate::mutation_locks`]) so that check, UFS change and proposal see one state.

use std::sync::Arc;

use granary_common::blocks::block_count;
use granary_common::path::{join, validate_name};
use granary_common::time::now_ns;
use granary_common::ufs::{ObjectKind, Ufs, UfsObject};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    command, Command, CommitContent, CreateInode, CreateRequest, FileKind, Inode, LinkEntry,
    LinkRequest, RemoveEntry, RemoveRequest, RenameEntry, RenameRequest, SetAttributes,
    UfsFingerprint,
};

use crate::command_log::CommandLog;
use crate::links::is_primary;
use crate::mutation_locks::Turn;
use crate::service::MasterService;
use crate::state_machine::is_special;

fn fingerprint(o: &UfsObject) -> UfsFingerprint {
    UfsFingerprint {
        size: o.size,
        mtime_ns: o.mtime_ns,
    }
}

/// Runs blocking work off the async runtime, or right here for a caller in this process
/// whose thread may block (see [`granary_common::in_process::may_block`]).
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    if granary_common::in_process::may_block() {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::io_from(format!("{what} task: {e}"), e))?
}

/// How long a namespace change waits on the UFS before the master says so.
const SLOW_UFS: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs blocking UFS work off the async runtime. A slow or failing UFS is logged here:
/// clients only see their call time out or fail.
async fn ufs_call<T: Send + 'static>(
    ufs: Arc<dyn Ufs>,
    f: impl FnOnce(&dyn Ufs) -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    let uri = ufs.uri().to_string();
    let call = blocking("UFS", move || f(ufs.as_ref()));
    tokio::pin!(call);
    // The call first: run inline for an in-process caller, it is done at once and no
    // timer is set.
    let slow = tokio::select! {
        biased;
        r = &mut call => Err(r),
        _ = tokio::time::sleep(SLOW_UFS) => Ok(()),
    };
    let r = match slow {
        Err(r) => r,
        Ok(()) => {
            tracing::warn!(ufs = %uri, "a namespace change has waited {SLOW_UFS:?} on the UFS (clients give up after their retry_deadline_ms)");
            call.await
        }
    };
    if let Err(e) = &r {
        if crate::unsettled::uncertain(e) {
            tracing::warn!(ufs = %uri, error = %e, "a namespace change failed in the UFS");
        }
    }
    r
}

/// What happens to an inode's UFS object when one of its names goes.
enum Object {
    /// Nothing: a special file, a hard link, or a directory entry of another name.
    None,
    /// Its last name goes: the object goes too.
    Goes(Vec<u8>),
    /// Its primary name goes and others remain: the object moves under the next one.
    Moves {
        from: Vec<u8>,
        to: Vec<u8>,
        /// The directory `to` is in.
        to_dir: u64,
        /// The object's version, as the namespace has it.
        version: Option<UfsFingerprint>,
    },
}

/// Moves a file's object from `from` to `to` if the object there is still its own
/// (`version`): after a commit whose outcome was unknown, a retry finds it moved already,
/// and whatever took its place stays. Returns whether it moved.
async fn move_object(
    ufs: Arc<dyn Ufs>,
    from: Vec<u8>,
    to: Vec<u8>,
    version: Option<UfsFingerprint>,
) -> FsResult<bool> {
    ufs_call(ufs, move |u| {
        match u.stat(&from) {
            Ok(o) if Some(fingerprint(&o)) == version => {}
            // Never uploaded, moved already, or another object now.
            Ok(_) | Err(FsError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        u.rename(&from, &to).map(|()| true)
    })
    .await
}

/// Whether `o` is the object the namespace knows for `inode`.
fn is_object_of(o: &UfsObject, inode: &Inode) -> bool {
    match FileKind::try_from(inode.kind) {
        Ok(FileKind::File) => {
            o.kind == ObjectKind::File && inode.fingerprint == Some(fingerprint(o))
        }
        Ok(FileKind::Symlink) => {
            o.kind == ObjectKind::Symlink && o.symlink_target == inode.symlink_target
        }
        Ok(FileKind::Directory) => o.kind == ObjectKind::Directory,
        _ => false,
    }
}

/// Moves a renamed entry's object from `from` to `to`; `moving` is `None` when it has no
/// object of its own (a hard link's other name, a special file). `replaced`: the entry
/// whose object is at `to` and goes, even if nothing takes its place, or a later listing
/// would bring it back under this name.
fn place(
    u: &dyn Ufs,
    moving: Option<&Inode>,
    from: &[u8],
    to: &[u8],
    replaced: Option<&Inode>,
) -> FsResult<()> {
    let moved = match moving {
        Some(_) => u.rename(from, to),
        None => Err(FsError::NotFound(String::new())),
    };
    match moved {
        Ok(()) => Ok(()),
        Err(FsError::NotFound(_)) => {
            let Some(replaced) = replaced else {
                return Ok(());
            };
            let o = match u.stat(to) {
                Ok(o) => o,
                Err(FsError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            // An entry with an object of its own whose object is gone from `from`: a
            // retry of a rename whose first try moved it here but lost its answer (a
            // failover). What is at `to` is the moving entry's own (on S3 a copy, with a
            // new mtime), never to be removed.
            let moved_already =
                moving.is_some_and(|m| m.fingerprint.is_some() || m.kind != FileKind::File as i32);
            if moved_already || !is_object_of(&o, replaced) {
                return Ok(());
            }
            let dir = replaced.kind == FileKind::Directory as i32;
            u.remove(to, dir).or_else(never_uploaded)
        }
        Err(e) => Err(e),
    }
}

/// A hard-linked file: changing one of its names may move its UFS object under another,
/// in another directory.
fn spans_directories(inode: &Inode) -> bool {
    !inode.links.is_empty()
}

/// What a mutation's turn holds, judged from the entries it changes.
#[derive(PartialEq)]
enum Scope {
    Dirs(Vec<u64>),
    Alone,
}

/// A UFS change on an object never uploaded (or already gone) has nothing to do.
fn never_uploaded(e: FsError) -> FsResult<()> {
    match e {
        FsError::NotFound(_) => Ok(()),
        e => Err(e),
    }
}

impl MasterService {
    /// A directory of the namespace with its children loaded (on the leader).
    async fn loaded_dir(&self, id: u64) -> FsResult<Inode> {
        let dir = self.store.get(id)?;
        if dir.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        self.loader.loaded_for_call(&dir, false).await
    }

    /// The state machine's answer to `cmd` now, without applying it. Off the async
    /// threads: it reads the store.
    async fn check(&self, cmd: Command) -> FsResult<()> {
        let store = self.store.clone();
        blocking("dry run", move || {
            Ok(crate::state_machine::dry_run(&store, &cmd)?)
        })
        .await?
    }

    /// Takes the turn for `cmd` and dry-runs it. `look` reads the entries `cmd` changes
    /// and says what their change must hold: it looks before the turn to choose one and
    /// again within it; when the two differ, those entries changed meanwhile and the
    /// turn is taken again, alone.
    async fn turn_for<T>(
        &self,
        cmd: Command,
        look: impl Fn() -> FsResult<(T, Scope)>,
    ) -> FsResult<(Turn<'_>, T)> {
        let mut alone = false;
        loop {
            let (_, scope) = look()?;
            let turn = match (alone, &scope) {
                (false, Scope::Dirs(ids)) => self.loader.mutations.dirs(ids).await,
                _ => self.loader.mutations.alone().await,
            };
            self.check(cmd.clone()).await?;
            let (seen, now) = look()?;
            if turn.alone() || now == scope {
                return Ok((turn, seen));
            }
            alone = true;
        }
    }

    /// Runs a mutation's UFS change and commit, `dirs` watched meanwhile: if it stops
    /// short with an outcome the UFS may still carry out, or is dropped mid-way, they
    /// are listed again (see [`crate::unsettled`]).
    async fn watched<T>(
        &self,
        dirs: &[u64],
        change: impl std::future::Future<Output = FsResult<T>>,
    ) -> FsResult<T> {
        let unsettling = self.loader.unsettled.watch(dirs);
        let r = change.await;
        unsettling.after(&r);
        r
    }

    async fn commit(&self, op: command::Op) -> FsResult<()> {
        self.raft.propose(Command { op: Some(op) }).await
    }

    pub(crate) async fn create_entry(&self, r: CreateRequest) -> FsResult<Inode> {
        validate_name(&r.name)?;
        let dir = self.loaded_dir(r.parent).await?;
        let kind = FileKind::try_from(r.kind)
            .map_err(|_| FsError::InvalidArgument(format!("file kind {}", r.kind)))?;
        if kind == FileKind::Symlink
            && (r.symlink_target.is_empty() || r.symlink_target.len() > 4096)
        {
            return Err(FsError::InvalidArgument(
                "symlink target empty or over 4096 bytes".into(),
            ));
        }
        let mut create = CreateInode {
            parent: r.parent,
            name: r.name.clone(),
            kind: r.kind,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            mtime_ns: now_ns(),
            symlink_target: if kind == FileKind::Symlink {
                r.symlink_target.clone()
            } else {
                Vec::new()
            },
            fingerprint: None,
            rdev: r.rdev,
        };
        // A special file never reaches the UFS: creating one touches only the namespace,
        // whose state machine has the last word (no turn, no dry run). Everything else
        // exists in the UFS at once: checked first, then made there, then proposed, in a
        // turn of its directory (shared by file creations, so concurrent ones share Raft
        // rounds).
        let (turn, dir) = match kind {
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => {
                (None, dir)
            }
            _ => {
                let turn = match kind {
                    FileKind::File => self.loader.mutations.creation_in(r.parent).await,
                    _ => self.loader.mutations.dirs(&[r.parent]).await,
                };
                self.check(Command {
                    op: Some(command::Op::CreateInode(create.clone())),
                })
                .await?;
                // Its UFS path as of now: a rename may have moved it before the turn.
                (Some(turn), self.store.get(r.parent)?)
            }
        };
        let path = join(&dir.ufs_path, &r.name);
        let ufs = self.loader.ufs(dir.mount_id)?;
        let created = self
            .watched(&[dir.id], async {
                create.fingerprint = match kind {
                    // An object already there (made outside Granary, or by a creation of the same
                    // name racing this one, which the state machine settles) is left for the
                    // first upload to replace, as is a new file on a UFS that cannot make one
                    // without replacing. An empty file closed unwritten then costs no upload and
                    // no second Raft round.
                    FileKind::File => match ufs_call(ufs, move |u| u.create_empty(&path)).await {
                        Ok(made) => made.as_ref().map(fingerprint),
                        Err(FsError::Exists(_)) => None,
                        Err(e) => return Err(e),
                    },
                    FileKind::Directory => {
                        Some(fingerprint(&ufs_call(ufs, move |u| u.mkdir(&path)).await?))
                    }
                    FileKind::Symlink => {
                        let target = r.symlink_target.clone();
                        Some(fingerprint(
                            &ufs_call(ufs, move |u| u.symlink(&target, &path)).await?,
                        ))
                    }
                    _ => None,
                };
                self.commit(command::Op::CreateInode(create)).await
            })
            .await;
        match created {
            // A directory or symlink in the UFS but not in the namespace: made outside
            // Granary, or by an earlier try of this call whose proposal failed (a
            // failover). Listing the directory again brings it in, so the name answers as
            // it exists (and a retrying client finds what it made) instead of failing
            // every mkdir with EEXIST and every lookup with ENOENT.
            Err(FsError::Exists(e)) if matches!(kind, FileKind::Directory | FileKind::Symlink) => {
                drop(turn);
                self.loader.refresh(&dir).await?;
                return Err(FsError::Exists(e));
            }
            r => r?,
        }
        self.store
            .lookup(r.parent, &r.name)?
            .ok_or_else(|| FsError::io("created entry vanished"))
    }

    pub(crate) async fn remove_entry(&self, r: RemoveRequest) -> FsResult<()> {
        validate_name(&r.name)?;
        let dir = self.loaded_dir(r.parent).await?;
        let op = RemoveEntry {
            parent: r.parent,
            name: r.name.clone(),
            directory: r.directory,
            now_ns: now_ns(),
        };
        let cmd = Command {
            op: Some(command::Op::RemoveEntry(op.clone())),
        };
        let (_turn, victim) = self
            .turn_for(cmd, || {
                let victim = self.named(dir.id, &r.name)?;
                let scope = match (spans_directories(&victim), victim.kind) {
                    (true, _) => Scope::Alone,
                    // A directory's own entries must stay as checked (none) too.
                    (false, k) if k == FileKind::Directory as i32 => {
                        Scope::Dirs(vec![dir.id, victim.id])
                    }
                    (false, _) => Scope::Dirs(vec![dir.id]),
                };
                Ok((victim, scope))
            })
            .await?;
        let ufs = self.loader.ufs(dir.mount_id)?;
        let object = self.object_under(&victim, dir.id, &r.name)?;
        let dirs = match &object {
            // The object moves into its next name's directory.
            Object::Moves { to_dir, .. } => vec![dir.id, *to_dir],
            _ => vec![dir.id],
        };
        self.watched(&dirs, async {
            match object {
                Object::None => {}
                // Other names remain: the object moves under the next one.
                Object::Moves {
                    from, to, version, ..
                } => {
                    move_object(ufs, from, to, version).await?;
                }
                Object::Goes(path) => {
                    let directory = r.directory;
                    ufs_call(ufs, move |u| u.remove(&path, directory))
                        .await
                        .or_else(never_uploaded)?
                }
            }
            self.commit(command::Op::RemoveEntry(op)).await
        })
        .await?;
        self.drop_cache_if_deleted(&victim);
        Ok(())
    }

    /// `inode` lost a name: if that was its last, the workers drop its cached blocks.
    fn drop_cache_if_deleted(&self, inode: &Inode) {
        if inode.kind != FileKind::File as i32 || self.store.get(inode.id).is_ok() {
            return;
        }
        let blocks = block_count(inode.size, inode.block_size.max(1));
        self.deleted.record(inode.id, blocks as u32);
    }

    /// The stored inode behind entry (`parent`, `name`).
    fn named(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        let entry = self
            .store
            .lookup(parent, name)?
            .ok_or_else(|| FsError::NotFound(String::from_utf8_lossy(name).into_owned()))?;
        self.store.get(entry.id)
    }

    /// What becomes of `inode`'s UFS object when its entry (`parent`, `name`) goes.
    fn object_under(&self, inode: &Inode, parent: u64, name: &[u8]) -> FsResult<Object> {
        if is_special(inode.kind) || !is_primary(inode, parent, name) {
            return Ok(Object::None);
        }
        match inode.links.first() {
            None => Ok(Object::Goes(inode.ufs_path.clone())),
            Some(next) => {
                let dir = self.store.get(next.parent)?;
                Ok(Object::Moves {
                    from: inode.ufs_path.clone(),
                    to: join(&dir.ufs_path, &next.name),
                    to_dir: dir.id,
                    version: inode.fingerprint,
                })
            }
        }
    }

    pub(crate) async fn rename_entry(&self, r: RenameRequest) -> FsResult<Inode> {
        validate_name(&r.name)?;
        validate_name(&r.new_name)?;
        let from_dir = self.loaded_dir(r.parent).await?;
        let to_dir = self.loaded_dir(r.new_parent).await?;
        if from_dir.mount_id != to_dir.mount_id {
            return Err(FsError::CrossDevice("rename across mounts".into()));
        }
        let op = RenameEntry {
            parent: r.parent,
            name: r.name.clone(),
            new_parent: r.new_parent,
            new_name: r.new_name.clone(),
            no_replace: r.no_replace,
            now_ns: now_ns(),
        };
        let cmd = Command {
            op: Some(command::Op::RenameEntry(op.clone())),
        };
        let (_turn, (moving, replaced)) = self
            .turn_for(cmd, || {
                let moving = self.named(from_dir.id, &r.name)?;
                let replaced = self.store.lookup(to_dir.id, &r.new_name)?;
                // A directory moves its subtree's UFS paths: no other mutation meanwhile.
                let alone = moving.kind == FileKind::Directory as i32
                    || spans_directories(&moving)
                    || replaced.as_ref().is_some_and(spans_directories);
                let scope = match alone {
                    true => Scope::Alone,
                    false => Scope::Dirs(vec![from_dir.id, to_dir.id]),
                };
                Ok(((moving, replaced), scope))
            })
            .await?;
        let replaced = match replaced {
            // Two names of one file: rename(2) does nothing.
            Some(t) if t.id == moving.id => return Ok(t),
            Some(t) => Some(self.store.get(t.id)?),
            None => None,
        };
        // Its UFS path as of now: a rename may have moved it before the turn.
        let to_dir = self.store.get(to_dir.id)?;
        let ufs = self.loader.ufs(from_dir.mount_id)?;
        let to = join(&to_dir.ufs_path, &r.new_name);
        // First the replaced entry's object: it moves under its next name if it has one,
        // else it is overwritten below (or removed when nothing takes its place).
        let mut stale_at_to = None;
        let mut moved_aside = None;
        let mut dirs = vec![from_dir.id, to_dir.id];
        let aside = match &replaced {
            Some(target) => self.object_under(target, to_dir.id, &r.new_name)?,
            None => Object::None,
        };
        if let Object::Moves { to_dir, .. } = &aside {
            dirs.push(*to_dir);
        }
        let moves_object = !is_special(moving.kind) && is_primary(&moving, from_dir.id, &r.name);
        let moving_object = moves_object.then(|| moving.clone());
        let from = moving.ufs_path.clone();
        self.watched(&dirs, async {
            match aside {
                Object::None => {}
                Object::Moves {
                    from, to, version, ..
                } => {
                    if move_object(ufs.clone(), from.clone(), to.clone(), version).await? {
                        moved_aside = Some((to, from));
                    }
                }
                Object::Goes(_) => stale_at_to = replaced.clone(),
            }
            let placed = ufs_call(ufs.clone(), move |u| {
                place(u, moving_object.as_ref(), &from, &to, stale_at_to.as_ref())
            })
            .await;
            if let Err(e) = placed {
                // Nothing is committed: the replaced file's object goes back where it was.
                if let Some((at, back)) = moved_aside {
                    if let Err(undo) = ufs_call(ufs, move |u| u.rename(&at, &back)).await {
                        tracing::error!(error = %undo, "cannot move an object back after a failed rename; its directory is listed again");
                        self.loader.unsettled.mark(&dirs);
                    }
                }
                return Err(e);
            }
            self.commit(command::Op::RenameEntry(op)).await
        })
        .await?;
        if let Some(target) = &replaced {
            self.drop_cache_if_deleted(target);
        }
        self.store
            .lookup(to_dir.id, &r.new_name)?
            .ok_or_else(|| FsError::io("renamed entry vanished"))
    }

    /// link(2): a new name for a file; the UFS is not touched (its object stays under
    /// the file's first name).
    pub(crate) async fn link_entry(&self, r: LinkRequest) -> FsResult<Inode> {
        validate_name(&r.new_name)?;
        self.loaded_dir(r.new_parent).await?;
        // The file's other names are in other directories.
        let _turn = self.loader.mutations.alone().await;
        let op = LinkEntry {
            id: r.id,
            new_parent: r.new_parent,
            new_name: r.new_name.clone(),
            now_ns: now_ns(),
        };
        self.check(Command {
            op: Some(command::Op::LinkEntry(op.clone())),
        })
        .await?;
        self.commit(command::Op::LinkEntry(op)).await?;
        self.store
            .lookup(r.new_parent, &r.new_name)?
            .ok_or_else(|| FsError::io("linked entry vanished"))
    }

    pub(crate) async fn set_attributes(&self, mut a: SetAttributes) -> FsResult<Inode> {
        a.now_ns = now_ns();
        let id = a.id;
        let _turn = self.loader.mutations.shared().await;
        self.commit(command::Op::SetAttributes(a)).await?;
        self.store.get(id)
    }

    /// fsync(2) through a mount: the inode's UFS object as it is now becomes durable (its
    /// namespace record is durable already: in the Raft log).
    pub(crate) async fn sync_object(&self, id: u64) -> FsResult<()> {
        let inode = match self.store.get(id) {
            Ok(inode) => inode,
            // Removed meanwhile (through another mount): fsync(2) of a descriptor of an
            // unlinked file has nothing to make durable.
            Err(FsError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if is_special(inode.kind) {
            return Ok(());
        }
        let ufs = self.loader.ufs(inode.mount_id)?;
        ufs_call(ufs, move |u| {
            u.sync(&inode.ufs_path).or_else(never_uploaded)
        })
        .await
    }

    pub(crate) async fn commit_content(&self, c: CommitContent) -> FsResult<Inode> {
        let id = c.id;
        let _turn = self.loader.mutations.shared().await;
        self.commit(command::Op::CommitContent(c)).await?;
        self.store.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_common::ufs::LocalUfs;

    #[tokio::test]
    async fn an_object_moves_only_while_it_is_the_files_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("first"), b"the file").unwrap();
        let ufs: Arc<dyn Ufs> =
            Arc::new(LocalUfs::open("file:///x", dir.path().to_str().unwrap()).unwrap());
        let version = Some(fingerprint(&ufs.stat(b"first").unwrap()));
        let other = Some(UfsFingerprint {
            size: 1,
            mtime_ns: 1,
        });
        let moved = |from: &str, to: &str, v| move_object(ufs.clone(), from.into(), to.into(), v);
        // Another object under the name (a retry after the move, then a new write there).
        assert!(!moved("first", "next", other).await.unwrap());
        assert!(moved("first", "next", version).await.unwrap());
        assert_eq!(std::fs::read(dir.path().join("next")).unwrap(), b"the file");
        // Moved already, or never uploaded: nothing to do.
        assert!(!moved("first", "next", version).await.unwrap());
        assert!(!moved("first", "next", None).await.unwrap());
    }

    #[test]
    fn a_retried_rename_keeps_what_its_first_try_moved() {
        let dir = tempfile::tempdir().unwrap();
        let ufs = LocalUfs::open("file:///x", dir.path().to_str().unwrap()).unwrap();
        let file = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
        let read = |name: &str| std::fs::read(dir.path().join(name)).ok();
        let inode = |kind: FileKind, name: &[u8]| {
            let o = ufs.stat(name).unwrap();
            Inode {
                kind: kind as i32,
                fingerprint: (kind == FileKind::File).then(|| fingerprint(&o)),
                ..Default::default()
            }
        };
        file("ckpt", b"old");
        file("ckpt.tmp", b"new checkpoint");
        let (old, new) = (
            inode(FileKind::File, b"ckpt"),
            inode(FileKind::File, b"ckpt.tmp"),
        );
        place(&ufs, Some(&new), b"ckpt.tmp", b"ckpt", Some(&old)).unwrap();
        assert_eq!(read("ckpt").as_deref(), Some(&b"new checkpoint"[..]));
        // The same rename again (its answer was lost): the object is already in place,
        // even where the move changed its version (S3 copies).
        place(&ufs, Some(&new), b"ckpt.tmp", b"ckpt", Some(&old)).unwrap();
        assert_eq!(read("ckpt").as_deref(), Some(&b"new checkpoint"[..]));
        let copied = std::fs::File::options()
            .write(true)
            .open(dir.path().join("ckpt"))
            .unwrap();
        copied
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        let same_bytes = Inode {
            fingerprint: new.fingerprint.map(|mut f| {
                f.mtime_ns = 7;
                f
            }),
            ..new.clone()
        };
        place(&ufs, Some(&new), b"ckpt.tmp", b"ckpt", Some(&same_bytes)).unwrap();
        assert_eq!(read("ckpt").as_deref(), Some(&b"new checkpoint"[..]));

        // A file never uploaded replaces one that was: the old object goes.
        let unsent = Inode {
            kind: FileKind::File as i32,
            ..Default::default()
        };
        let stored = inode(FileKind::File, b"ckpt");
        place(&ufs, Some(&unsent), b"fresh", b"ckpt", Some(&stored)).unwrap();
        assert_eq!(read("ckpt"), None);
        // A hard link's other name replacing a file: nothing of its own moves.
        file("target", b"replaced");
        let target = inode(FileKind::File, b"target");
        place(&ufs, None, b"first", b"target", Some(&target)).unwrap();
        assert_eq!(read("target"), None);

        // A directory moved over an empty one, then the retry.
        std::fs::create_dir_all(dir.path().join("run/sub")).unwrap();
        std::fs::create_dir(dir.path().join("old")).unwrap();
        let (run, empty) = (
            inode(FileKind::Directory, b"run"),
            inode(FileKind::Directory, b"old"),
        );
        place(&ufs, Some(&run), b"run", b"old", Some(&empty)).unwrap();
        place(&ufs, Some(&run), b"run", b"old", Some(&empty)).unwrap();
        assert!(dir.path().join("old/sub").is_dir());
    }
}
