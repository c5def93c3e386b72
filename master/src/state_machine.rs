//! The namespace state machine: a pure function from (state, command) to state. It does
//! no I/O beyond the store's transaction (the leader lists the UFS before proposing), so
//! every replica applying the same log reaches the same state, inode ids included.

use std::collections::BTreeMap;

use granary_common::ids::{inode_id, root_inode};
use granary_common::path::{join, validate_name};
use granary_common::ufs::MODE_KNOWN;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    command, Command, CommitContent, CreateInode, FileKind, Inode, LoadDirectory, MasterSet,
    MountTable, RemoveEntry, RenameEntry, SetAttributes, SetMount, UfsEntry, UfsFingerprint,
};
use prost::Message;

use crate::store::{
    child_key, NamespaceStore, StoreError, Tables, META_APPLIED_INDEX, META_APPLIED_TERM,
    META_CONF_STATE, META_INODE_COUNT, META_MASTERS, META_MOUNTS, META_NEXT_LOCAL_ID,
};

const META_BLOCK_SIZE: &str = "block_size";

impl Tables<'_> {
    pub(crate) fn add_count(&mut self, delta: i64) -> Result<(), StoreError> {
        let n = self.meta.u64(META_INODE_COUNT)? as i64 + delta;
        self.set_u64(META_INODE_COUNT, n.max(0) as u64)
    }

    fn allocate_id(&mut self) -> Result<u64, StoreError> {
        // Local ids start after the root's.
        let next = self.meta.u64(META_NEXT_LOCAL_ID)?.max(2);
        self.set_u64(META_NEXT_LOCAL_ID, next + 1)?;
        Ok(inode_id(self.shard, next))
    }

    fn children_of(&self, parent: u64) -> Result<BTreeMap<Vec<u8>, u64>, StoreError> {
        let lower = child_key(parent, b"");
        let upper = (parent + 1).to_be_bytes();
        Ok(self
            .children
            .range(&lower, &upper, usize::MAX)?
            .into_iter()
            .map(|(k, v)| (k[8..].to_vec(), v))
            .collect())
    }

    /// Drops the entry (`parent`, `name`) of inode `id` and, when it was the inode's
    /// primary name, everything below it: the UFS no longer has that object (or this
    /// shard no longer keeps it). A hard link among the dropped entries leaves its file
    /// alone; a file whose object went drops all its names.
    fn remove_subtree(&mut self, parent: u64, name: &[u8], id: u64) -> Result<(), StoreError> {
        let mut stack = vec![(parent, name.to_vec(), id)];
        while let Some((parent, name, id)) = stack.pop() {
            let Some(inode) = self.get(id)? else {
                self.children.remove(&child_key(parent, &name))?;
                continue;
            };
            if !crate::links::is_primary(&inode, parent, &name) {
                self.unlink_name(parent, &name, &inode, inode.ctime_ns)?;
                continue;
            }
            for (child_name, child) in self.children_of(id)? {
                stack.push((id, child_name, child));
            }
            self.forget_inode(&inode)?;
        }
        Ok(())
    }
}

/// One committed log entry as the state machine sees it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub index: u64,
    pub term: u64,
    pub op: EntryOp,
}

#[derive(Debug, Clone)]
pub enum EntryOp {
    Command(Command),
    /// An entry with no command (a new leader's first entry).
    Noop,
    /// A membership change, already applied to raft: the resulting configuration.
    ConfChange {
        conf_state: Vec<u8>,
        masters: MasterSet,
    },
}

#[cfg(test)]
impl LogEntry {
    pub fn command(index: u64, term: u64, cmd: Command) -> Self {
        LogEntry {
            index,
            term,
            op: EntryOp::Command(cmd),
        }
    }
}

