//! The namespace state machine: a pure function from (state, command) to state. It does
//! no I/O beyond the store's transaction (the leader lists the UFS before proposing), so
//! every replica applying the same log reaches the same state, inode ids included.

use std::collections::BTreeMap;

use granary_common::ids::{inode_id, root_inode};
use granary_common::path::{join, validate_name};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    command, Command, CommitContent, CreateInode, FileKind, Inode, LoadDirectory, MountTable,
    RemoveEntry, RenameEntry, SetAttributes, SetMount, UfsFingerprint,
};
use prost::Message;
use redb::{ReadableTable, Table};

use crate::store::{
    child_key, decode_inode, meta_u64, redb_err, StoreError, META_INODE_COUNT, META_MOUNTS,
    META_NEXT_LOCAL_ID,
};

const META_BLOCK_SIZE: &str = "block_size";

pub(crate) struct Tables<'t> {
    pub inodes: Table<'t, u64, &'static [u8]>,
    pub children: Table<'t, &'static [u8], u64>,
    pub meta: Table<'t, &'static str, &'static [u8]>,
    pub shard: u16,
}

impl Tables<'_> {
    fn get(&self, id: u64) -> Result<Option<Inode>, StoreError> {
        match redb_err!(self.inodes.get(id))? {
            Some(v) => Ok(Some(decode_inode(v.value())?)),
            None => Ok(None),
        }
    }

    fn put(&mut self, inode: &Inode) -> Result<(), StoreError> {
        redb_err!(self
            .inodes
            .insert(inode.id, inode.encode_to_vec().as_slice()))?;
        Ok(())
    }

    fn set_u64(&mut self, key: &str, v: u64) -> Result<(), StoreError> {
        redb_err!(self.meta.insert(key, &v.to_be_bytes()[..]))?;
        Ok(())
    }

    fn add_count(&mut self, delta: i64) -> Result<(), StoreError> {
        let n = meta_u64(&self.meta, META_INODE_COUNT)? as i64 + delta;
        self.set_u64(META_INODE_COUNT, n.max(0) as u64)
    }

    fn allocate_id(&mut self) -> Result<u64, StoreError> {
        // Local ids start after the root's.
        let next = meta_u64(&self.meta, META_NEXT_LOCAL_ID)?.max(2);
        self.set_u64(META_NEXT_LOCAL_ID, next + 1)?;
        Ok(inode_id(self.shard, next))
    }

    fn children_of(&self, parent: u64) -> Result<BTreeMap<Vec<u8>, u64>, StoreError> {
        let lower = child_key(parent, b"");
        let upper = (parent + 1).to_be_bytes();
        let mut out = BTreeMap::new();
        for item in redb_err!(self.children.range(lower.as_slice()..&upper[..]))? {
            let (k, v) = redb_err!(item)?;
            out.insert(k.value()[8..].to_vec(), v.value());
        }
        Ok(out)
    }

    fn remove_subtree(&mut self, parent: u64, name: &[u8], id: u64) -> Result<(), StoreError> {
        redb_err!(self.children.remove(child_key(parent, name).as_slice()))?;
        let mut stack = vec![id];
        let mut removed = 0i64;
        while let Some(id) = stack.pop() {
            for (name, child) in self.children_of(id)? {
                redb_err!(self.children.remove(child_key(id, &name).as_slice()))?;
                stack.push(child);
            }
            redb_err!(self.inodes.remove(id))?;
            removed += 1;
        }
        self.add_count(-removed)
    }
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
        None => Ok(Err(FsError::InvalidPath("empty command".into()))),
    }
}

fn set_mount(t: &mut Tables<'_>, m: &SetMount) -> Result<FsResult<()>, StoreError> {
    let Some(mount) = &m.mount else {
        return Ok(Err(FsError::InvalidPath(
            "mount without a mount point".into(),
        )));
    };
    if mount.path != b"/" {
        return Ok(Err(FsError::Unsupported(
            "only the namespace root can be mounted".into(),
        )));
    }
    let mut table = match redb_err!(t.meta.get(META_MOUNTS))? {
        Some(v) => MountTable::decode(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        None => MountTable::default(),
    };
    table
        .mounts
        .retain(|x| x.mount_id != mount.mount_id && x.path != mount.path);
    table.mounts.push(mount.clone());
    redb_err!(t.meta.insert(META_MOUNTS, table.encode_to_vec().as_slice()))?;
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
    let Some(mut dir) = t.get(l.dir_id)? else {
        return Ok(Err(FsError::NotFound(format!("directory {:#x}", l.dir_id))));
    };
    if dir.kind != FileKind::Directory as i32 {
        return Ok(Err(FsError::NotDir(format!("inode {:#x}", l.dir_id))));
    }
    let block_size = meta_u64(&t.meta, META_BLOCK_SIZE)?;
    let mut existing = t.children_of(dir.id)?;
    let mut added = 0i64;
    for e in &l.entries {
        // A UFS name we cannot represent is skipped on every replica alike.
        if validate_name(&e.name).is_err() {
            continue;
        }
        let fingerprint = UfsFingerprint {
            size: e.size,
            mtime_ns: e.mtime_ns,
        };
        let previous = match existing.remove(&e.name) {
            Some(id) => match t.get(id)? {
                Some(old) if old.kind == e.kind => Some(old),
                Some(_) => {
                    t.remove_subtree(dir.id, &e.name, id)?;
                    None
                }
                None => None,
            },
            None => None,
        };
        let inode = match previous {
            Some(mut old) => {
                old.size = if e.kind == FileKind::Directory as i32 {
                    0
                } else {
                    e.size
                };
                old.mtime_ns = e.mtime_ns;
                // The mode stays: Granary's namespace owns permissions once it knows them.
                old.symlink_target = e.symlink_target.clone();
                old.fingerprint = Some(fingerprint);
                old
            }
            None => {
                let id = t.allocate_id()?;
                redb_err!(t.children.insert(child_key(dir.id, &e.name).as_slice(), id))?;
                added += 1;
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
                    symlink_target: e.symlink_target.clone(),
                    block_size,
                    fingerprint: Some(fingerprint),
                    mount_id: dir.mount_id,
                    ufs_path: join(&dir.ufs_path, &e.name),
                    ..Default::default()
                }
            }
        };
        t.put(&inode)?;
    }
    // Whatever the UFS no longer lists is gone, except entries created through Granary
    // that have not reached the UFS yet (no fingerprint).
    for (name, id) in existing {
        let created_here = t.get(id)?.is_some_and(|i| i.fingerprint.is_none());
        if !created_here {
            t.remove_subtree(dir.id, &name, id)?;
        }
    }
    t.add_count(added)?;
    dir.children_loaded = true;
    dir.listed_at_ns = l.listed_at_ns;
    t.put(&dir)?;
    Ok(Ok(()))
}

