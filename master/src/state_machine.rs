//! The namespace state machine: a pure function from (state, command) to state. It does
//! no I/O beyond the store's transaction (the leader lists the UFS before proposing), so
//! every replica applying the same log reaches the same state, inode ids included.

use std::collections::BTreeMap;

use granary_common::ids::{inode_id, root_inode};
use granary_common::path::{join, validate_name};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    command, Command, CreateInode, FileKind, Inode, LoadDirectory, MountTable, SetMount,
    UfsFingerprint,
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
                old.mode = e.mode;
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
        mode: c.mode & 0o7777,
        uid: c.uid,
        gid: c.gid,
        mtime_ns: c.mtime_ns,
        symlink_target: c.symlink_target.clone(),
        block_size,
        children_loaded: c.kind == FileKind::Directory as i32,
        mount_id: dir.mount_id,
        ufs_path: join(&dir.ufs_path, &c.name),
        ..Default::default()
    })?;
    t.add_count(1)?;
    Ok(Ok(()))
}
