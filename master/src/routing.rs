//! The routing table as this shard's state machine keeps it: which version the shard
//! works by, where each of its entries belongs (its own, a referral to the shard a prefix
//! is pinned to, or another shard's), and listing again what a new version moves.
//! Shard 0's group is where the table is changed; every other shard adopts each new
//! version through its own log, so its members agree on when it took effect.

use granary_common::ids::root_inode;
use granary_common::{FsError, FsResult};
use granary_protos::v1::{FileKind, Inode, Referral, RoutingTable as TableProto, SetRoutingTable};
use granary_shard_router::{child_path, Placement, RoutingTable};
use prost::Message;

use crate::store::{child_key, StoreError, Tables};

pub(crate) const META_ROUTING: &str = "routing_table";

pub(crate) fn decode_table(bytes: &[u8]) -> Result<RoutingTable, StoreError> {
    let proto = TableProto::decode(bytes)
        .map_err(|e| StoreError::Corrupt(format!("routing table record: {e}")))?;
    RoutingTable::new(proto).map_err(|e| StoreError::Corrupt(format!("routing table: {e}")))
}

impl Tables<'_> {
    /// The table this shard works by; `None` until one is adopted (a lone shard owns
    /// everything).
    pub(crate) fn routing_table(&self) -> Result<Option<RoutingTable>, StoreError> {
        match self.meta.get(META_ROUTING)? {
            Some(v) => decode_table(&v).map(Some),
            None => Ok(None),
        }
    }

    /// The namespace path of `id`, from this shard's root.
    pub(crate) fn path_of(&self, id: u64) -> Result<Vec<u8>, StoreError> {
        path_to(root_inode(self.shard), id, |at| {
            self.get(at)?
                .ok_or_else(|| StoreError::Corrupt(format!("inode {at:#x} has no parent")))
        })
    }

    /// Where the entry `name` of directory `parent` belongs by this shard's table.
    pub(crate) fn placement(&self, parent: &Inode, name: &[u8]) -> Result<Placement, StoreError> {
        Ok(match self.routing_table()? {
            Some(table) => {
                table.placement(self.shard, &child_path(&self.path_of(parent.id)?, name))
            }
            None => Placement::Own,
        })
    }

    /// Refuses to create or rename into `name` of `parent` unless that entry is this
    /// shard's: a client routed by an older table, or a name pinned to another shard.
    pub(crate) fn check_owned(
        &self,
        parent: &Inode,
        name: &[u8],
    ) -> Result<FsResult<()>, StoreError> {
        if parent.referral.is_some() {
            return Ok(Err(FsError::CrossDevice(format!(
                "{} is served by another shard",
                String::from_utf8_lossy(&parent.name)
            ))));
        }
        Ok(match self.placement(parent, name)? {
            Placement::Own => Ok(()),
            Placement::Referral(_) => Err(FsError::Busy(format!(
                "{} is a prefix pinned to another shard",
                String::from_utf8_lossy(name)
            ))),
            Placement::Elsewhere => Err(FsError::CrossDevice(format!(
                "{} belongs to another shard",
                String::from_utf8_lossy(name)
            ))),
        })
    }

    /// Refuses to move or remove `entry` if it stands for another shard's subtree (a
    /// referral) or holds a prefix pinned anywhere beneath it.
    pub(crate) fn check_movable(&self, entry: &Inode) -> Result<FsResult<()>, StoreError> {
        if entry.referral.is_some() {
            return Ok(Err(FsError::Busy(format!(
                "{} is a prefix pinned to another shard",
                String::from_utf8_lossy(&entry.name)
            ))));
        }
        if entry.kind == FileKind::Directory as i32 {
            if let Some(table) = self.routing_table()? {
                let path = self.path_of(entry.id)?;
                // Pinned to this very shard, it is no referral here.
                if table.is_pinned(&path) {
                    return Ok(Err(FsError::Busy(format!(
                        "{} is a pinned prefix",
                        String::from_utf8_lossy(&path)
                    ))));
                }
                if table.is_above_a_pin(&path) {
                    return Ok(Err(FsError::CrossDevice(format!(
                        "{} holds a prefix pinned to a shard",
                        String::from_utf8_lossy(&entry.name)
                    ))));
                }
            }
        }
        Ok(Ok(()))
    }
}

/// The path from `root` down to `id`, walking parents with `get`.
fn path_to<E>(root: u64, id: u64, get: impl Fn(u64) -> Result<Inode, E>) -> Result<Vec<u8>, E> {
    let mut names = Vec::new();
    let mut at = id;
    while at != root {
        let inode = get(at)?;
        names.push(inode.name);
        at = inode.parent;
    }
    if names.is_empty() {
        return Ok(b"/".to_vec());
    }
    let mut path = Vec::new();
    for name in names.iter().rev() {
        path.push(b'/');
        path.extend_from_slice(name);
    }
    Ok(path)
}