fn create_inode(t: &mut Tables<'_>, c: &CreateInode) -> Result<FsResult<()>, StoreError> {
    if let Err(e) = validate_name(&c.name) {
        return Ok(Err(e));
    }
    let Some(dir) = t.get(c.parent)? else {
        return Ok(Err(FsError::NotFound(format!("directory {:#x}", c.parent))));
    };
    if dir.kind != FileKind::Directory as i32 {
        return Ok(Err(FsError::NotDir(
            String::from_utf8_lossy(&dir.name).into_owned(),
        )));
    }
    let key = child_key(dir.id, &c.name);
    if redb_err!(t.children.get(key.as_slice()))?.is_some() {
        return Ok(Err(FsError::Exists(
            String::from_utf8_lossy(&c.name).into_owned(),
        )));
    }
    let id = t.allocate_id()?;
    redb_err!(t.children.insert(key.as_slice(), id))?;
    let block_size = meta_u64(&t.meta, META_BLOCK_SIZE)?;
    t.put(&Inode {
        id,
        parent: dir.id,
        name: c.name.clone(),
        kind: c.kind,
        size: c.symlink_target.len() as u64,
        mode: c.mode & 0o7777,
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
    })?;
    t.add_count(1)?;
    touch_dir(t, dir, c.mtime_ns)?;
    Ok(Ok(()))
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// A directory's entries changed: its mtime and ctime move.
fn touch_dir(t: &mut Tables<'_>, mut dir: Inode, now_ns: i64) -> Result<(), StoreError> {
    dir.mtime_ns = now_ns;
    dir.ctime_ns = now_ns;
    t.put(&dir)
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
    match redb_err!(t.children.get(child_key(parent, name).as_slice()))? {
        Some(id) => t.get(id.value()),
        None => Ok(None),
    }
}

fn has_children(t: &Tables<'_>, dir: u64) -> Result<bool, StoreError> {
    let lower = child_key(dir, b"");
    let upper = (dir + 1).to_be_bytes();
    Ok(redb_err!(t.children.range(lower.as_slice()..&upper[..]))?
        .next()
        .is_some())
}

/// Unlinks `victim` from `parent` (it must be a file, a symlink or an empty directory).
fn unlink(t: &mut Tables<'_>, parent: u64, victim: &Inode) -> Result<(), StoreError> {
    redb_err!(t
        .children
        .remove(child_key(parent, &victim.name).as_slice()))?;
    redb_err!(t.inodes.remove(victim.id))?;
    t.add_count(-1)
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
    if is_dir && has_children(t, victim.id)? {
        return Ok(Err(FsError::NotEmpty(shown(&r.name))));
    }
    unlink(t, dir.id, &victim)?;
    touch_dir(t, dir, r.now_ns)?;
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
    let moving_dir = moving.kind == FileKind::Directory as i32;
    if moving_dir {
        // A directory cannot move beneath itself.
        let mut up = to_dir.id;
        loop {
            if up == moving.id {
                return Ok(Err(FsError::InvalidPath(format!(
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
        if target.id == moving.id {
            return Ok(Ok(()));
        }
        if r.no_replace {
            return Ok(Err(FsError::Exists(shown(&r.new_name))));
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
        unlink(t, to_dir.id, &target)?;
    }
    redb_err!(t
        .children
        .remove(child_key(from_dir.id, &r.name).as_slice()))?;
    redb_err!(t
        .children
        .insert(child_key(to_dir.id, &r.new_name).as_slice(), moving.id))?;
    moving.parent = to_dir.id;
    moving.name = r.new_name.clone();
    moving.ufs_path = join(&to_dir.ufs_path, &r.new_name);
    moving.ctime_ns = r.now_ns;
    t.put(&moving)?;
    if moving_dir {
        move_subtree_paths(t, &moving)?;
    }
    let same_dir = from_dir.id == to_dir.id;
    touch_dir(t, from_dir, r.now_ns)?;
    if !same_dir {
        // Re-read: the source directory's update may be this one's ancestor chain only.
        if let Some(d) = t.get(to_dir.id)? {
            touch_dir(t, d, r.now_ns)?;
        }
    }
    Ok(Ok(()))
}

fn set_attributes(t: &mut Tables<'_>, a: &SetAttributes) -> Result<FsResult<()>, StoreError> {
    let Some(mut inode) = t.get(a.id)? else {
        return Ok(Err(FsError::NotFound(format!("inode {:#x}", a.id))));
    };
    if let Some(mode) = a.mode {
        inode.mode = mode & 0o7777;
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
    inode.mtime_ns = c.mtime_ns;
    inode.ctime_ns = c.mtime_ns;
    t.put(&inode)?;
    Ok(Ok(()))
}
