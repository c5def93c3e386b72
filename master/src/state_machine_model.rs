//! Property test: random sequences of directory listings, creates, removes, renames and
//! hard links, applied to the real state machine and to a plain in-memory model, must
//! leave the same tree: the same names, kinds, sizes, files shared by the same names,
//! link counts, UFS paths (a file's object under its first remaining name) and
//! subdirectory counts.

use std::collections::BTreeMap;

use granary_protos::v1::{
    command, Command, CreateInode, FileKind, LinkEntry, LoadDirectory, RemoveEntry, RenameEntry,
    UfsEntry,
};
use proptest::prelude::*;

use crate::state_machine::{apply_batch, dry_run, LogEntry};
use crate::store::NamespaceStore;

type Path = Vec<String>;

/// A file or directory of the model.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    is_dir: bool,
    size: u64,
    /// Created through Granary, never seen in the UFS.
    created: bool,
    /// Its names, the first the one its UFS object is under.
    names: Vec<Path>,
}

#[derive(Debug, Default)]
struct Model {
    entries: BTreeMap<Path, u32>,
    nodes: BTreeMap<u32, Node>,
    next: u32,
}

#[derive(Debug, Clone)]
enum Op {
    /// List directory #dir (among the model's directories) with these entries.
    Load {
        dir: usize,
        entries: Vec<(String, bool, u64)>,
    },
    Create {
        dir: usize,
        name: String,
        is_dir: bool,
    },
    Remove {
        dir: usize,
        name: String,
        directory: bool,
    },
    Rename {
        from: usize,
        name: String,
        to: usize,
        new_name: String,
    },
    Link {
        from: usize,
        name: String,
        to: usize,
        new_name: String,
    },
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(str::to_string)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0usize..8,
            prop::collection::btree_map(name(), (any::<bool>(), 0u64..3), 0..5)
        )
            .prop_map(|(dir, m)| Op::Load {
                dir,
                entries: m.into_iter().map(|(n, (d, s))| (n, d, s)).collect()
            }),
        (0usize..8, name(), any::<bool>()).prop_map(|(dir, name, is_dir)| Op::Create {
            dir,
            name,
            is_dir
        }),
        (0usize..8, name(), any::<bool>()).prop_map(|(dir, name, directory)| Op::Remove {
            dir,
            name,
            directory
        }),
        (0usize..8, name(), 0usize..8, name()).prop_map(|(from, name, to, new_name)| {
            Op::Rename {
                from,
                name,
                to,
                new_name,
            }
        }),
        (0usize..8, name(), 0usize..8, name()).prop_map(|(from, name, to, new_name)| {
            Op::Link {
                from,
                name,
                to,
                new_name,
            }
        }),
    ]
}

fn child(dir: &[String], name: &str) -> Path {
    let mut p = dir.to_vec();
    p.push(name.to_string());
    p
}

impl Model {
    fn dirs(&self) -> Vec<Path> {
        let mut v = vec![Vec::new()];
        v.extend(
            self.entries
                .iter()
                .filter(|(_, n)| self.nodes[n].is_dir)
                .map(|(p, _)| p.clone()),
        );
        v
    }

    fn node(&self, path: &[String]) -> Option<(u32, &Node)> {
        let id = *self.entries.get(path)?;
        Some((id, &self.nodes[&id]))
    }

    fn has_children(&self, dir: &[String]) -> bool {
        self.entries
            .keys()
            .any(|p| p.len() == dir.len() + 1 && p.starts_with(dir))
    }

    fn add(&mut self, path: Path, is_dir: bool, size: u64, created: bool) {
        self.next += 1;
        self.nodes.insert(
            self.next,
            Node {
                is_dir,
                size,
                created,
                names: vec![path.clone()],
            },
        );
        self.entries.insert(path, self.next);
    }

    /// Drops name `path`; its node goes with its last name.
    fn unlink(&mut self, path: &[String]) {
        let Some(id) = self.entries.remove(path) else {
            return;
        };
        let node = self.nodes.get_mut(&id).expect("named node");
        node.names.retain(|n| n != path);
        if node.names.is_empty() {
            self.nodes.remove(&id);
        }
    }

    /// Drops a node and all its names.
    fn forget(&mut self, id: u32) {
        if let Some(node) = self.nodes.remove(&id) {
            for n in node.names {
                self.entries.remove(&n);
            }
        }
    }

