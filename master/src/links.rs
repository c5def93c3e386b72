//! Names and link counts in the state machine. A file may have several names (hard
//! links): the inode keeps its first name as (parent, name), the one its UFS object is
//! under, and the others in `links`. Removing the name the object is under moves it to
//! the next name (the leader renames the UFS object first, see `mutations.rs`), so the
//! UFS stays a readable tree; the inode and its object go with the last name. A
//! directory counts its subdirectories, for its link count (2 + that).

use granary_common::path::{join, validate_name};
use granary_common::{FsError, FsResult};
use granary_protos::v1::{FileKind, Inode, Link, LinkEntry};

use crate::state_machine::check_new_entry;
use crate::store::{child_key, StoreError, Tables};

/// Most names one file may have (link(2) answers EMLINK beyond).
pub const MAX_LINKS: usize = 65_000;

/// Whether (`parent`, `name`) is the name `inode`'s UFS object is under.
pub fn is_primary(inode: &Inode, parent: u64, name: &[u8]) -> bool {
    inode.parent == parent && inode.name == name
}

/// The names `inode` has besides its primary one.
pub fn other_names(inode: &Inode) -> impl Iterator<Item = (u64, &[u8])> {
    inode.links.iter().map(|l| (l.parent, l.name.as_slice()))
}

/// The UFS path a file's object moves to when its primary name goes: its next name's.
pub fn next_primary_path(t: &Tables<'_>, inode: &Inode) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(next) = inode.links.first() else {
        return Ok(None);
    };
    Ok(t.get(next.parent)?
        .map(|dir| join(&dir.ufs_path, &next.name)))
}

impl Tables<'_> {
    /// Adds `delta` to directory `dir`'s subdirectory count.
    pub(crate) fn adjust_subdirs(&mut self, dir: u64, delta: i64) -> Result<(), StoreError> {
        if let Some(mut d) = self.get(dir)? {
            d.subdirs = (d.subdirs as i64 + delta).max(0) as u64;
            self.put(&d)?;
        }
        Ok(())
    }

    /// Removes the entry (`parent`, `name`) of `victim` (a file, special file, symlink or
    /// an empty directory): the inode goes with its last name; the primary name passes
    /// to the next one.
    pub(crate) fn unlink_name(
        &mut self,
        parent: u64,
        name: &[u8],
        victim: &Inode,
        now_ns: i64,
    ) -> Result<(), StoreError> {
        self.children.remove(&child_key(parent, name))?;
        if victim.kind == FileKind::Directory as i32 {
            self.adjust_subdirs(parent, -1)?;
        }
        if victim.links.is_empty() {
            self.inodes.remove(victim.id)?;
            return self.add_count(-1);
        }
        let mut kept = victim.clone();
        if is_primary(victim, parent, name) {
            let path = next_primary_path(self, victim)?.unwrap_or_default();
            let next = kept.links.remove(0);
            kept.parent = next.parent;
            kept.name = next.name;
            kept.ufs_path = path;
        } else {
            kept.links
                .retain(|l| !(l.parent == parent && l.name == name));
        }
        kept.ctime_ns = now_ns;
        self.put(&kept)
    }

    /// Drops `inode` and every name it has (its UFS object is gone).
    pub(crate) fn forget_inode(&mut self, inode: &Inode) -> Result<(), StoreError> {
        for (parent, name) in other_names(inode) {
            self.children.remove(&child_key(parent, name))?;
        }
        self.children
            .remove(&child_key(inode.parent, &inode.name))?;
        self.inodes.remove(inode.id)?;
        self.add_count(-1)
    }
}

