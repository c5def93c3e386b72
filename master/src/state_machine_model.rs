//! Property test: random sequences of directory listings, creates, removes and renames,
//! applied to the real state machine and to a plain in-memory model, must leave the same
//! tree.

use std::collections::BTreeMap;

use granary_protos::v1::{
    command, Command, CreateInode, FileKind, LoadDirectory, MountPoint, RemoveEntry, RenameEntry,
    SetMount, UfsEntry,
};
use proptest::prelude::*;

use crate::state_machine::{apply_batch, LogEntry};
use crate::store::NamespaceStore;

/// path -> (is directory, size, created through Granary)
type Model = BTreeMap<Vec<String>, (bool, u64, bool)>;

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
    ]
}

fn dirs(model: &Model) -> Vec<Vec<String>> {
    let mut v = vec![Vec::new()];
    v.extend(
        model
            .iter()
            .filter(|(_, (d, _, _))| *d)
            .map(|(p, _)| p.clone()),
    );
    v
}

fn remove_subtree(model: &mut Model, path: &[String]) {
    model.retain(|p, _| !p.starts_with(path));
}

fn apply_model(model: &mut Model, op: &Op) {
    let all = dirs(model);
    match op {
        Op::Load { dir, entries } => {
            let dir = all[dir % all.len()].clone();
            let children: Vec<Vec<String>> = model
                .keys()
                .filter(|p| p.len() == dir.len() + 1 && p.starts_with(&dir))
                .cloned()
                .collect();
            for child in children {
                let listed = entries.iter().find(|(n, _, _)| *n == child[dir.len()]);
                let (is_dir, _, created) = model[&child];
                match listed {
                    Some((_, d, _)) if *d == is_dir => {}
                    Some(_) => remove_subtree(model, &child),
                    None if created => {}
                    None => remove_subtree(model, &child),
                }
            }
            for (n, d, s) in entries {
                let mut p = dir.clone();
                p.push(n.clone());
                model.insert(p, (*d, if *d { 0 } else { *s }, false));
            }
        }
        Op::Create { dir, name, is_dir } => {
            let mut p = all[dir % all.len()].clone();
            p.push(name.clone());
            model.entry(p).or_insert((*is_dir, 0, true));
        }
        Op::Remove {
            dir,
            name,
            directory,
        } => {
            let mut p = all[dir % all.len()].clone();
            p.push(name.clone());
            let Some(&(is_dir, _, _)) = model.get(&p) else {
                return;
            };
            if is_dir != *directory || (is_dir && has_children(model, &p)) {
                return;
            }
            model.remove(&p);
        }
        Op::Rename {
            from,
            name,
            to,
            new_name,
        } => {
            let mut src = all[from % all.len()].clone();
            src.push(name.clone());
            let mut dst = all[to % all.len()].clone();
            dst.push(new_name.clone());
            let Some(&(is_dir, _, _)) = model.get(&src) else {
                return;
            };
            if src == dst || (is_dir && dst.starts_with(&src)) {
                return;
            }
            if let Some(&(target_dir, _, _)) = model.get(&dst) {
                if is_dir != target_dir || (target_dir && has_children(model, &dst)) {
                    return;
                }
                model.remove(&dst);
            }
            let moved: Vec<_> = model
                .range(src.clone()..)
                .take_while(|(p, _)| p.starts_with(&src))
                .map(|(p, v)| (p.clone(), *v))
                .collect();
            for (p, v) in moved {
                model.remove(&p);
                let mut q = dst.clone();
                q.extend_from_slice(&p[src.len()..]);
                model.insert(q, v);
            }
        }
    }
}

fn has_children(model: &Model, dir: &[String]) -> bool {
    model
        .keys()
        .any(|p| p.len() == dir.len() + 1 && p.starts_with(dir))
}

fn to_command(store: &NamespaceStore, model: &Model, op: &Op) -> Command {
    let all = dirs(model);
    let resolve = |path: &[String]| {
        let mut id = 1;
        for part in path {
            id = store.lookup(id, part.as_bytes()).unwrap().unwrap().id;
        }
        id
    };
    let kind = |d: bool| if d { FileKind::Directory } else { FileKind::File } as i32;
    match op {
        Op::Load { dir, entries } => Command {
            op: Some(command::Op::LoadDirectory(LoadDirectory {
                dir_id: resolve(&all[dir % all.len()]),
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
            })),
        },
        Op::Create { dir, name, is_dir } => Command {
            op: Some(command::Op::CreateInode(CreateInode {
                parent: resolve(&all[dir % all.len()]),
                name: name.as_bytes().to_vec(),
                kind: kind(*is_dir),
                mode: 0o644,
                ..Default::default()
            })),
        },
        Op::Remove {
            dir,
            name,
            directory,
        } => Command {
            op: Some(command::Op::RemoveEntry(RemoveEntry {
                parent: resolve(&all[dir % all.len()]),
                name: name.as_bytes().to_vec(),
                directory: *directory,
                now_ns: 1,
            })),
        },
        Op::Rename {
            from,
            name,
            to,
            new_name,
        } => Command {
            op: Some(command::Op::RenameEntry(RenameEntry {
                parent: resolve(&all[from % all.len()]),
                name: name.as_bytes().to_vec(),
                new_parent: resolve(&all[to % all.len()]),
                new_name: new_name.as_bytes().to_vec(),
                no_replace: false,
                now_ns: 1,
            })),
        },
    }
}

fn walk(store: &NamespaceStore, id: u64, path: Vec<String>, out: &mut Model) {
    for child in store.list(id, b"", 1000).unwrap().0 {
        let mut p = path.clone();
        p.push(String::from_utf8(child.name.clone()).unwrap());
        let is_dir = child.kind == FileKind::Directory as i32;
        out.insert(p.clone(), (is_dir, child.size, child.fingerprint.is_none()));
        if is_dir {
            walk(store, child.id, p, out);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn state_machine_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let store = NamespaceStore::open(&tmp.path().join("s.redb"), 0).unwrap();
        let mount = Command {
            op: Some(command::Op::SetMount(SetMount {
                mount: Some(MountPoint { mount_id: 1, path: b"/".to_vec(), ufs_uri: "file:///x".into(), ..Default::default() }),
                block_size: 1024,
            ..Default::default()
            })),
        };
        apply_batch(&store, &[LogEntry::command(1, 1, mount)]).unwrap();
        let mut model = Model::new();
        for (i, op) in ops.iter().enumerate() {
            let cmd = to_command(&store, &model, op);
            apply_batch(&store, &[LogEntry::command(i as u64 + 2, 1, cmd)]).unwrap();
            apply_model(&mut model, op);
            let mut actual = Model::new();
            walk(&store, 1, Vec::new(), &mut actual);
            prop_assert_eq!(&actual, &model, "after {:?}", op);
            prop_assert_eq!(store.inode_count().unwrap(), model.len() as u64 + 1);
        }
    }
}