/// Applies log entries in one transaction and records the last one's index and term as
/// applied. Entries at or below the applied index are skipped (replay after restart).
/// Each entry gets its own result; a command that fails still consumes its index, so
/// every replica agrees.
///
/// The transaction is not synced: the Raft log is durable and replaying it is
/// idempotent, so the applied state may lag on disk by what [`NamespaceStore::sync`] has
/// not flushed yet (the log is never compacted past a synced index).
pub fn apply_batch(
    store: &NamespaceStore,
    entries: &[LogEntry],
) -> Result<Vec<FsResult<()>>, StoreError> {
    let routing_changed = entries.iter().any(|e| {
        matches!(
            &e.op,
            EntryOp::Command(Command {
                op: Some(command::Op::SetRoutingTable(_))
            })
        )
    });
    let (results, commands) = store.write(|tables| {
        let mut results = Vec::with_capacity(entries.len());
        let mut commands = 0u64;
        let mut applied = tables.meta.u64(META_APPLIED_INDEX)?;
        let mut applied_term = tables.meta.u64(META_APPLIED_TERM)?;
        for e in entries {
            if e.index <= applied {
                results.push(Ok(()));
                continue;
            }
            results.push(match &e.op {
                EntryOp::Command(cmd) => {
                    commands += 1;
                    apply(tables, cmd)?
                }
                EntryOp::Noop => Ok(()),
                EntryOp::ConfChange {
                    conf_state,
                    masters,
                } => {
                    tables.meta.insert(META_CONF_STATE, conf_state)?;
                    tables.meta.insert(META_MASTERS, &masters.encode_to_vec())?;
                    Ok(())
                }
            });
            applied = e.index;
            applied_term = e.term;
        }
        tables.set_u64(META_APPLIED_INDEX, applied)?;
        tables.set_u64(META_APPLIED_TERM, applied_term)?;
        Ok((results, commands))
    })?;
    metrics::counter!("granary_master_applied_commands_total").increment(commands);
    if routing_changed {
        store.reload_routing_version()?;
    }
    Ok(results)
}

/// What applying `cmd` now would answer, without changing anything: its changes are
/// kept in memory over a read transaction and dropped. The leader checks a mutation this
/// way before touching the UFS, so the rules live only in the state machine.
pub fn dry_run(store: &NamespaceStore, cmd: &Command) -> Result<FsResult<()>, StoreError> {
    store.dry_run(|tables| apply(tables, cmd))
}

/// Applies one command. The outer error is a storage failure (the batch aborts); the inner
/// one is the command's own result, recorded as applied either way.
pub(crate) fn apply(t: &mut Tables<'_>, cmd: &Command) -> Result<FsResult<()>, StoreError> {
    match &cmd.op {
        Some(command::Op::SetMount(m)) => set_mount(t, m),
        Some(command::Op::LoadDirectory(l)) => load_directory(t, l),
        Some(command::Op::CreateInode(c)) => create_inode(t, c),
        Some(command::Op::RemoveEntry(r)) => remove_entry(t, r),
        Some(command::Op::RenameEntry(r)) => rename_entry(t, r),
        Some(command::Op::SetAttributes(a)) => set_attributes(t, a),
        Some(command::Op::CommitContent(c)) => commit_content(t, c),
        Some(command::Op::SetRoutingTable(s)) => crate::routing::set_routing_table(t, s),
        Some(command::Op::LinkEntry(l)) => crate::links::link_entry(t, l),
        None => Ok(Err(FsError::InvalidArgument("empty command".into()))),
    }
}

fn set_mount(t: &mut Tables<'_>, m: &SetMount) -> Result<FsResult<()>, StoreError> {
    let Some(mount) = &m.mount else {
        return Ok(Err(FsError::InvalidArgument(
            "mount without a mount point".into(),
        )));
    };
    if mount.path != b"/" {
        return Ok(Err(FsError::Unsupported(
            "only the namespace root can be mounted".into(),
        )));
    }
    let mut table = match t.meta.get(META_MOUNTS)? {
        Some(v) => {
            MountTable::decode(v.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string()))?
        }
        None => MountTable::default(),
    };
    table
        .mounts
        .retain(|x| x.mount_id != mount.mount_id && x.path != mount.path);
    table.mounts.push(mount.clone());
    t.meta.insert(META_MOUNTS, &table.encode_to_vec())?;
    t.set_u64(META_BLOCK_SIZE, m.block_size)?;

    let root = root_inode(t.shard);
    if t.get(root)?.is_none() {
        t.put(&Inode {
            id: root,
            parent: root,
            kind: FileKind::Directory as i32,
            mode: if m.root_mode == 0 { 0o755 } else { m.root_mode },
            mtime_ns: m.root_mtime_ns,
            mount_id: mount.mount_id,
            ..Default::default()
        })?;
        t.add_count(1)?;
    }
    Ok(Ok(()))
}