/// link(2): a new name for an existing file, in the namespace only.
pub fn link_entry(t: &mut Tables<'_>, l: &LinkEntry) -> Result<FsResult<()>, StoreError> {
    if let Err(e) = validate_name(&l.new_name) {
        return Ok(Err(e));
    }
    let Some(mut inode) = t.get(l.id)? else {
        return Ok(Err(FsError::NotFound(format!("inode {:#x}", l.id))));
    };
    if inode.kind == FileKind::Directory as i32 {
        return Ok(Err(FsError::NotPermitted(
            "hard links to directories are not allowed".into(),
        )));
    }
    let Some(dir) = t.get(l.new_parent)? else {
        return Ok(Err(FsError::NotFound(format!(
            "directory {:#x}",
            l.new_parent
        ))));
    };
    if let Err(e) = check_new_entry(t, &dir, &l.new_name)? {
        return Ok(Err(e));
    }
    if dir.mount_id != inode.mount_id {
        return Ok(Err(FsError::CrossDevice("link across mounts".into())));
    }
    if inode.links.len() + 1 >= MAX_LINKS {
        return Ok(Err(FsError::TooManyLinks(
            String::from_utf8_lossy(&inode.name).into_owned(),
        )));
    }
    t.children
        .insert(&child_key(dir.id, &l.new_name), inode.id)?;
    inode.links.push(Link {
        parent: dir.id,
        name: l.new_name.clone(),
    });
    inode.ctime_ns = l.now_ns;
    t.put(&inode)?;
    let mut dir = dir;
    dir.mtime_ns = l.now_ns;
    dir.ctime_ns = l.now_ns;
    t.put(&dir)?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use crate::state_machine::{apply_batch, LogEntry};
    use crate::store::NamespaceStore;
    use granary_common::FsError;
    use granary_protos::v1::{
        command, Command, CreateInode, FileKind, LinkEntry, LoadDirectory, RemoveEntry,
        RenameEntry, UfsEntry, UfsFingerprint,
    };

    /// A namespace over a mounted root, fed commands one log index at a time.
    struct Ns {
        store: NamespaceStore,
        index: u64,
        _dir: tempfile::TempDir,
    }

    impl Ns {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = NamespaceStore::open(&dir.path().join("ns.redb"), 0).unwrap();
            let mut ns = Ns {
                store,
                index: 0,
                _dir: dir,
            };
            ns.apply(crate::state_machine::tests::mount()).unwrap();
            ns
        }

        fn run(&mut self, op: command::Op) -> Result<(), FsError> {
            self.apply(Command { op: Some(op) })
        }

        fn apply(&mut self, cmd: Command) -> Result<(), FsError> {
            self.index += 1;
            let mut out =
                apply_batch(&self.store, &[LogEntry::command(self.index, 1, cmd)]).unwrap();
            out.remove(0)
        }

        fn make(&mut self, parent: u64, name: &str, kind: FileKind) -> u64 {
            self.run(command::Op::CreateInode(CreateInode {
                parent,
                name: name.into(),
                kind: kind as i32,
                mode: 0o644,
                mtime_ns: 5,
                rdev: if kind == FileKind::CharDevice {
                    0x0103
                } else {
                    0
                },
                ..Default::default()
            }))
            .unwrap();
            self.id(parent, name)
        }

        fn link(&mut self, id: u64, parent: u64, name: &str) -> Result<(), FsError> {
            self.run(command::Op::LinkEntry(LinkEntry {
                id,
                new_parent: parent,
                new_name: name.into(),
                now_ns: 9,
            }))
        }

        fn remove(&mut self, parent: u64, name: &str) -> Result<(), FsError> {
            self.run(command::Op::RemoveEntry(RemoveEntry {
                parent,
                name: name.into(),
                directory: false,
                now_ns: 9,
            }))
        }

        fn rename(&mut self, parent: u64, name: &str, to: u64, new: &str) -> Result<(), FsError> {
            self.run(command::Op::RenameEntry(RenameEntry {
                parent,
                name: name.into(),
                new_parent: to,
                new_name: new.into(),
                ..Default::default()
            }))
        }

        fn id(&self, parent: u64, name: &str) -> u64 {
            self.store
                .lookup(parent, name.as_bytes())
                .unwrap()
                .unwrap()
                .id
        }

        fn nlink(&self, id: u64) -> usize {
            1 + self.store.get(id).unwrap().links.len()
        }

        fn ufs_path(&self, id: u64) -> String {
            String::from_utf8(self.store.get(id).unwrap().ufs_path).unwrap()
        }
    }

    #[test]
    fn names_share_one_inode_and_the_object_follows_the_first_remaining_name() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let d = ns.make(root, "d", FileKind::Directory);
        let f = ns.make(root, "f", FileKind::File);
        ns.link(f, d, "g").unwrap();
        ns.link(f, root, "h").unwrap();
        assert_eq!(ns.nlink(f), 3);
        assert_eq!((ns.id(d, "g"), ns.id(root, "h")), (f, f));
        // Each entry answers with its own name.
        assert_eq!(ns.store.lookup(d, b"g").unwrap().unwrap().name, b"g");
        let listed = ns.store.list(d, b"", 10).unwrap().0;
        assert_eq!((listed[0].id, listed[0].name.as_slice()), (f, &b"g"[..]));

        // The first name goes: the object moves under the next one (d/g).
        ns.remove(root, "f").unwrap();
        assert_eq!(ns.nlink(f), 2);
        assert_eq!(ns.ufs_path(f), "d/g");
        // A link renamed: the object stays where it is.
        ns.rename(root, "h", d, "h2").unwrap();
        assert_eq!(ns.ufs_path(f), "d/g");
        assert_eq!(ns.id(d, "h2"), f);
        // The primary renamed: the object follows.
        ns.rename(d, "g", root, "top").unwrap();
        assert_eq!(ns.ufs_path(f), "top");
        // Renaming one name over another of the same file changes nothing.
        ns.rename(root, "top", d, "h2").unwrap();
        assert_eq!(ns.nlink(f), 2);
        assert_eq!((ns.id(root, "top"), ns.id(d, "h2")), (f, f));

        let count = ns.store.inode_count().unwrap();
        ns.remove(d, "h2").unwrap();
        ns.remove(root, "top").unwrap();
        assert!(
            ns.store.get(f).is_err(),
            "the inode goes with its last name"
        );
        assert_eq!(ns.store.inode_count().unwrap(), count - 1);
    }

    #[test]
    fn rename_over_a_hard_link_removes_only_that_name() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let f = ns.make(root, "f", FileKind::File);
        ns.link(f, root, "f2").unwrap();
        let other = ns.make(root, "other", FileKind::File);
        ns.rename(root, "other", root, "f").unwrap();
        assert_eq!(ns.id(root, "f"), other);
        assert_eq!(ns.nlink(f), 1);
        assert_eq!(ns.ufs_path(f), "f2");
        assert_eq!(ns.ufs_path(other), "f");
    }

    #[test]
    fn link_refuses_directories_existing_names_and_missing_parents() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let d = ns.make(root, "d", FileKind::Directory);
        let f = ns.make(root, "f", FileKind::File);
        let errno = |r: Result<(), FsError>| r.unwrap_err().errno();
        assert_eq!(errno(ns.link(d, root, "d2")), libc::EPERM);
        assert_eq!(errno(ns.link(f, root, "d")), libc::EEXIST);
        assert_eq!(errno(ns.link(f, f, "x")), libc::ENOTDIR);
        assert_eq!(errno(ns.link(f, 999_999, "x")), libc::ENOENT);
        assert_eq!(errno(ns.link(999_999, root, "x")), libc::ENOENT);
        assert_eq!(errno(ns.link(f, root, "a/b")), libc::EINVAL);
        assert_eq!(ns.nlink(f), 1);
    }

    #[test]
    fn directories_count_their_subdirectories() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let subdirs = |ns: &Ns, id| ns.store.get(id).unwrap().subdirs;
        let a = ns.make(root, "a", FileKind::Directory);
        let b = ns.make(root, "b", FileKind::Directory);
        ns.make(a, "x", FileKind::Directory);
        ns.make(a, "file", FileKind::File);
        assert_eq!((subdirs(&ns, root), subdirs(&ns, a)), (2, 1));
        ns.rename(a, "x", b, "x").unwrap();
        assert_eq!((subdirs(&ns, a), subdirs(&ns, b)), (0, 1));
        ns.run(command::Op::RemoveEntry(RemoveEntry {
            parent: b,
            name: b"x".to_vec(),
            directory: true,
            now_ns: 9,
        }))
        .unwrap();
        assert_eq!(subdirs(&ns, b), 0);
        // Directories listed from the UFS count too, and go when they vanish there.
        let listing = |names: &[&str]| LoadDirectory {
            dir_id: b,
            entries: names
                .iter()
                .map(|n| UfsEntry {
                    name: n.as_bytes().to_vec(),
                    kind: FileKind::Directory as i32,
                    mode: 0o755,
                    ..Default::default()
                })
                .collect(),
            listed_at_ns: 1,
            ..Default::default()
        };
        ns.run(command::Op::LoadDirectory(listing(&["u", "v"])))
            .unwrap();
        assert_eq!(subdirs(&ns, b), 2);
        ns.run(command::Op::LoadDirectory(listing(&["v"]))).unwrap();
        assert_eq!(subdirs(&ns, b), 1);
    }

    #[test]
    fn a_listing_in_parts_removes_first_so_an_object_under_a_links_name_is_added() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let object = |name: &str, size| UfsEntry {
            name: name.into(),
            kind: FileKind::File as i32,
            size,
            mtime_ns: 7,
            ..Default::default()
        };
        let whole = |entries| LoadDirectory {
            dir_id: root,
            entries,
            listed_at_ns: 1,
            ..Default::default()
        };
        ns.run(command::Op::LoadDirectory(whole(vec![object("p", 3)])))
            .unwrap();
        let file = ns.id(root, "p");
        ns.link(file, root, "l").unwrap();
        // The UFS now has an object under the link's name, and none under the file's.
        ns.run(command::Op::LoadDirectory(LoadDirectory {
            partial: true,
            explicit_removals: true,
            removed: vec![b"p".to_vec()],
            ..whole(vec![])
        }))
        .unwrap();
        ns.run(command::Op::LoadDirectory(LoadDirectory {
            explicit_removals: true,
            listed_at_ns: 2,
            ..whole(vec![object("l", 5)])
        }))
        .unwrap();
        assert!(ns.store.get(file).is_err());
        let l = ns.store.lookup(root, b"l").unwrap().unwrap();
        assert_ne!(l.id, file);
        assert_eq!((l.size, l.links.len()), (5, 0));
        assert_eq!(ns.store.get(root).unwrap().listed_at_ns, 2);
    }

    #[test]
    fn a_store_made_before_link_counts_counts_its_subdirectories_at_open() {
        use crate::store::{INODES, META};
        use prost::Message;
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let a = ns.make(root, "a", FileKind::Directory);
        ns.make(root, "b", FileKind::Directory);
        ns.make(a, "c", FileKind::Directory);
        // As an older version left it: no counts, no mark.
        let txn = ns.store.db().begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.remove("subdirs_counted").unwrap();
            let mut inodes = txn.open_table(INODES).unwrap();
            for id in [root, a] {
                let mut i = ns.store.get(id).unwrap();
                i.subdirs = 0;
                inodes.insert(id, i.encode_to_vec().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        let path = ns._dir.path().join("ns.redb");
        let Ns { store, _dir, .. } = ns;
        drop(store);
        let store = NamespaceStore::open(&path, 0).unwrap();
        assert_eq!(store.get(root).unwrap().subdirs, 2);
        assert_eq!(store.get(a).unwrap().subdirs, 1);
    }

    #[test]
    fn special_files_and_links_live_only_in_the_namespace() {
        let mut ns = Ns::new();
        let root = ns.store.root_id();
        let fifo = ns.make(root, "pipe", FileKind::Fifo);
        let dev = ns.make(root, "tty", FileKind::CharDevice);
        assert_eq!(ns.store.get(dev).unwrap().rdev, 0x0103);
        // Special files never come with a UFS object.
        let with_object = ns.run(command::Op::CreateInode(CreateInode {
            parent: root,
            name: b"sock".to_vec(),
            kind: FileKind::Socket as i32,
            fingerprint: Some(UfsFingerprint::default()),
            ..Default::default()
        }));
        assert_eq!(with_object.unwrap_err().errno(), libc::EINVAL);
        ns.link(fifo, root, "pipe2").unwrap();
        assert_eq!(ns.nlink(fifo), 2);

        // A file "from the UFS" with a link; the UFS then lists only the file: the link
        // and the special files stay, and a UFS object appearing under a link's name does
        // not replace it.
        let file = UfsEntry {
            name: b"data".to_vec(),
            kind: FileKind::File as i32,
            size: 3,
            mtime_ns: 7,
            ..Default::default()
        };
        let load = |entries: Vec<UfsEntry>| {
            command::Op::LoadDirectory(LoadDirectory {
                dir_id: root,
                entries,
                listed_at_ns: 1,
                ..Default::default()
            })
        };
        ns.run(load(vec![file.clone()])).unwrap();
        let data = ns.id(root, "data");
        ns.link(data, root, "alias").unwrap();
        let mut alias_object = file.clone();
        alias_object.name = b"alias".to_vec();
        alias_object.size = 99;
        ns.run(load(vec![file, alias_object])).unwrap();
        assert_eq!(ns.id(root, "alias"), data);
        assert_eq!(ns.store.get(data).unwrap().fingerprint.unwrap().size, 3);
        for name in ["pipe", "pipe2", "tty", "data", "alias"] {
            assert!(
                ns.store.lookup(root, name.as_bytes()).unwrap().is_some(),
                "{name}"
            );
        }
        // The file's object vanishes from the UFS: the file goes with all its names.
        ns.run(load(vec![])).unwrap();
        assert!(ns.store.lookup(root, b"alias").unwrap().is_none());
        assert!(ns.store.get(data).is_err());
        assert!(ns.store.lookup(root, b"pipe2").unwrap().is_some());
    }
}
