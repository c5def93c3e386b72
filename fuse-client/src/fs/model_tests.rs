//! Random sequences of POSIX operations on one mount's `GranaryFs` (over the in-memory
//! doubles) against a model of a local filesystem: every answer, errno, listing and byte
//! must agree, and at the end everything closed is what was stored and committed.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::doubles::{writable_fs, MemNamespace, MemStore, ROOT};
use super::*;

const NAMES: [&str; 3] = ["a", "b", "c"];
const DIR: &str = "d";

/// A path: a name at the root, or in the directory `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Path {
    Root(usize),
    InDir(usize),
    Dir,
}

impl Path {
    fn text(self) -> String {
        match self {
            Path::Root(n) => NAMES[n].to_string(),
            Path::InDir(n) => format!("{DIR}/{}", NAMES[n]),
            Path::Dir => DIR.to_string(),
        }
    }

    fn parent(self) -> Option<Path> {
        match self {
            Path::InDir(_) => Some(Path::Dir),
            _ => None,
        }
    }

    fn name(self) -> &'static [u8] {
        match self {
            Path::Root(n) | Path::InDir(n) => NAMES[n].as_bytes(),
            Path::Dir => DIR.as_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// open(O_CREAT | O_RDWR), kept open.
    Create(Path),
    /// open(O_RDWR | O_TRUNC) of what is there, kept open.
    OpenTrunc(Path),
    Write {
        handle: usize,
        offset: u32,
        len: u32,
        byte: u8,
    },
    Truncate(Path, u32),
    Fsync(usize),
    Close(usize),
    Read(Path),
    Stat(Path),
    Unlink(Path),
    Mkdir,
    Rmdir,
    Rename(Path, Path),
    List,
}

fn path() -> impl Strategy<Value = Path> {
    prop_oneof![
        (0..3usize).prop_map(Path::Root),
        (0..3usize).prop_map(Path::InDir),
        Just(Path::Dir),
    ]
}

/// Up to 400 KiB, past the size a small file stays in memory.
fn offset() -> impl Strategy<Value = u32> {
    prop_oneof![0..4096u32, 0..(400u32 << 10)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Create),
        1 => path().prop_map(Op::OpenTrunc),
        6 => (0..4usize, offset(), 1..70_000u32, any::<u8>())
            .prop_map(|(handle, offset, len, byte)| Op::Write { handle, offset, len, byte }),
        1 => (path(), offset()).prop_map(|(p, s)| Op::Truncate(p, s)),
        1 => (0..4usize).prop_map(Op::Fsync),
        2 => (0..4usize).prop_map(Op::Close),
        3 => path().prop_map(Op::Read),
        2 => path().prop_map(Op::Stat),
        1 => path().prop_map(Op::Unlink),
        1 => Just(Op::Mkdir),
        1 => Just(Op::Rmdir),
        2 => (path(), path()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => Just(Op::List),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File(u64),
}

/// A local filesystem: names to entries, file content by file.
#[derive(Default)]
struct Model {
    names: BTreeMap<Path, Entry>,
    content: HashMap<u64, Vec<u8>>,
    next_file: u64,
}

impl Model {
    /// What path resolution answers: the entry, or the errno.
    fn resolve(&self, p: Path) -> Result<Entry, i32> {
        if let Some(parent) = p.parent() {
            match self.names.get(&parent) {
                None => return Err(libc::ENOENT),
                Some(Entry::File(_)) => return Err(libc::ENOTDIR),
                Some(Entry::Dir) => {}
            }
        }
        self.names.get(&p).copied().ok_or(libc::ENOENT)
    }

    /// The parent of a new entry at `p` must be a directory.
    fn creatable(&self, p: Path) -> Result<(), i32> {
        match p.parent().map(|d| self.names.get(&d)) {
            Some(None) => Err(libc::ENOENT),
            Some(Some(Entry::File(_))) => Err(libc::ENOTDIR),
            _ => Ok(()),
        }
    }

    fn children(&self, dir: Path) -> Vec<Path> {
        self.names
            .keys()
            .copied()
            .filter(|p| p.parent() == Some(dir))
            .collect()
    }
}

/// The system under test and what ties its handles and inodes to the model's.
struct Real {
    fs: GranaryFs,
    ns: Arc<MemNamespace>,
    store: Arc<MemStore>,
    /// Open handles: (fh, model file).
    handles: Vec<(u64, u64)>,
    /// Model file -> inode.
    inodes: HashMap<u64, u64>,
}

impl Real {
    fn resolve(&self, p: Path) -> FsResult<Inode> {
        let parent = match p.parent() {
            Some(d) => self.fs.lookup(ROOT, d.name())?,
            None => self.fs.getattr(ROOT)?,
        };
        if p.parent().is_some() && parent.kind != FileKind::Directory as i32 {
            return Err(FsError::NotDir(p.text()));
        }
        self.fs.lookup(parent.id, p.name())
    }

    fn parent_id(&self, p: Path) -> FsResult<u64> {
        match p.parent() {
            Some(d) => Ok(self.fs.lookup(ROOT, d.name())?.id),
            None => Ok(ROOT),
        }
    }

    fn read_all(&self, fh: u64) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.fs.read(fh, out.len() as u64, 128 << 10)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend(chunk);
        }
    }