    /// The UFS no longer has what is under `path`: names there go, and so does every
    /// node whose object is there (with its names elsewhere).
    fn remove_subtree(&mut self, path: &[String]) {
        let below: Vec<(Path, u32)> = self
            .entries
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        for (p, id) in below {
            match self.nodes.get(&id) {
                Some(node) if node.names[0] == p => self.forget(id),
                Some(_) => self.unlink(&p),
                None => {}
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        let all = self.dirs();
        let pick = |i: &usize| all[i % all.len()].clone();
        match op {
            Op::Load { dir, entries } => {
                let dir = pick(dir);
                let children: Vec<Path> = self
                    .entries
                    .keys()
                    .filter(|p| p.len() == dir.len() + 1 && p.starts_with(&dir))
                    .cloned()
                    .collect();
                // First what goes: an object no longer listed, or listed as another kind.
                // A link's name, or what was created here and never reached the UFS, stays.
                let mut doomed = Vec::new();
                for c in children {
                    let (_, node) = self.node(&c).expect("a listed child");
                    if node.names[0] != c {
                        continue;
                    }
                    match entries.iter().find(|(n, _, _)| *n == c[dir.len()]) {
                        Some((_, d, _)) if *d == node.is_dir => {}
                        Some(_) => doomed.push(c),
                        None if node.created => {}
                        None => doomed.push(c),
                    }
                }
                for c in doomed {
                    self.remove_subtree(&c);
                }
                for (n, d, s) in entries {
                    let p = child(&dir, n);
                    match self.node(&p) {
                        Some((_, node)) if node.names[0] != p => {}
                        Some((id, _)) => {
                            let node = self.nodes.get_mut(&id).expect("listed node");
                            node.size = if *d { 0 } else { *s };
                            node.created = false;
                        }
                        None => self.add(p, *d, if *d { 0 } else { *s }, false),
                    }
                }
            }
            Op::Create { dir, name, is_dir } => {
                let p = child(&pick(dir), name);
                if !self.entries.contains_key(&p) {
                    self.add(p, *is_dir, 0, true);
                }
            }
            Op::Remove {
                dir,
                name,
                directory,
            } => {
                let p = child(&pick(dir), name);
                let Some((_, node)) = self.node(&p) else {
                    return;
                };
                if node.is_dir != *directory || (node.is_dir && self.has_children(&p)) {
                    return;
                }
                self.unlink(&p);
            }
            Op::Rename {
                from,
                name,
                to,
                new_name,
            } => {
                let src = child(&pick(from), name);
                let dst = child(&pick(to), new_name);
                let Some((id, node)) = self.node(&src) else {
                    return;
                };
                let is_dir = node.is_dir;
                if src == dst || (is_dir && dst.starts_with(&src)) {
                    return;
                }
                if let Some((target, t)) = self.node(&dst) {
                    if target == id {
                        return;
                    }
                    if is_dir != t.is_dir || (t.is_dir && self.has_children(&dst)) {
                        return;
                    }
                    self.unlink(&dst);
                }
                let moved: Vec<(Path, u32)> = self
                    .entries
                    .range(src.clone()..)
                    .take_while(|(p, _)| p.starts_with(&src))
                    .map(|(p, v)| (p.clone(), *v))
                    .collect();
                let renamed = |p: &Path| {
                    let mut q = dst.clone();
                    q.extend_from_slice(&p[src.len()..]);
                    q
                };
                for (p, id) in &moved {
                    self.entries.remove(p);
                    for n in &mut self.nodes.get_mut(id).expect("moved node").names {
                        if n == p {
                            *n = renamed(p);
                        }
                    }
                }
                for (p, id) in moved {
                    self.entries.insert(renamed(&p), id);
                }
            }
            Op::Link {
                from,
                name,
                to,
                new_name,
            } => {
                let src = child(&pick(from), name);
                let dst = child(&pick(to), new_name);
                let Some((id, node)) = self.node(&src) else {
                    return;
                };
                if node.is_dir || self.entries.contains_key(&dst) {
                    return;
                }
                self.nodes
                    .get_mut(&id)
                    .expect("linked node")
                    .names
                    .push(dst.clone());
                self.entries.insert(dst, id);
            }
        }
    }
}

fn to_command(store: &NamespaceStore, model: &Model, op: &Op) -> Option<Command> {
    let all = model.dirs();
    let resolve = |path: &[String]| {
        let mut id = 1;
        for part in path {
            id = store.lookup(id, part.as_bytes()).unwrap()?.id;
        }
        Some(id)
    };
    let dir = |i: &usize| resolve(&all[i % all.len()]).expect("a model directory");
    let kind = |d: bool| if d { FileKind::Directory } else { FileKind::File } as i32;
    let op = match op {
        Op::Load { dir: d, entries } => command::Op::LoadDirectory(LoadDirectory {
            dir_id: dir(d),
            entries: entries
                .iter()
                .map(|(n, d, s)| UfsEntry {
                    name: n.as_bytes().to_vec(),
                    kind: kind(*d),
                    size: *s,
                    mtime_ns: 1,
                    mode: 0o644,
                    ..Default::default()
                })
                .collect(),
            listed_at_ns: 1,
            ..Default::default()
        }),
        Op::Create {
            dir: d,
            name,
            is_dir,
        } => command::Op::CreateInode(CreateInode {
            parent: dir(d),
            name: name.as_bytes().to_vec(),
            kind: kind(*is_dir),
            mode: 0o644,
            ..Default::default()
        }),
        Op::Remove {
            dir: d,
            name,
            directory,
        } => command::Op::RemoveEntry(RemoveEntry {
            parent: dir(d),
            name: name.as_bytes().to_vec(),
            directory: *directory,
            now_ns: 1,
        }),
        Op::Rename {
            from,
            name,
            to,
            new_name,
        } => command::Op::RenameEntry(RenameEntry {
            parent: dir(from),
            name: name.as_bytes().to_vec(),
            new_parent: dir(to),
            new_name: new_name.as_bytes().to_vec(),
            no_replace: false,
            now_ns: 1,
        }),
        Op::Link {
            from,
            name,
            to,
            new_name,
        } => command::Op::LinkEntry(LinkEntry {
            // A missing source has no id: the model skips the op too.
            id: resolve(&child(&all[from % all.len()], name))?,
            new_parent: dir(to),
            new_name: new_name.as_bytes().to_vec(),
            now_ns: 1,
        }),
    };
    Some(Command { op: Some(op) })
}

/// What one name shows: kind, size, created, link count, the first name of its file
/// (identifying it), its UFS path and, for a directory, its subdirectory count.
type View = BTreeMap<Path, (bool, u64, bool, usize, Path, String, u64)>;

fn model_view(model: &Model) -> View {
    model
        .entries
        .iter()
        .map(|(p, id)| {
            let n = &model.nodes[id];
            let subdirs = match n.is_dir {
                true => model
                    .entries
                    .iter()
                    .filter(|(q, c)| {
                        q.len() == p.len() + 1 && q.starts_with(p) && model.nodes[c].is_dir
                    })
                    .count() as u64,
                false => 0,
            };
            let first = n.names.iter().min().expect("a named node").clone();
            let view = (
                n.is_dir,
                n.size,
                n.created,
                n.names.len(),
                first,
                n.names[0].join("/"),
                subdirs,
            );
            (p.clone(), view)
        })
        .collect()
}

fn walk(store: &NamespaceStore, id: u64, path: Path, ids: &mut BTreeMap<Path, u64>) {
    for child in store.list(id, b"", 1000).unwrap().0 {
        let mut p = path.clone();
        p.push(String::from_utf8(child.name.clone()).unwrap());
        ids.insert(p.clone(), child.id);
        if child.kind == FileKind::Directory as i32 {
            walk(store, child.id, p, ids);
        }
    }
}

fn store_view(store: &NamespaceStore) -> View {
    let mut ids = BTreeMap::new();
    walk(store, 1, Vec::new(), &mut ids);
    let mut first: BTreeMap<u64, Path> = BTreeMap::new();
    for (p, id) in &ids {
        first.entry(*id).or_insert_with(|| p.clone());
    }
    ids.iter()
        .map(|(p, id)| {
            let i = store.get(*id).unwrap();
            let view = (
                i.kind == FileKind::Directory as i32,
                i.size,
                i.fingerprint.is_none(),
                1 + i.links.len(),
                first[id].clone(),
                String::from_utf8(i.ufs_path.clone()).unwrap(),
                i.subdirs,
            );
            (p.clone(), view)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn state_machine_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let store = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        let mount = crate::state_machine::tests::mount();
        apply_batch(&store, &[LogEntry::command(1, 1, mount)]).unwrap();
        let mut model = Model::default();
        let mut index = 1;
        for op in &ops {
            if let Some(cmd) = to_command(&store, &model, op) {
                index += 1;
                // The leader's dry run answers what applying will, and changes nothing.
                let before = store_view(&store);
                let predicted = dry_run(&store, &cmd).unwrap().map_err(|e| e.errno());
                prop_assert_eq!(&store_view(&store), &before);
                let got = apply_batch(&store, &[LogEntry::command(index, 1, cmd)]).unwrap();
                prop_assert_eq!(predicted, got[0].clone().map_err(|e| e.errno()), "dry run of {:?}", op);
            }
            model.apply(op);
            prop_assert_eq!(store_view(&store), model_view(&model), "after {:?}", op);
            prop_assert_eq!(store.inode_count().unwrap(), model.nodes.len() as u64 + 1);
            prop_assert_eq!(store.get(1).unwrap().subdirs, model_view_root_subdirs(&model));
        }
    }
}

fn model_view_root_subdirs(model: &Model) -> u64 {
    model
        .entries
        .iter()
        .filter(|(p, id)| p.len() == 1 && model.nodes[id].is_dir)
        .count() as u64
}