/// A referral for a listed entry that `placement` says belongs to another shard's pin.
pub(crate) fn referral(placement: Placement, path: Vec<u8>) -> Option<Referral> {
    match placement {
        Placement::Referral(shard) => Some(Referral {
            shard: shard as u32,
            path,
        }),
        _ => None,
    }
}

/// Adopts a newer table; the directories whose listing it changes are listed again on
/// next use. An older or equal version is ignored (every replica alike).
pub(crate) fn set_routing_table(
    t: &mut Tables<'_>,
    s: &SetRoutingTable,
) -> Result<FsResult<()>, StoreError> {
    let Some(proto) = &s.table else {
        return Ok(Err(FsError::InvalidArgument(
            "routing table missing".into(),
        )));
    };
    let next = match RoutingTable::new(proto.clone()) {
        Ok(t) => t,
        Err(e) => return Ok(Err(FsError::InvalidArgument(e.to_string()))),
    };
    let previous = t.routing_table()?;
    if let Some(p) = &previous {
        if p.version() == next.version() && p.proto() != next.proto() {
            // Built on an older table than the applied one: its change would be lost.
            return Ok(Err(FsError::StaleRouting(p.version())));
        }
        if p.version() >= next.version() {
            return Ok(Ok(()));
        }
    }
    let relist = match &previous {
        Some(p) => p.relisted_by(&next),
        None => RoutingTable::single(vec!["-".into()]).relisted_by(&next),
    };
    for dir in relist {
        if let Some(mut inode) = resolve(t, &dir)? {
            if inode.kind == FileKind::Directory as i32 && inode.children_loaded {
                inode.children_loaded = false;
                inode.listed_at_ns = 0;
                t.put(&inode)?;
            }
        }
    }
    t.meta.insert(META_ROUTING, &proto.encode_to_vec())?;
    Ok(Ok(()))
}

/// The inode at `path` in this shard, if it has one.
fn resolve(t: &Tables<'_>, path: &[u8]) -> Result<Option<Inode>, StoreError> {
    let mut at = root_inode(t.shard);
    for name in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        match t.children.get(&child_key(at, name))? {
            Some(id) => at = id,
            None => return Ok(None),
        }
    }
    t.get(at)
}

impl crate::store::NamespaceStore {
    /// The table this shard works by, as applied here.
    pub fn routing_table(&self) -> Result<Option<RoutingTable>, StoreError> {
        match self.meta_bytes(META_ROUTING)? {
            Some(b) => decode_table(&b).map(Some),
            None => Ok(None),
        }
    }