fn load_directory(t: &mut Tables<'_>, l: &LoadDirectory) -> Result<FsResult<()>, StoreError> {
    let Some(dir) = t.get(l.dir_id)? else {
        return Ok(Err(FsError::NotFound(format!("directory {:#x}", l.dir_id))));
    };
    if dir.kind != FileKind::Directory as i32 {
        return Ok(Err(FsError::NotDir(format!("inode {:#x}", l.dir_id))));
    }
    let version = t.routing_table()?.map_or(0, |r| r.version());
    if l.routing_version != version {
        return Ok(Err(FsError::StaleRouting(version)));
    }
    let block_size = t.meta.u64(META_BLOCK_SIZE)?;
    // A listing in one command removes what it does not list; a part of a bigger one
    // touches only its own entries (and the last part names the removals).
    let mut existing = match l.partial || l.explicit_removals {
        true => None,
        false => Some(t.children_of(dir.id)?),
    };
    // A UFS name we cannot represent is skipped on every replica alike.
    let listed: Vec<&UfsEntry> = l
        .entries
        .iter()
        .filter(|e| validate_name(&e.name).is_ok())
        .collect();
    // First what goes: objects the UFS no longer has, or has as another kind, so that
    // the names they take along (hard links of a file whose object went) are seen
    // afresh below if the UFS lists objects under them.
    let mut previous = Vec::with_capacity(listed.len());
    let mut doomed: Vec<(Vec<u8>, u64)> = Vec::new();
    for e in &listed {
        let id = match &mut existing {
            Some(map) => map.remove(&e.name),
            None => t.children.get(&child_key(dir.id, &e.name))?,
        };
        let old = match id {
            Some(id) => t.get(id)?,
            None => None,
        };
        if let Some(old) = &old {
            // A directory that became a referral (or stopped being one) is replaced, and
            // so is a symlink pointing elsewhere: a new inode, since the kernel keeps a
            // symlink's target for as long as it keeps its inode.
            let same = old.kind == e.kind
                && old.referral == e.referral
                && (old.kind != FileKind::Symlink as i32 || old.symlink_target == e.symlink_target);
            if !same && crate::links::is_primary(old, dir.id, &e.name) {
                doomed.push((e.name.clone(), old.id));
            }
        }
        previous.push(old);
    }
    let vanished: Vec<(Vec<u8>, u64)> = match existing {
        Some(map) => map.into_iter().collect(),
        None => {
            let mut named = Vec::new();
            for name in &l.removed {
                if let Some(id) = t.children.get(&child_key(dir.id, name))? {
                    named.push((name.clone(), id));
                }
            }
            named
        }
    };
    for (name, id) in vanished {
        let Some(gone) = t.get(id)? else { continue };
        // Entries created through Granary that have not reached the UFS yet (no
        // fingerprint), hard links and special files live only in the namespace.
        let namespace_only = gone.fingerprint.is_none()
            || !crate::links::is_primary(&gone, dir.id, &name)
            || is_special(gone.kind);
        if !namespace_only {
            doomed.push((name, id));
        }
    }
    let removed_any = !doomed.is_empty();
    for (name, id) in doomed {
        // Gone already with a file removed before (one of its other names).
        let Some(gone) = t.get(id)? else { continue };
        if gone.kind == FileKind::Directory as i32 {
            t.adjust_subdirs(dir.id, -1)?;
        }
        t.remove_subtree(dir.id, &name, id)?;
    }
    let mut added = 0i64;
    for (e, old) in listed.into_iter().zip(previous) {
        let fingerprint = UfsFingerprint {
            size: e.size,
            mtime_ns: e.mtime_ns,
        };
        // Re-read after removals: a file removed above took all its names.
        let old = match (old, removed_any) {
            (Some(old), true) => t.get(old.id)?,
            (old, _) => old,
        };
        let inode = match old {
            // A hard link made here: the UFS object under this name is not its file's.
            Some(old) if !crate::links::is_primary(&old, dir.id, &e.name) => continue,
            Some(mut old) => {
                old.size = if e.kind == FileKind::Directory as i32 {
                    0
                } else {
                    e.size
                };
                // Times set through Granary (utimensat, a writer's) stay while the object
                // is the one it knows.
                if old.fingerprint != Some(fingerprint) {
                    old.mtime_ns = e.mtime_ns;
                }
                // The mode stays: Granary's namespace owns permissions once it knows them.
                old.symlink_target = e.symlink_target.clone();
                old.fingerprint = Some(fingerprint);
                old
            }
            None => {
                let id = t.allocate_id()?;
                t.children.insert(&child_key(dir.id, &e.name), id)?;
                added += 1;
                if e.kind == FileKind::Directory as i32 {
                    t.adjust_subdirs(dir.id, 1)?;
                }
                Inode {
                    id,
                    parent: dir.id,
                    name: e.name.clone(),
                    kind: e.kind,
                    size: if e.kind == FileKind::Directory as i32 {
                        0
                    } else {
                        e.size
                    },
                    mtime_ns: e.mtime_ns,
                    mode: e.mode,
                    uid: e.uid.unwrap_or(0),
                    gid: e.gid.unwrap_or(0),
                    symlink_target: e.symlink_target.clone(),
                    block_size,
                    fingerprint: Some(fingerprint),
                    mount_id: dir.mount_id,
                    ufs_path: join(&dir.ufs_path, &e.name),
                    // Another shard's subtree: nothing of it is listed here.
                    children_loaded: e.referral.is_some(),
                    referral: e.referral.clone(),
                    ..Default::default()
                }
            }
        };
        t.put(&inode)?;
    }
    t.add_count(added)?;
    if !l.partial {
        // Re-read: a part's own entries do not change the directory's record.
        let mut dir = t.get(dir.id)?.unwrap_or(dir);
        dir.children_loaded = true;
        dir.listed_at_ns = l.listed_at_ns;
        t.put(&dir)?;
    }
    Ok(Ok(()))
}

