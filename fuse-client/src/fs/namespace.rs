//! Names and attributes: lookups, attributes, links, directories and their listings.

use granary_common::path::validate_name;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{
    CreateRequest, FileKind, Inode, LinkRequest, RenameRequest, SetAttributes,
};

use super::{entry_key, is_dir, DirEntry, DirStream, GranaryFs, SetAttr};
use std::sync::{Arc, Mutex};

/// Directory entries fetched per metadata call.
const READDIR_PAGE: u32 = 1024;

fn symlink_target(i: Inode) -> FsResult<Vec<u8>> {
    if i.kind != FileKind::Symlink as i32 {
        return Err(FsError::InvalidArgument("not a symbolic link".into()));
    }
    Ok(i.symlink_target)
}

impl GranaryFs {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Inode> {
        validate_name(name)?;
        if let Some(id) = self.entries.get(&entry_key(parent, name)) {
            if self.attrs.contains_key(&id) {
                return self.current(id);
            }
        }
        let inode = self.meta.lookup(parent, name)?;
        self.remember(&inode);
        Ok(self.overlay(inode))
    }

    /// [`Self::lookup`] if the mount's caches answer it without waiting.
    pub fn lookup_cached(&self, parent: u64, name: &[u8]) -> Option<Inode> {
        self.cached(self.entries.get(&entry_key(parent, name))?)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Inode> {
        self.current(ino)
    }

    /// [`Self::getattr`] if the mount's caches answer it without waiting.
    pub fn getattr_cached(&self, ino: u64) -> Option<Inode> {
        self.cached(ino)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        symlink_target(self.getattr(ino)?)
    }

    /// [`Self::readlink`] if the mount's caches answer it without waiting.
    pub fn readlink_cached(&self, ino: u64) -> Option<FsResult<Vec<u8>>> {
        Some(symlink_target(self.cached(ino)?))
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
            // Times set explicitly (utimensat, `tar`, `cp -p` on an open file) stay:
            // the commit at close keeps them.
            if a.mtime_ns.is_some() {
                if let Some(st) = self.staging.get(ino) {
                    st.lock().modified_ns = None;
                }
            }
        }
        self.getattr(ino)
    }