    /// The namespace path of `id`, from this shard's root.
    pub fn path_of(&self, id: u64) -> FsResult<Vec<u8>> {
        path_to(self.root_id(), id, |at| self.get(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::{apply_batch, LogEntry};
    use crate::store::NamespaceStore;
    use granary_protos::v1::{
        command, Command, CreateInode, LoadDirectory, PrefixPin, RemoveEntry, RenameEntry,
        ShardInfo, UfsEntry,
    };

    fn cmd(op: command::Op) -> Command {
        Command { op: Some(op) }
    }

    fn table(version: u64, pins: &[(&str, u32)]) -> Command {
        cmd(command::Op::SetRoutingTable(SetRoutingTable {
            table: Some(TableProto {
                version,
                shards: (0..2)
                    .map(|id| ShardInfo {
                        id,
                        masters: vec![format!("m{id}:1")],
                    })
                    .collect(),
                pins: pins
                    .iter()
                    .map(|(p, s)| PrefixPin {
                        prefix: p.as_bytes().to_vec(),
                        shard: *s,
                    })
                    .collect(),
            }),
        }))
    }

    fn dir(name: &str, referral: Option<Referral>) -> UfsEntry {
        UfsEntry {
            name: name.as_bytes().to_vec(),
            kind: FileKind::Directory as i32,
            referral,
            ..Default::default()
        }
    }

    /// Shard 1's store, with `/data` listed and holding `/data/pinned` (pinned to shard 0
    /// by the table applied) as a referral, `/data/own` as a directory of its own.
    fn shard_one() -> (tempfile::TempDir, NamespaceStore, Vec<LogEntry>) {
        let tmp = tempfile::tempdir().unwrap();
        let s = NamespaceStore::open(&tmp.path().join("s.redb"), 1).unwrap();
        let root = s.root_id();
        let mut log = vec![
            LogEntry::command(1, 1, crate::state_machine::tests::mount()),
            LogEntry::command(2, 1, table(3, &[("/data/pinned", 0)])),
            LogEntry::command(
                3,
                1,
                cmd(command::Op::LoadDirectory(LoadDirectory {
                    dir_id: root,
                    entries: vec![dir("data", None)],
                    listed_at_ns: 1,
                    routing_version: 3,
                    ..Default::default()
                })),
            ),
        ];
        apply_batch(&s, &log).unwrap();
        let data = s.lookup(root, b"data").unwrap().unwrap();
        let referral = Referral {
            shard: 0,
            path: b"/data/pinned".to_vec(),
        };
        log = vec![LogEntry::command(
            4,
            1,
            cmd(command::Op::LoadDirectory(LoadDirectory {
                dir_id: data.id,
                entries: vec![dir("pinned", Some(referral)), dir("own", None)],
                listed_at_ns: 1,
                routing_version: 3,
                ..Default::default()
            })),
        )];
        apply_batch(&s, &log).unwrap();
        (tmp, s, log)
    }

    #[test]
    fn pinned_prefixes_stay_referrals_that_cannot_be_moved_or_filled() {
        let (_tmp, s, _) = shard_one();
        assert_eq!(s.routing_version(), 3);
        let data = s.lookup(s.root_id(), b"data").unwrap().unwrap();
        let pinned = s.lookup(data.id, b"pinned").unwrap().unwrap();
        assert_eq!(pinned.referral.as_ref().unwrap().shard, 0);
        assert!(pinned.children_loaded, "never listed here");
        assert_eq!(s.path_of(pinned.id).unwrap(), b"/data/pinned");
        let own = s.lookup(data.id, b"own").unwrap().unwrap();

        let mut index = 5;
        let mut run = |op: command::Op| {
            index += 1;
            apply_batch(&s, &[LogEntry::command(index, 1, cmd(op))]).unwrap()[0].clone()
        };
        let errno = |r: FsResult<()>| r.unwrap_err().errno();
        let create = |parent: u64, name: &str| {
            command::Op::CreateInode(CreateInode {
                parent,
                name: name.as_bytes().to_vec(),
                kind: FileKind::File as i32,
                ..Default::default()
            })
        };
        let rename = |parent: u64, name: &str, new_parent: u64, new_name: &str| {
            command::Op::RenameEntry(RenameEntry {
                parent,
                name: name.as_bytes().to_vec(),
                new_parent,
                new_name: new_name.as_bytes().to_vec(),
                ..Default::default()
            })
        };
        assert_eq!(
            errno(run(create(pinned.id, "x"))),
            libc::EXDEV,
            "under a referral"
        );
        assert_eq!(
            errno(run(rename(data.id, "pinned", data.id, "moved"))),
            libc::EBUSY
        );
        assert_eq!(
            errno(run(rename(s.root_id(), "data", s.root_id(), "d2"))),
            libc::EXDEV,
            "/data holds a pinned prefix"
        );
        assert_eq!(
            errno(run(rename(data.id, "own", data.id, "pinned"))),
            libc::EBUSY,
            "onto a referral"
        );
        assert_eq!(
            errno(run(command::Op::RemoveEntry(RemoveEntry {
                parent: data.id,
                name: b"pinned".to_vec(),
                directory: true,
                ..Default::default()
            }))),
            libc::EBUSY
        );
        run(create(own.id, "fine")).unwrap();
        run(rename(own.id, "fine", data.id, "moved")).unwrap();
    }

    #[test]
    fn a_newer_table_lists_the_root_and_the_directories_above_pins_again() {
        let (_tmp, s, _) = shard_one();
        let data = s.lookup(s.root_id(), b"data").unwrap().unwrap();
        assert!(s.get(s.root_id()).unwrap().children_loaded && data.children_loaded);
        // An older version changes nothing.
        apply_batch(&s, &[LogEntry::command(5, 1, table(2, &[]))]).unwrap();
        assert_eq!(s.routing_version(), 3);
        assert!(s.get(data.id).unwrap().children_loaded);
        // The same version with other contents (built on an older table) is refused.
        apply_batch(&s, &[LogEntry::command(6, 1, table(3, &[]))]).unwrap();
        assert_eq!(s.routing_table().unwrap().unwrap().pins().len(), 1);
        // The pin goes away: its parent is listed again (then without a referral).
        apply_batch(&s, &[LogEntry::command(7, 1, table(4, &[]))]).unwrap();
        assert_eq!(s.routing_version(), 4);
        assert!(!s.get(s.root_id()).unwrap().children_loaded);
        assert!(!s.get(data.id).unwrap().children_loaded);
        // A listing placed by the old table (it raced the change) is refused, and the
        // directory stays to be listed again.
        let relisted = |index, version| {
            LogEntry::command(
                index,
                1,
                cmd(command::Op::LoadDirectory(LoadDirectory {
                    dir_id: data.id,
                    entries: vec![dir("pinned", None)],
                    listed_at_ns: 2,
                    routing_version: version,
                    ..Default::default()
                })),
            )
        };
        apply_batch(&s, &[relisted(8, 3)]).unwrap();
        assert!(!s.get(data.id).unwrap().children_loaded);
        apply_batch(&s, &[relisted(9, 4)]).unwrap();
        let now = s.lookup(data.id, b"pinned").unwrap().unwrap();
        assert!(now.referral.is_none() && !now.children_loaded);
        assert!(
            s.lookup(data.id, b"own").unwrap().is_none(),
            "no longer listed"
        );
    }
}
