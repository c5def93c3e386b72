//! Names and attributes: lookups, attributes, links, directories and their listings.

use granary_common::path::validate_name;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{CreateRequest, FileKind, Inode, RenameRequest, SetAttributes};

use super::{is_dir, DirEntry, DirStream, GranaryFs, SetAttr};
use std::sync::{Arc, Mutex};

/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 1024;

impl GranaryFs {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        validate_name(name)?;
        if let Some(id) = self.entries.get(&(parent, name.to_vec())) {
            if self.attrs.contains_key(&id) {
                return self.current(id);
            }
        }
        let inode = self.meta.lookup(parent, name)?;
        self.remember(&inode);
        Ok(self.overlay(inode))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Inode> {
        self.current(ino)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let i = self.getattr(ino)?;
        if i.kind != FileKind::Symlink as i32 {
            return Err(FsError::InvalidArgument("not a symbolic link".into()));
        }
        Ok(i.symlink_target)
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr) -> FsResult<Inode> {
        self.writable()?;
        if let Some(size) = a.size {
            self.truncate(ino, size)?;
        }
        if a.mode.is_some()
            || a.uid.is_some()
            || a.gid.is_some()
            || a.atime_ns.is_some()
            || a.mtime_ns.is_some()
        {
            let inode = self.meta.set_attr(SetAttributes {
                id: ino,
                mode: a.mode,
                uid: a.uid,
                gid: a.gid,
                atime_ns: a.atime_ns,
                mtime_ns: a.mtime_ns,
                now_ns: 0,
            })?;
            self.remember(&inode);
        }
        self.getattr(ino)
    }

    fn make(&self, req: CreateRequest) -> FsResult<Inode> {
        self.writable()?;
        validate_name(&req.name)?;
        let inode = self.meta.create(req)?;
        self.remember(&inode);
        self.dir_changed(inode.parent);
        Ok(inode)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Inode> {
        self.make(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: FileKind::Directory as i32,
            mode,
            uid,
            gid,
            symlink_target: Vec::new(),
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Inode> {
        self.make(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: FileKind::Symlink as i32,
            mode: 0o777,
            uid,
            gid,
            symlink_target: target.to_vec(),
        })
    }

    /// unlink(2) (`directory` false) or rmdir(2).
    pub fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        self.writable()?;
        validate_name(name)?;
        let victim = self.entries.get(&(parent, name.to_vec()));
        self.meta.remove(parent, name, directory)?;
        self.forget_entry(parent, name);
        if let Some(id) = victim {
            self.unlinked(id);
        }
        Ok(())
    }

    /// A file open for writing here lost its name: its last close must not bring it back
    /// in the UFS. (The kernel looks a name up before removing or replacing it, so an
    /// open file's entry is in the cache; no metadata call is needed.)
    fn unlinked(&self, ino: u64) {
        if let Some(st) = self.staging.get(ino) {
            st.lock().expect("staged lock").unlinked = true;
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> FsResult<()> {
        self.writable()?;
        validate_name(name)?;
        validate_name(new_name)?;
        let replaced = self.entries.get(&(new_parent, new_name.to_vec()));
        let moved = self.meta.rename(RenameRequest {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            no_replace,
        })?;
        self.forget_entry(parent, name);
        self.forget_entry(new_parent, new_name);
        if let Some(id) = replaced.filter(|&id| id != moved.id) {
            self.unlinked(id);
        }
        self.remember(&moved);
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let dir = self.getattr(ino)?;
        if !is_dir(&dir) {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        let fh = self.handle();
        let stream = DirStream {
            dir,
            entries: Vec::new(),
            complete: false,
        };
        self.dirs
            .write()
            .expect("dirs lock")
            .insert(fh, Arc::new(Mutex::new(stream)));
        Ok(fh)
    }

    /// Entries from position `offset` on (0 is `.`, 1 is `..`), at most `max`.
    pub fn readdir(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let stream = self
            .dirs
            .read()
            .expect("dirs lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::BadHandle(format!("unknown directory handle {fh}")))?;
        let mut s = stream.lock().expect("dir stream lock");
        let mut out = Vec::new();
        let mut pos = offset;
        while out.len() < max {
            match pos {
                0 => out.push(DirEntry {
                    inode: s.dir.clone(),
                    name: b".".to_vec(),
                    offset: 1,
                }),
                1 => {
                    let parent = self.getattr(s.dir.parent).unwrap_or_else(|_| s.dir.clone());
                    out.push(DirEntry {
                        inode: parent,
                        name: b"..".to_vec(),
                        offset: 2,
                    });
                }
                _ => {
                    let i = (pos - 2) as usize;
                    while i >= s.entries.len() && !s.complete {
                        let after = s.entries.last().map(|e| e.name.clone()).unwrap_or_default();
                        let (page, more) = self.meta.readdir(s.dir.id, &after, READDIR_PAGE)?;
                        for e in &page {
                            self.remember(e);
                        }
                        s.complete = !more || page.is_empty();
                        s.entries.extend(page.into_iter().map(|e| self.overlay(e)));
                    }
                    let Some(e) = s.entries.get(i) else { break };
                    out.push(DirEntry {
                        inode: e.clone(),
                        name: e.name.clone(),
                        offset: pos + 1,
                    });
                }
            }
            pos += 1;
        }
        Ok(out)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().expect("dirs lock").remove(&fh);
    }
}