fn create_inode(t: &mut Tables<'_>, c: &CreateInode) -> Result<FsResult<()>, StoreError> {
    if let Err(e) = validate_name(&c.name) {
        return Ok(Err(e));
    }
    let Some(dir) = t.get(c.parent)? else {
        return Ok(Err(FsError::NotFound(format!("directory {:#x}", c.parent))));
    };
    if let Err(e) = check_new_entry(t, &dir, &c.name)? {
        return Ok(Err(e));
    }
    if is_special(c.kind) && c.fingerprint.is_some() {
        return Ok(Err(FsError::InvalidArgument(
            "special files have no UFS object".into(),
        )));
    }
    let id = t.allocate_id()?;
    t.children.insert(&child_key(dir.id, &c.name), id)?;
    let block_size = t.meta.u64(META_BLOCK_SIZE)?;
    t.put(&Inode {
        id,
        parent: dir.id,
        name: c.name.clone(),
        kind: c.kind,
        size: c.symlink_target.len() as u64,
        mode: c.mode & 0o7777 | MODE_KNOWN,
        uid: c.uid,
        gid: c.gid,
        mtime_ns: c.mtime_ns,
        atime_ns: c.mtime_ns,
        ctime_ns: c.mtime_ns,
        symlink_target: c.symlink_target.clone(),
        block_size,
        children_loaded: c.kind == FileKind::Directory as i32,
        fingerprint: c.fingerprint,
        mount_id: dir.mount_id,
        ufs_path: join(&dir.ufs_path, &c.name),
        listed_at_ns: c.mtime_ns,
        referral: None,
        links: Vec::new(),
        rdev: c.rdev,
        subdirs: 0,
    })?;
    t.add_count(1)?;
    let mut dir = dir;
    if c.kind == FileKind::Directory as i32 {
        dir.subdirs += 1;
    }
    dir.mtime_ns = c.mtime_ns;
    dir.ctime_ns = c.mtime_ns;
    t.put(&dir)?;
    Ok(Ok(()))
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Whether `name` may be added to `dir`: a directory of this shard without that name.
pub(crate) fn check_new_entry(
    t: &Tables<'_>,
    dir: &Inode,
    name: &[u8],
) -> Result<FsResult<()>, StoreError> {
    if dir.kind != FileKind::Directory as i32 {
        return Ok(Err(FsError::NotDir(shown(&dir.name))));
    }
    if t.children.get(&child_key(dir.id, name))?.is_some() {
        return Ok(Err(FsError::Exists(shown(name))));
    }
    t.check_owned(dir, name)
}

/// A directory's entries changed: its mtime and ctime move.
fn touch_dir(t: &mut Tables<'_>, dir: u64, now_ns: i64) -> Result<(), StoreError> {
    if let Some(mut d) = t.get(dir)? {
        d.mtime_ns = now_ns;
        d.ctime_ns = now_ns;
        t.put(&d)?;
    }
    Ok(())
}

/// A fifo, socket or device: only the namespace holds it.
pub(crate) fn is_special(kind: i32) -> bool {
    matches!(
        FileKind::try_from(kind),
        Ok(FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice)
    )
}

/// The directory `id`, or the error a path through it gives.
fn directory(t: &Tables<'_>, id: u64) -> Result<FsResult<Inode>, StoreError> {
    Ok(match t.get(id)? {
        None => Err(FsError::NotFound(format!("directory {id:#x}"))),
        Some(d) if d.kind != FileKind::Directory as i32 => Err(FsError::NotDir(shown(&d.name))),
        Some(d) => Ok(d),
    })
}

fn child(t: &Tables<'_>, parent: u64, name: &[u8]) -> Result<Option<Inode>, StoreError> {
    match t.children.get(&child_key(parent, name))? {
        Some(id) => t.get(id),
        None => Ok(None),
    }
}

fn has_children(t: &Tables<'_>, dir: u64) -> Result<bool, StoreError> {
    let lower = child_key(dir, b"");
    let upper = (dir + 1).to_be_bytes();
    Ok(!t.children.range(&lower, &upper, 1)?.is_empty())
}

fn remove_entry(t: &mut Tables<'_>, r: &RemoveEntry) -> Result<FsResult<()>, StoreError> {
    let dir = match directory(t, r.parent)? {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let Some(victim) = child(t, dir.id, &r.name)? else {
        return Ok(Err(FsError::NotFound(shown(&r.name))));
    };
    let is_dir = victim.kind == FileKind::Directory as i32;
    if r.directory && !is_dir {
        return Ok(Err(FsError::NotDir(shown(&r.name))));
    }
    if !r.directory && is_dir {
        return Ok(Err(FsError::IsDir(shown(&r.name))));
    }
    if let Err(e) = t.check_movable(&victim)? {
        return Ok(Err(e));
    }
    if is_dir && has_children(t, victim.id)? {
        return Ok(Err(FsError::NotEmpty(shown(&r.name))));
    }
    t.unlink_name(dir.id, &r.name, &victim, r.now_ns)?;
    touch_dir(t, dir.id, r.now_ns)?;
    Ok(Ok(()))
}

/// Rewrites the UFS paths of a moved directory's descendants under its new path.
fn move_subtree_paths(t: &mut Tables<'_>, dir: &Inode) -> Result<(), StoreError> {
    let mut stack = vec![(dir.id, dir.ufs_path.clone())];
    while let Some((id, path)) = stack.pop() {
        for (name, child_id) in t.children_of(id)? {
            let Some(mut c) = t.get(child_id)? else {
                continue;
            };
            // A hard link here names a file whose object is under another name.
            if !crate::links::is_primary(&c, id, &name) {
                continue;
            }
            c.ufs_path = join(&path, &name);
            if c.kind == FileKind::Directory as i32 {
                stack.push((c.id, c.ufs_path.clone()));
            }
            t.put(&c)?;
        }
    }
    Ok(())
}

fn rename_entry(t: &mut Tables<'_>, r: &RenameEntry) -> Result<FsResult<()>, StoreError> {
    if let Err(e) = validate_name(&r.new_name) {
        return Ok(Err(e));
    }
    let from_dir = match directory(t, r.parent)? {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let to_dir = match directory(t, r.new_parent)? {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let Some(mut moving) = child(t, from_dir.id, &r.name)? else {
        return Ok(Err(FsError::NotFound(shown(&r.name))));
    };
    if let Err(e) = t.check_movable(&moving)? {
        return Ok(Err(e));
    }
    if let Err(e) = t.check_owned(&to_dir, &r.new_name)? {
        return Ok(Err(e));
    }
    let moving_dir = moving.kind == FileKind::Directory as i32;
    if moving_dir {
        // A directory cannot move beneath itself.
        let mut up = to_dir.id;
        loop {
            if up == moving.id {
                return Ok(Err(FsError::InvalidArgument(format!(
                    "cannot move {} beneath itself",
                    shown(&r.name)
                ))));
            }
            match t.get(up)? {
                Some(i) if i.parent != i.id => up = i.parent,
                _ => break,
            }
        }
    }
    if let Some(target) = child(t, to_dir.id, &r.new_name)? {
        if r.no_replace {
            return Ok(Err(FsError::Exists(shown(&r.new_name))));
        }
        if target.id == moving.id {
            return Ok(Ok(()));
        }
        if let Err(e) = t.check_movable(&target)? {
            return Ok(Err(e));
        }
        let target_dir = target.kind == FileKind::Directory as i32;
        match (moving_dir, target_dir) {
            (true, false) => return Ok(Err(FsError::NotDir(shown(&r.new_name)))),
            (false, true) => return Ok(Err(FsError::IsDir(shown(&r.new_name)))),
            (true, true) if has_children(t, target.id)? => {
                return Ok(Err(FsError::NotEmpty(shown(&r.new_name))))
            }
            _ => {}
        }
        t.unlink_name(to_dir.id, &r.new_name, &target, r.now_ns)?;
    }
    t.children.remove(&child_key(from_dir.id, &r.name))?;
    t.children
        .insert(&child_key(to_dir.id, &r.new_name), moving.id)?;
    if crate::links::is_primary(&moving, from_dir.id, &r.name) {
        moving.parent = to_dir.id;
        moving.name = r.new_name.clone();
        moving.ufs_path = join(&to_dir.ufs_path, &r.new_name);
    } else {
        // A hard link moves; the UFS object stays under the primary name.
        for l in &mut moving.links {
            if l.parent == from_dir.id && l.name == r.name {
                l.parent = to_dir.id;
                l.name = r.new_name.clone();
            }
        }
    }
    moving.ctime_ns = r.now_ns;
    t.put(&moving)?;
    if moving_dir && !t.dry_run {
        move_subtree_paths(t, &moving)?;
    }
    if moving_dir && from_dir.id != to_dir.id {
        t.adjust_subdirs(from_dir.id, -1)?;
        t.adjust_subdirs(to_dir.id, 1)?;
    }
    touch_dir(t, from_dir.id, r.now_ns)?;
    touch_dir(t, to_dir.id, r.now_ns)?;
    Ok(Ok(()))
}

fn set_attributes(t: &mut Tables<'_>, a: &SetAttributes) -> Result<FsResult<()>, StoreError> {
    let Some(mut inode) = t.get(a.id)? else {
        return Ok(Err(FsError::NotFound(format!("inode {:#x}", a.id))));
    };
    if let Some(mode) = a.mode {
        inode.mode = mode & 0o7777 | MODE_KNOWN;
    }
    if let Some(uid) = a.uid {
        inode.uid = uid;
    }
    if let Some(gid) = a.gid {
        inode.gid = gid;
    }
    if let Some(at) = a.atime_ns {
        inode.atime_ns = at;
    }
    if let Some(mt) = a.mtime_ns {
        inode.mtime_ns = mt;
    }
    inode.ctime_ns = a.now_ns;
    t.put(&inode)?;
    Ok(Ok(()))
}

fn commit_content(t: &mut Tables<'_>, c: &CommitContent) -> Result<FsResult<()>, StoreError> {
    let Some(mut inode) = t.get(c.id)? else {
        return Ok(Err(FsError::NotFound(format!("inode {:#x}", c.id))));
    };
    if inode.kind != FileKind::File as i32 {
        return Ok(Err(FsError::IsDir(shown(&inode.name))));
    }
    inode.size = c.size;
    inode.fingerprint = c.fingerprint;
    if c.mtime_ns != 0 {
        inode.mtime_ns = c.mtime_ns;
        inode.ctime_ns = c.mtime_ns;
    }
    t.put(&inode)?;
    Ok(Ok(()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::StoreError;
    use granary_protos::v1::{command, FileKind, LoadDirectory, MountPoint, SetMount, UfsEntry};

    /// Mounts `file:///data` at the root, with 1 KiB blocks.
    pub(crate) fn mount() -> Command {
        Command {
            op: Some(command::Op::SetMount(SetMount {
                mount: Some(MountPoint {
                    mount_id: 1,
                    path: b"/".to_vec(),
                    ufs_uri: "file:///data".into(),
                    ..Default::default()
                }),
                block_size: 1024,
                ..Default::default()
            })),
        }
    }

    fn entry(name: &str, kind: FileKind, size: u64) -> UfsEntry {
        UfsEntry {
            name: name.as_bytes().to_vec(),
            kind: kind as i32,
            size,
            mtime_ns: 7,
            mode: 0o644,
            ..Default::default()
        }
    }

    fn load(dir: u64, entries: Vec<UfsEntry>) -> Command {
        Command {
            op: Some(command::Op::LoadDirectory(LoadDirectory {
                dir_id: dir,
                entries,
                listed_at_ns: 1,
                ..Default::default()
            })),
        }
    }

    fn names(store: &NamespaceStore, dir: u64) -> Vec<(String, u64)> {
        store
            .list(dir, b"", 100)
            .unwrap()
            .0
            .into_iter()
            .map(|i| (String::from_utf8(i.name).unwrap(), i.id))
            .collect()
    }

    #[test]
    fn replicas_applying_the_same_log_agree_and_restarts_keep_state() {
        let tmp = tempfile::tempdir().unwrap();
        let log = vec![
            LogEntry::command(1, 1, mount()),
            LogEntry::command(
                2,
                1,
                load(
                    1,
                    vec![
                        entry("b", FileKind::Directory, 0),
                        entry("a.bin", FileKind::File, 3000),
                    ],
                ),
            ),
        ];
        let a = NamespaceStore::open(&tmp.path().join("a.redb"), 0).unwrap();
        let b = NamespaceStore::open(&tmp.path().join("b.redb"), 0).unwrap();
        apply_batch(&a, &log).unwrap();
        for e in &log {
            apply_batch(&b, std::slice::from_ref(e)).unwrap();
        }
        assert_eq!(names(&a, 1), names(&b, 1));
        assert_eq!(names(&a, 1), vec![("a.bin".into(), 3), ("b".into(), 2)]);
        let file = a.lookup(1, b"a.bin").unwrap().unwrap();
        assert_eq!(
            (file.size, file.block_size, file.ufs_path.as_slice()),
            (3000, 1024, &b"a.bin"[..])
        );
        assert!(a.get(1).unwrap().children_loaded);

        // Replaying old entries is a no-op; the applied index is durable.
        apply_batch(&a, &log).unwrap();
        assert_eq!(a.inode_count().unwrap(), 3);
        drop(a);
        let a = NamespaceStore::open(&tmp.path().join("a.redb"), 0).unwrap();
        assert_eq!(a.applied().unwrap().0, 2);
        assert_eq!(names(&a, 1), names(&b, 1));
        drop(b);
        assert!(matches!(
            NamespaceStore::open(&tmp.path().join("b.redb"), 3),
            Err(StoreError::ShardMismatch {
                found: 0,
                configured: 3
            })
        ));
    }

    #[test]
    fn relisting_keeps_ids_and_drops_vanished_subtrees() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 2).unwrap();
        let root = s.root_id();
        apply_batch(&s, &[LogEntry::command(1, 1, mount())]).unwrap();
        apply_batch(
            &s,
            &[LogEntry::command(
                2,
                1,
                load(
                    root,
                    vec![
                        entry("d", FileKind::Directory, 0),
                        entry("f", FileKind::File, 1),
                    ],
                ),
            )],
        )
        .unwrap();
        let d = s.lookup(root, b"d").unwrap().unwrap();
        assert_eq!(granary_common::ids::shard_of(d.id), 2);
        apply_batch(
            &s,
            &[LogEntry::command(
                3,
                1,
                load(d.id, vec![entry("x", FileKind::File, 5)]),
            )],
        )
        .unwrap();
        assert_eq!(s.inode_count().unwrap(), 4);

        // `f` grew, `d` vanished (with its child), `g` appeared.
        let f_before = s.lookup(root, b"f").unwrap().unwrap();
        apply_batch(
            &s,
            &[LogEntry::command(
                4,
                1,
                load(
                    root,
                    vec![entry("f", FileKind::File, 9), entry("g", FileKind::File, 0)],
                ),
            )],
        )
        .unwrap();
        let f_after = s.lookup(root, b"f").unwrap().unwrap();
        assert_eq!(f_after.id, f_before.id);
        assert_eq!(f_after.fingerprint.unwrap().size, 9);
        assert!(s.lookup(root, b"d").unwrap().is_none());
        assert!(s.get(d.id).is_err());
        assert_eq!(s.inode_count().unwrap(), 3);

        // A failing command still consumes its index.
        let r = apply_batch(&s, &[LogEntry::command(5, 1, load(12345, vec![]))]).unwrap();
        assert_eq!(r[0].as_ref().unwrap_err().errno(), libc::ENOENT);
        assert_eq!(s.applied().unwrap().0, 5);
    }

    #[test]
    fn a_symlink_pointing_elsewhere_is_a_new_inode() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        let root = s.root_id();
        let link = |target: &str| UfsEntry {
            symlink_target: target.as_bytes().to_vec(),
            ..entry("latest", FileKind::Symlink, target.len() as u64)
        };
        apply_batch(&s, &[LogEntry::command(1, 1, mount())]).unwrap();
        apply_batch(
            &s,
            &[LogEntry::command(2, 1, load(root, vec![link("run-1")]))],
        )
        .unwrap();
        let before = s.lookup(root, b"latest").unwrap().unwrap();
        apply_batch(
            &s,
            &[LogEntry::command(3, 1, load(root, vec![link("run-1")]))],
        )
        .unwrap();
        assert_eq!(s.lookup(root, b"latest").unwrap().unwrap().id, before.id);
        apply_batch(
            &s,
            &[LogEntry::command(4, 1, load(root, vec![link("run-2")]))],
        )
        .unwrap();
        let after = s.lookup(root, b"latest").unwrap().unwrap();
        assert_ne!(after.id, before.id);
        assert_eq!(after.symlink_target, b"run-2");
        assert!(s.get(before.id).is_err());
    }

    #[test]
    fn a_listing_in_parts_ends_where_one_command_would() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        apply_batch(&s, &[LogEntry::command(1, 1, mount())]).unwrap();
        let files = |names: &[&str]| -> Vec<UfsEntry> {
            names.iter().map(|n| entry(n, FileKind::File, 1)).collect()
        };
        apply_batch(
            &s,
            &[LogEntry::command(
                2,
                1,
                load(1, files(&["a", "b", "c", "d"])),
            )],
        )
        .unwrap();
        let a = s.lookup(1, b"a").unwrap().unwrap();
        // Relisted in two parts: `c` and `d` are gone from the UFS, `e` and `f` are new.
        let part = |entries, partial, removed: &[&str]| Command {
            op: Some(command::Op::LoadDirectory(LoadDirectory {
                dir_id: 1,
                entries,
                listed_at_ns: 9,
                partial,
                explicit_removals: !partial,
                removed: removed.iter().map(|n| n.as_bytes().to_vec()).collect(),
                routing_version: 0,
            })),
        };
        apply_batch(
            &s,
            &[LogEntry::command(3, 1, part(files(&["a", "e"]), true, &[]))],
        )
        .unwrap();
        assert_eq!(
            s.get(1).unwrap().listed_at_ns,
            1,
            "not listed until the last part"
        );
        assert!(
            s.lookup(1, b"c").unwrap().is_some(),
            "a part removes nothing"
        );
        apply_batch(
            &s,
            &[LogEntry::command(
                4,
                1,
                part(files(&["b", "f"]), false, &["c", "d"]),
            )],
        )
        .unwrap();
        let now: Vec<String> = names(&s, 1).into_iter().map(|(n, _)| n).collect();
        assert_eq!(now, ["a", "b", "e", "f"]);
        assert_eq!(s.lookup(1, b"a").unwrap().unwrap().id, a.id, "ids are kept");
        assert_eq!(s.get(1).unwrap().listed_at_ns, 9);
        assert_eq!(s.inode_count().unwrap(), 5);
    }

    #[test]
    fn listing_pages_resume_after_a_name() {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        apply_batch(&s, &[LogEntry::command(1, 1, mount())]).unwrap();
        let entries = (0..10)
            .map(|i| entry(&format!("f{i}"), FileKind::File, i))
            .collect();
        apply_batch(&s, &[LogEntry::command(2, 1, load(1, entries))]).unwrap();
        let (page, more) = s.list(1, b"", 4).unwrap();
        assert!(more);
        let (rest, more) = s.list(1, &page.last().unwrap().name, 100).unwrap();
        assert!(!more);
        assert_eq!(page.len() + rest.len(), 10);
        assert_eq!(rest[0].name, b"f4");
    }
}