    fn make(&self, req: CreateRequest) -> FsResult<Inode> {
        self.writable()?;
        validate_name(&req.name)?;
        let inode = self.meta.create(req)?;
        self.remember(&inode);
        self.dir_changed(inode.parent);
        if is_dir(&inode) {
            self.subdirs_changed(inode.parent, 1);
        }
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
            rdev: 0,
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
            rdev: 0,
        })
    }

    /// mknod(2) of a fifo, socket or device (kept in the namespace only); a regular file
    /// is created empty and closed.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> FsResult<Inode> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            0 | libc::S_IFREG => {
                let (inode, fh) =
                    self.create(parent, name, mode & 0o7777, libc::O_EXCL, uid, gid)?;
                self.release(fh);
                return Ok(inode);
            }
            other => {
                return Err(FsError::InvalidArgument(format!(
                    "mknod of file type {other:o}"
                )))
            }
        };
        self.make(CreateRequest {
            parent,
            name: name.to_vec(),
            kind: kind as i32,
            mode: mode & 0o7777,
            uid,
            gid,
            symlink_target: Vec::new(),
            rdev: match kind {
                FileKind::CharDevice | FileKind::BlockDevice => rdev,
                _ => 0,
            },
        })
    }

    /// link(2): `new_name` in `new_parent` names file `ino` too.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Inode> {
        self.writable()?;
        validate_name(new_name)?;
        let inode = self.meta.link(LinkRequest {
            id: ino,
            new_parent,
            new_name: new_name.to_vec(),
        })?;
        self.remember(&inode);
        self.dir_changed(new_parent);
        Ok(self.overlay(inode))
    }

    /// unlink(2) (`directory` false) or rmdir(2).
    pub fn remove(&self, parent: u64, name: &[u8], directory: bool) -> FsResult<()> {
        self.writable()?;
        validate_name(name)?;
        let victim = self.entries.get(&entry_key(parent, name));
        let single = victim.is_some_and(|id| self.has_one_name(id));
        let kept = victim.filter(|&id| self.keep_for_descriptors(id, single));
        if let Err(e) = self.meta.remove(parent, name, directory) {
            kept.into_iter().for_each(|id| self.let_go(id));
            return Err(e);
        }
        self.forget_entry(parent, name);
        if directory {
            self.subdirs_changed(parent, -1);
        }
        if let Some(id) = victim {
            self.lost_a_name(id, single);
        }
        Ok(())
    }

    /// File `ino`, open here, is about to lose its last name (`single`: known to have
    /// no other) and its UFS object with it: its content is copied into a staged file its
    /// descriptors read from until the last closes (as a local filesystem keeps an
    /// unlinked open file). False when it is not open here or keeps other names (or
    /// cannot be copied: then reads of what no cache holds fail with EIO).
    fn keep_for_descriptors(&self, ino: u64, single: bool) -> bool {
        if self
            .opened_inode(ino)
            .is_none_or(|i| i.kind != FileKind::File as i32)
        {
            return false;
        }
        if !single && self.meta.getattr(ino).is_ok_and(|i| !i.links.is_empty()) {
            return false;
        }
        let Ok(st) = self.staging.attach(ino) else {
            return false;
        };
        let mut s = st.lock();
        let filled = self.fill(ino, &mut s);
        if let Err(e) = &filled {
            tracing::warn!(ino, error = %e, "cannot keep the content of an open file losing its last name");
        }
        // Held once: a use taken by an earlier keep stays the only one.
        let hold = filled.is_ok() && !s.kept;
        s.kept |= hold;
        drop(s);
        if !hold {
            self.staging.detach(ino);
        }
        filled.is_ok()
    }

    /// Drops what [`Self::keep_for_descriptors`] held for `ino`.
    pub(super) fn let_go(&self, ino: u64) {
        let Some(st) = self.staging.get(ino) else {
            return;
        };
        let was = std::mem::take(&mut st.lock().kept);
        if was {
            self.staging.detach(ino);
        }
    }

    /// Whether file `ino` is known to have no name besides the one about to go.
    fn has_one_name(&self, ino: u64) -> bool {
        self.attrs.get(&ino).is_some_and(|i| i.links.is_empty())
    }

    /// File `ino` lost a name. Known to have had no other and not open for writing
    /// here: nothing to do. Otherwise the masters say whether it lives on (its new link
    /// count), since a writer here must not drop its changes for a file that still has a
    /// name (another mount may have linked it since this one cached it).
    fn lost_a_name(&self, ino: u64, single: bool) {
        if single && self.staging.get(ino).is_none() {
            return;
        }
        match self.meta.getattr(ino) {
            Ok(now) => self.attrs.insert(ino, now),
            Err(FsError::NotFound(_)) => self.unlinked(ino),
            // Not known: its writes are still committed at close (a commit to a file
            // that is gone fails and says so).
            Err(e) => {
                tracing::warn!(ino, error = %e, "cannot tell whether a file open here lost its last name")
            }
        }
    }

    /// A file open for writing here lost its name: its last close must not bring it back
    /// in the UFS. (The kernel looks a name up before removing or replacing it, so an
    /// open file's entry is in the cache; no metadata call is needed.)
    fn unlinked(&self, ino: u64) {
        if let Some(st) = self.staging.get(ino) {
            st.lock().unlinked = true;
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
        let replaced = self.entries.get(&entry_key(new_parent, new_name));
        let single = replaced.is_some_and(|id| self.has_one_name(id));
        let kept = replaced.filter(|&id| self.keep_for_descriptors(id, single));
        // Whether the replaced entry is a directory (None: not known here).
        let replaced_dir = match replaced {
            Some(id) => self.attrs.get(&id).map(|i| is_dir(&i)),
            None => Some(false),
        };
        let moved = match self.meta.rename(RenameRequest {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            no_replace,
        }) {
            Ok(moved) => moved,
            Err(e) => {
                kept.into_iter().for_each(|id| self.let_go(id));
                return Err(e);
            }
        };
        // Renamed over another name of itself: nothing was lost.
        if let Some(id) = kept.filter(|&id| id == moved.id) {
            self.let_go(id);
        }
        self.forget_entry(parent, name);
        self.forget_entry(new_parent, new_name);
        if let Some(id) = replaced.filter(|&id| id != moved.id) {
            self.lost_a_name(id, single);
            match replaced_dir {
                Some(true) => self.subdirs_changed(new_parent, -1),
                Some(false) => {}
                None => self.attrs.invalidate(&new_parent),
            }
        }
        if is_dir(&moved) && parent != new_parent {
            self.subdirs_changed(parent, -1);
            self.subdirs_changed(new_parent, 1);
        }
        self.remember(&moved);
        Ok(())
    }

    /// A handle for listing `ino`, and whether the directory's record is as it was at
    /// its last opendir here (the kernel may then keep its cached listing).
    pub fn opendir(&self, ino: u64) -> FsResult<(u64, bool)> {
        let dir = self.getattr(ino)?;
        self.open_dir(ino, dir)
    }

    /// [`Self::opendir`] if the mount's caches answer it without waiting.
    pub fn opendir_cached(&self, ino: u64) -> Option<FsResult<(u64, bool)>> {
        Some(self.open_dir(ino, self.cached(ino)?))
    }

    fn open_dir(&self, ino: u64, dir: Inode) -> FsResult<(u64, bool)> {
        if !is_dir(&dir) {
            return Err(FsError::NotDir(
                String::from_utf8_lossy(&dir.name).into_owned(),
            ));
        }
        // Entries added or removed move the times; a re-listing moves listed_at.
        let version = (dir.mtime_ns, dir.ctime_ns, dir.listed_at_ns, dir.subdirs);
        let unchanged = self.listed_versions.get(&ino) == Some(version);
        if !unchanged {
            self.listed_versions.insert(ino, version);
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
        Ok((fh, unchanged))
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
                    attrs_current: true,
                }),
                1 => {
                    let parent = self.getattr(s.dir.parent).unwrap_or_else(|_| s.dir.clone());
                    out.push(DirEntry {
                        inode: parent,
                        name: b"..".to_vec(),
                        offset: 2,
                        attrs_current: true,
                    });
                }
                _ => {
                    let i = (pos - 2) as usize;
                    while i >= s.entries.len() && !s.complete {
                        let after = s
                            .entries
                            .last()
                            .map(|e| e.0.name.clone())
                            .unwrap_or_default();
                        let (page, more) = self.meta.readdir(s.dir.id, &after, READDIR_PAGE)?;
                        for e in &page {
                            self.remember(e);
                        }
                        s.complete = !more || page.is_empty();
                        s.entries
                            .extend(page.into_iter().map(|e| self.overlay_now(e)));
                    }
                    let Some((e, current)) = s.entries.get(i) else {
                        break;
                    };
                    out.push(DirEntry {
                        inode: e.clone(),
                        name: e.name.clone(),
                        offset: pos + 1,
                        attrs_current: *current,
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

    /// fsync(2) of a directory: its entries in the UFS (the names created, renamed and
    /// removed in it) become durable; in the namespace they are already.
    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        match self.read_only {
            true => Ok(()),
            false => self.meta.sync(ino),
        }
    }
}