    /// Closes every handle of model file `file` (before its name goes away).
    fn close_file(&mut self, file: u64) {
        let (gone, kept) = self.handles.drain(..).partition(|&(_, f)| f == file);
        self.handles = kept;
        for (fh, _) in gone {
            self.fs.flush(fh).unwrap();
            self.fs.release(fh);
        }
    }
}

fn errno<T>(r: FsResult<T>) -> Result<T, i32> {
    r.map_err(|e| e.errno())
}

/// Whether `r` succeeded, or its errno.
fn outcome<T>(r: &FsResult<T>) -> Result<(), i32> {
    r.as_ref().map(|_| ()).map_err(|e| e.errno())
}

fn run(local_worker: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let (fs, ns, store) = writable_fs(local_worker, 1 << 20);
    let mut real = Real {
        fs,
        ns,
        store,
        handles: Vec::new(),
        inodes: HashMap::new(),
    };
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        let at = format!("step {step}: {op:?}");
        match *op {
            Op::Create(p) => {
                let expected = model.creatable(p).and_then(|()| match model.names.get(&p) {
                    Some(Entry::Dir) => Err(libc::EISDIR),
                    Some(&Entry::File(f)) => Ok(f),
                    None => Ok(u64::MAX),
                });
                let got = real.parent_id(p).and_then(|parent| {
                    real.fs
                        .create(parent, p.name(), 0o644, libc::O_RDWR | libc::O_CREAT, 0, 0)
                });
                prop_assert_eq!(outcome(&got), expected.map(|_| ()), "{}", at);
                if let (Ok((inode, fh)), Ok(mut file)) = (got, expected) {
                    if file == u64::MAX {
                        file = model.next_file;
                        model.next_file += 1;
                        model.names.insert(p, Entry::File(file));
                        model.content.insert(file, Vec::new());
                    }
                    real.inodes.insert(file, inode.id);
                    real.handles.push((fh, file));
                }
            }
            Op::OpenTrunc(p) => {
                let expected = model.resolve(p).and_then(|e| match e {
                    Entry::Dir => Err(libc::EISDIR),
                    Entry::File(f) => Ok(f),
                });
                let got = real.resolve(p).and_then(|i| {
                    real.fs
                        .open(i.id, libc::O_RDWR | libc::O_TRUNC)
                        .map(|(fh, _)| fh)
                });
                prop_assert_eq!(outcome(&got), expected.map(|_| ()), "{}", at);
                if let (Ok(fh), Ok(file)) = (got, expected) {
                    model.content.insert(file, Vec::new());
                    real.handles.push((fh, file));
                }
            }
            Op::Write {
                handle,
                offset,
                len,
                byte,
            } => {
                let Some(&(fh, file)) = real.handles.get(handle) else {
                    continue;
                };
                let data = vec![byte; len as usize];
                prop_assert_eq!(
                    real.fs.write(fh, offset as u64, &data, 0).ok(),
                    Some(len),
                    "{}",
                    at
                );
                let c = model.content.get_mut(&file).expect("open file");
                let end = offset as usize + data.len();
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[offset as usize..end].copy_from_slice(&data);
            }
            Op::Truncate(p, size) => {
                let expected = model.resolve(p).and_then(|e| match e {
                    Entry::Dir => Err(libc::EISDIR),
                    Entry::File(f) => Ok(f),
                });
                let got = real.resolve(p).and_then(|i| {
                    let attrs = SetAttr {
                        size: Some(size as u64),
                        ..Default::default()
                    };
                    real.fs.setattr(i.id, &attrs)
                });
                prop_assert_eq!(outcome(&got), expected.map(|_| ()), "{}", at);
                if let Ok(file) = expected {
                    model
                        .content
                        .get_mut(&file)
                        .unwrap()
                        .resize(size as usize, 0);
                    prop_assert_eq!(got.unwrap().size, size as u64, "{}", at);
                }
            }
            Op::Fsync(handle) => {
                if let Some(&(fh, _)) = real.handles.get(handle) {
                    prop_assert!(real.fs.fsync(fh).is_ok(), "{}", at);
                }
            }
            Op::Close(handle) => {
                if handle < real.handles.len() {
                    let (fh, _) = real.handles.remove(handle);
                    prop_assert!(real.fs.flush(fh).is_ok(), "{}", at);
                    real.fs.release(fh);
                }
            }
            Op::Read(p) => {
                let expected = model.resolve(p).and_then(|e| match e {
                    Entry::Dir => Err(libc::EISDIR),
                    Entry::File(f) => Ok(model.content[&f].clone()),
                });
                let got = real.resolve(p).and_then(|i| {
                    let (fh, _) = real.fs.open(i.id, libc::O_RDONLY)?;
                    let data = real.read_all(fh);
                    real.fs.release(fh);
                    data
                });
                prop_assert!(
                    errno(got.clone()) == expected,
                    "{}: {:?}",
                    at,
                    got.map(|d| d.len())
                );
            }
            Op::Stat(p) => {
                let expected = model.resolve(p).map(|e| match e {
                    Entry::Dir => (true, 0),
                    Entry::File(f) => (false, model.content[&f].len() as u64),
                });
                let got = real.resolve(p).map(|i| {
                    let dir = i.kind == FileKind::Directory as i32;
                    (dir, if dir { 0 } else { i.size })
                });
                prop_assert_eq!(errno(got), expected, "{}", at);
            }
            Op::Unlink(p) => {
                let expected = model.resolve(p).and_then(|e| match e {
                    Entry::Dir => Err(libc::EISDIR),
                    Entry::File(f) => Ok(f),
                });
                if let Ok(file) = expected {
                    real.close_file(file);
                }
                let got = real
                    .parent_id(p)
                    .and_then(|parent| real.fs.remove(parent, p.name(), false));
                prop_assert_eq!(errno(got), expected.map(|_| ()), "{}", at);
                if expected.is_ok() {
                    model.names.remove(&p);
                }
            }
            Op::Mkdir => {
                let expected = match model.names.get(&Path::Dir) {
                    Some(_) => Err(libc::EEXIST),
                    None => Ok(()),
                };
                let got = real.fs.mkdir(ROOT, DIR.as_bytes(), 0o755, 0, 0);
                prop_assert_eq!(errno(got.map(|_| ())), expected, "{}", at);
                if expected.is_ok() {
                    model.names.insert(Path::Dir, Entry::Dir);
                }
            }
            Op::Rmdir => {
                let expected = match model.names.get(&Path::Dir) {
                    None => Err(libc::ENOENT),
                    Some(Entry::File(_)) => Err(libc::ENOTDIR),
                    Some(Entry::Dir) if !model.children(Path::Dir).is_empty() => {
                        Err(libc::ENOTEMPTY)
                    }
                    Some(Entry::Dir) => Ok(()),
                };
                let got = real.fs.remove(ROOT, DIR.as_bytes(), true);
                prop_assert_eq!(errno(got), expected, "{}", at);
                if expected.is_ok() {
                    model.names.remove(&Path::Dir);
                }
            }
            Op::Rename(from, to) => {
                // The model's paths cannot follow `d`'s children to another name.
                if from == Path::Dir && to != Path::Dir && !model.children(Path::Dir).is_empty() {
                    continue;
                }
                let expected = rename_in_model(&model, from, to);
                if let Ok(Some(Entry::File(replaced))) = expected {
                    real.close_file(replaced);
                }
                let got = real.parent_id(from).and_then(|a| {
                    let b = real.parent_id(to)?;
                    real.fs.rename(a, from.name(), b, to.name(), false)
                });
                prop_assert_eq!(errno(got), expected.map(|_| ()), "{}", at);
                if expected.is_ok() && from != to {
                    let moving = model.names.remove(&from).expect("resolved");
                    model.names.insert(to, moving);
                }
            }
            Op::List => {
                let expected: Result<Vec<String>, i32> = match model.names.get(&Path::Dir) {
                    None => Err(libc::ENOENT),
                    Some(Entry::File(_)) => Err(libc::ENOTDIR),
                    Some(Entry::Dir) => Ok(model
                        .children(Path::Dir)
                        .into_iter()
                        .map(|p| String::from_utf8(p.name().to_vec()).unwrap())
                        .collect()),
                };
                let got = real.fs.lookup(ROOT, DIR.as_bytes()).and_then(|d| {
                    let (fh, _) = real.fs.opendir(d.id)?;
                    let entries = real.fs.readdir(fh, 2, 100);
                    real.fs.releasedir(fh);
                    Ok(entries?
                        .into_iter()
                        .map(|e| String::from_utf8(e.name).unwrap())
                        .collect::<Vec<_>>())
                });
                prop_assert_eq!(errno(got), expected, "{}", at);
            }
        }
    }
    // Everything closed is stored and committed as the model has it.
    for (fh, _) in real.handles.drain(..) {
        prop_assert!(real.fs.flush(fh).is_ok());
        real.fs.release(fh);
    }
    for (&p, &entry) in &model.names {
        let Entry::File(file) = entry else { continue };
        let inode = real.inodes[&file];
        let want = &model.content[&file];
        let committed = real.ns.getattr(inode).unwrap();
        prop_assert_eq!(committed.size, want.len() as u64, "{}", p.text());
        let stored = real.store.files.lock().unwrap().get(&inode).cloned();
        prop_assert_eq!(&stored.unwrap_or_default(), want, "{}", p.text());
    }
    prop_assert_eq!(real.store.memory.used(), 0, "buffer memory given back");
    Ok(())
}

/// What rename(2) answers: the entry it replaces, or the errno.
fn rename_in_model(m: &Model, from: Path, to: Path) -> Result<Option<Entry>, i32> {
    // Both parents are resolved before the entry that moves (as Linux does).
    m.creatable(from)?;
    m.creatable(to)?;
    let moving = m.resolve(from)?;
    if from == Path::Dir && to.parent() == Some(Path::Dir) {
        return Err(libc::EINVAL);
    }
    if from == to {
        return Ok(None);
    }
    match (moving, m.names.get(&to)) {
        (_, None) => Ok(None),
        (Entry::File(_), Some(Entry::Dir)) => Err(libc::EISDIR),
        (Entry::Dir, Some(Entry::File(_))) => Err(libc::ENOTDIR),
        (Entry::Dir, Some(Entry::Dir)) if to == Path::Dir && !m.children(to).is_empty() => {
            Err(libc::ENOTEMPTY)
        }
        (Entry::Dir, Some(Entry::Dir)) => Ok(Some(Entry::Dir)),
        (Entry::File(_), Some(&target)) => Ok(Some(target)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_mount_behaves_like_a_local_filesystem(
        local_worker in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(local_worker, &ops)?;
    }
}
