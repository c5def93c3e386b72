//! The routing table: which metadata shard owns a path. Explicit mount-style prefixes win
//! (longest match); other paths go to the shard their first component hashes to (jump
//! consistent hash), so one namespace spreads over many shards without a central lookup,
//! and adding a shard moves only its share of the top-level names. The table is
//! versioned: every change makes a new version, which clients and masters compare.
//!
//! A shard keeps, besides the paths it owns, the directories above each prefix pinned to
//! it (so it can resolve them from its own root). A shard that owns a directory holding a
//! pinned prefix keeps a *referral* there instead of the pinned subtree.

use granary_common::ids::shard_of;
use granary_protos::v1::{PrefixPin, RoutingTable as TableProto, ShardInfo};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("the routing table lists no shards")]
    NoShards,
    #[error("shard {0} is listed twice")]
    DuplicateShard(u16),
    #[error("shard {0} has no master addresses")]
    NoMasters(u16),
    #[error("shard id {0} is out of range (0..=65535)")]
    BadShardId(u32),
    #[error("prefix {prefix} names shard {shard}, which the table does not list")]
    UnknownShard { prefix: String, shard: u32 },
    #[error("the table lists no shard {0}")]
    NoSuchShard(u32),
    #[error(
        "prefix `{0}` is not an absolute path below / (no `.`, `..`, empty or trailing components)"
    )]
    BadPrefix(String),
    #[error("prefix {0} is pinned twice")]
    DuplicatePin(String),
    #[error("inode {0:#x} belongs to shard {1}, which the table does not list")]
    UnknownInodeShard(u64, u16),
    #[error(
        "prefix {inner} (shard {shard}) lies under prefix {outer}, pinned to another shard, \
         whose parent directory shard {shard} owns: shard {shard} would have to keep {outer} \
         both as a referral and as its own directory. Pin {outer}'s parent instead, or pin \
         {inner} to another shard"
    )]
    NestedPin {
        outer: String,
        inner: String,
        shard: u16,
    },
}

/// A validated routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTable {
    proto: TableProto,
    /// Shard ids, sorted: the hash buckets.
    ids: Vec<u16>,
}

/// Jump consistent hash (Lamping & Veach): moving from n to n+1 buckets relocates only
/// 1/(n+1) of the keys.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = (((b + 1) as f64) * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// A name's hash: FNV-1a (stable across processes and versions, unlike `DefaultHasher`)
/// finished with MurmurHash3's mixer, without which short names (`a`, `b`, …) differ only
/// in low bits and pile onto few shards.
fn name_hash(bytes: &[u8]) -> u64 {
    let mut k = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ceb9fe1a85ec53);
    k ^ (k >> 33)
}

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Whether `prefix` is `path` or one of its ancestors (both normalized, absolute).
fn is_at_or_under(path: &[u8], prefix: &[u8]) -> bool {
    path == prefix
        || (path.len() > prefix.len() && path.starts_with(prefix) && path[prefix.len()] == b'/')
}

/// `/a/b` and `c` make `/a/b/c`; the root is `/`.
pub fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    if !parent.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn valid_prefix(p: &[u8]) -> bool {
    p.len() > 1
        && p[0] == b'/'
        && p[1..]
            .split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0))
}

impl RoutingTable {
    /// Checks a table: shards unique with addresses, pins valid and onto listed shards.
    pub fn new(proto: TableProto) -> Result<Self, RoutingError> {
        if proto.shards.is_empty() {
            return Err(RoutingError::NoShards);
        }
        let mut ids = Vec::with_capacity(proto.shards.len());
        for s in &proto.shards {
            let id = u16::try_from(s.id).map_err(|_| RoutingError::BadShardId(s.id))?;
            if ids.contains(&id) {
                return Err(RoutingError::DuplicateShard(id));
            }
            if s.masters.is_empty() {
                return Err(RoutingError::NoMasters(id));
            }
            ids.push(id);
        }
        ids.sort_unstable();
        for (i, pin) in proto.pins.iter().enumerate() {
            if !valid_prefix(&pin.prefix) {
                return Err(RoutingError::BadPrefix(shown(&pin.prefix)));
            }
            if !ids.iter().any(|&id| id as u32 == pin.shard) {
                return Err(RoutingError::UnknownShard {
                    prefix: shown(&pin.prefix),
                    shard: pin.shard,
                });
            }
            if proto.pins[..i].iter().any(|p| p.prefix == pin.prefix) {
                return Err(RoutingError::DuplicatePin(shown(&pin.prefix)));
            }
        }
        let table = RoutingTable { proto, ids };
        table.check_nesting()?;
        Ok(table)
    }

    /// A shard that owns a pinned prefix's parent keeps a referral at the prefix; if a
    /// prefix pinned to that same shard lies below, it would also need the prefix as a
    /// directory of its own (to reach its pin from its root). One entry cannot be both.
    fn check_nesting(&self) -> Result<(), RoutingError> {
        for outer in &self.proto.pins {
            let parent = match outer.prefix.iter().rposition(|&b| b == b'/') {
                Some(0) | None => continue,
                Some(i) => &outer.prefix[..i],
            };
            let shard = self.owner(parent);
            if shard as u32 == outer.shard {
                continue;
            }
            let inner = self.proto.pins.iter().find(|p| {
                p.shard == shard as u32
                    && p.prefix != outer.prefix
                    && is_at_or_under(&p.prefix, &outer.prefix)
            });
            if let Some(inner) = inner {
                return Err(RoutingError::NestedPin {
                    outer: shown(&outer.prefix),
                    inner: shown(&inner.prefix),
                    shard,
                });
            }
        }
        Ok(())
    }

    /// The table before any change (version 0): shard 0, on `masters`, owns everything.
    pub fn single(masters: Vec<String>) -> Self {
        RoutingTable::new(TableProto {
            version: 0,
            shards: vec![ShardInfo { id: 0, masters }],
            pins: Vec::new(),
        })
        .expect("a valid one-shard table")
    }

    pub fn version(&self) -> u64 {
        self.proto.version
    }

    pub fn proto(&self) -> &TableProto {
        &self.proto
    }

    /// Shard ids, ascending.
    pub fn shard_ids(&self) -> &[u16] {
        &self.ids
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.proto.shards
    }

    pub fn masters(&self, shard: u16) -> Option<&[String]> {
        self.proto
            .shards
            .iter()
            .find(|s| s.id == shard as u32)
            .map(|s| s.masters.as_slice())
    }

    pub fn pins(&self) -> &[PrefixPin] {
        &self.proto.pins
    }

    /// The shard owning `path` (absolute and normalized, not `/`: the root belongs to
    /// every shard).
    pub fn owner(&self, path: &[u8]) -> u16 {
        let pinned = self
            .proto
            .pins
            .iter()
            .filter(|p| is_at_or_under(path, &p.prefix))
            .max_by_key(|p| p.prefix.len());
        match pinned {
            Some(p) => p.shard as u16,
            None => {
                let first = path
                    .split(|&b| b == b'/')
                    .find(|c| !c.is_empty())
                    .unwrap_or_default();
                self.ids[jump_hash(name_hash(first), self.ids.len() as u32) as usize]
            }
        }
    }

    /// The shard owning an inode (its id's high bits), if the table lists it.
    pub fn shard_of_inode(&self, ino: u64) -> Result<u16, RoutingError> {
        let id = shard_of(ino);
        if self.ids.contains(&id) {
            Ok(id)
        } else {
            Err(RoutingError::UnknownInodeShard(ino, id))
        }
    }

    /// Whether `path` lies strictly above a prefix pinned to `shard`.
    fn above_pin_of(&self, shard: u16, path: &[u8]) -> bool {
        self.proto
            .pins
            .iter()
            .any(|p| p.shard == shard as u32 && p.prefix != path && is_at_or_under(&p.prefix, path))
    }

    /// Whether `path` is a pinned prefix: like a mount point, it is neither renamed nor
    /// removed.
    pub fn is_pinned(&self, path: &[u8]) -> bool {
        self.proto.pins.iter().any(|p| p.prefix == path)
    }

    /// Whether `path` lies strictly above some pinned prefix: renaming or removing it
    /// would cut the pinned subtree off its shard.
    pub fn is_above_a_pin(&self, path: &[u8]) -> bool {
        self.proto
            .pins
            .iter()
            .any(|p| p.prefix != path && is_at_or_under(&p.prefix, path))
    }

    /// How `shard` records the UFS entry at `path` when it lists the parent directory:
    /// as its own entry, as a referral to the shard a prefix is pinned to, or not at all.
    pub fn placement(&self, shard: u16, path: &[u8]) -> Placement {
        let owner = self.owner(path);
        if owner == shard || self.above_pin_of(shard, path) {
            return Placement::Own;
        }
        let parent = match path.iter().rposition(|&b| b == b'/') {
            Some(0) | None => return Placement::Elsewhere,
            Some(i) => &path[..i],
        };
        // The parent's owner answers for the pinned prefix with a referral.
        if self.owner(parent) == shard && self.proto.pins.iter().any(|p| p.prefix == path) {
            return Placement::Referral(owner);
        }
        Placement::Elsewhere
    }

    /// Where loading the tree at `path` happens: the shard owning it, loading `path`,
    /// and each shard a prefix below it is pinned to, loading that prefix (the owner
    /// keeps a referral there). The root is every shard's.
    pub fn load_targets(&self, path: &[u8]) -> Vec<(u16, Vec<u8>)> {
        if path == b"/" {
            return self.ids.iter().map(|&id| (id, b"/".to_vec())).collect();
        }
        let mut targets = vec![(self.owner(path), path.to_vec())];
        for pin in &self.proto.pins {
            if pin.prefix != path && is_at_or_under(&pin.prefix, path) {
                targets.push((pin.shard as u16, pin.prefix.clone()));
            }
        }
        targets
    }

    /// A new version with `shard` added (an unused id).
    pub fn with_shard(&self, shard: ShardInfo) -> Result<Self, RoutingError> {
        let mut next = self.proto.clone();
        next.version += 1;
        next.shards.push(shard);
        RoutingTable::new(next)
    }

    /// A new version naming `shard.masters` as the masters of shard `shard.id`.
    pub fn with_masters(&self, shard: ShardInfo) -> Result<Self, RoutingError> {
        let mut next = self.proto.clone();
        next.version += 1;
        let Some(known) = next.shards.iter_mut().find(|s| s.id == shard.id) else {
            return Err(RoutingError::NoSuchShard(shard.id));
        };
        known.masters = shard.masters;
        RoutingTable::new(next)
    }

    /// A new version with `prefix` pinned to `shard` (replacing a pin of that prefix).
    pub fn with_pin(&self, prefix: &[u8], shard: u16) -> Result<Self, RoutingError> {
        let mut next = self.proto.clone();
        next.version += 1;
        next.pins.retain(|p| p.prefix != prefix);
        next.pins.push(PrefixPin {
            prefix: prefix.to_vec(),
            shard: shard as u32,
        });
        RoutingTable::new(next)
    }

    /// The directories whose listing differs between this table and `next` for some
    /// shard: the root and every ancestor of a pin either table has. Listing them again
    /// moves entries to where `next` puts them. None when only masters changed: every
    /// entry stays where it is.
    pub fn relisted_by(&self, next: &RoutingTable) -> Vec<Vec<u8>> {
        if self.ids == next.ids && self.proto.pins == next.proto.pins {
            return Vec::new();
        }
        let mut dirs = vec![b"/".to_vec()];
        for pin in self.proto.pins.iter().chain(&next.proto.pins) {
            let p = &pin.prefix;
            for (i, &b) in p.iter().enumerate().skip(1) {
                if b == b'/' && !dirs.iter().any(|d| d == &p[..i]) {
                    dirs.push(p[..i].to_vec());
                }
            }
        }
        dirs
    }
}

/// Where a shard puts a listed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// It is this shard's (owned, or a directory above one of its pins).
    Own,
    /// This shard owns the parent; the entry is pinned to that shard.
    Referral(u16),
    /// Another shard's business.
    Elsewhere,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(n: u32, pins: &[(&str, u32)]) -> RoutingTable {
        RoutingTable::new(TableProto {
            version: 1,
            shards: (0..n)
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
        })
        .unwrap()
    }

    #[test]
    fn longest_prefix_wins_then_hash() {
        let t = table(
            4,
            &[("/datasets/imagenet", 2), ("/datasets/imagenet/val", 3)],
        );
        assert_eq!(t.owner(b"/datasets/imagenet/train/x.jpg"), 2);
        assert_eq!(t.owner(b"/datasets/imagenet"), 2);
        assert_eq!(t.owner(b"/datasets/imagenet/val/y.jpg"), 3);
        let a = t.owner(b"/datasets/imagenet2/x");
        let b = t.owner(b"/datasets/other");
        assert_eq!(a, b, "both hash the first component `datasets`");
        assert_eq!(t.owner(b"/datasets"), a);
        assert_eq!(t.owner(b"/logs/a"), t.owner(b"/logs/b/c"));
    }

    #[test]
    fn each_entry_is_placed_once_and_pinned_prefixes_get_a_referral() {
        let t = table(4, &[("/datasets/imagenet", 2)]);
        let hashed = t.owner(b"/datasets");
        assert_ne!(
            hashed, 2,
            "the test wants `datasets` elsewhere than shard 2"
        );
        for shard in 0..4u16 {
            let own = |p: &str| t.placement(shard, p.as_bytes());
            match shard {
                2 => {
                    assert_eq!(own("/datasets"), Placement::Own, "above its pin");
                    assert_eq!(own("/datasets/imagenet"), Placement::Own);
                    assert_eq!(own("/datasets/other"), Placement::Elsewhere);
                }
                s if s == hashed => {
                    assert_eq!(own("/datasets"), Placement::Own);
                    assert_eq!(own("/datasets/imagenet"), Placement::Referral(2));
                    assert_eq!(own("/datasets/other"), Placement::Own);
                }
                _ => {
                    assert_eq!(own("/datasets"), Placement::Elsewhere);
                    assert_eq!(own("/datasets/imagenet"), Placement::Elsewhere);
                }
            }
        }
        assert!(t.is_above_a_pin(b"/datasets"));
        assert_eq!(
            t.load_targets(b"/datasets"),
            vec![
                (hashed, b"/datasets".to_vec()),
                (2, b"/datasets/imagenet".to_vec())
            ]
        );
        assert_eq!(t.load_targets(b"/").len(), 4);
        assert!(!t.is_above_a_pin(b"/datasets/imagenet"));
        assert!(!t.is_above_a_pin(b"/data"));
    }

    #[test]
    fn a_pin_below_a_referral_its_parent_owner_would_keep_is_refused() {
        let t = table(4, &[]);
        let a = t.owner(b"/a");
        let other = (a + 1) % 4;
        let t = t.with_pin(b"/a/b", other).unwrap();
        // Shard `a` keeps a referral at /a/b; it cannot also keep /a/b to reach /a/b/c/d.
        assert!(matches!(
            t.with_pin(b"/a/b/c/d", a),
            Err(RoutingError::NestedPin { shard, .. }) if shard == a
        ));
        // Another shard below is fine, and so is a pin whose parent is the root.
        assert!(t.with_pin(b"/a/b/c/d", (a + 2) % 4).is_ok());
        let top = table(4, &[("/x", 1)]);
        assert!(top.with_pin(b"/x/y", 2).is_ok());
        assert!(top.with_pin(b"/x/y", 0).is_ok());
    }

    #[test]
    fn changes_make_new_versions_and_bad_tables_are_refused() {
        let t = table(2, &[]);
        let t2 = t
            .with_shard(ShardInfo {
                id: 7,
                masters: vec!["m7:1".into()],
            })
            .unwrap();
        assert_eq!((t2.version(), t2.shard_ids()), (2, &[0u16, 1, 7][..]));
        let t3 = t2.with_pin(b"/a/b", 7).unwrap();
        let t4 = t3.with_pin(b"/a/b", 1).unwrap();
        assert_eq!(t4.version(), 4);
        assert_eq!(t4.pins().len(), 1, "a pin of the same prefix is replaced");
        assert_eq!(t4.owner(b"/a/b/c"), 1);
        assert_eq!(t3.relisted_by(&t4), vec![b"/".to_vec(), b"/a".to_vec()]);
        assert_eq!(
            t2.with_shard(ShardInfo {
                id: 1,
                masters: vec!["x:1".into()]
            }),
            Err(RoutingError::DuplicateShard(1))
        );
        assert!(matches!(
            t2.with_pin(b"/a", 9),
            Err(RoutingError::UnknownShard { shard: 9, .. })
        ));
        let moved = t2
            .with_masters(ShardInfo {
                id: 1,
                masters: vec!["new:1".into(), "new:2".into()],
            })
            .unwrap();
        assert_eq!(moved.version(), 3);
        assert_eq!(
            moved.masters(1),
            Some(&["new:1".into(), "new:2".into()][..])
        );
        assert_eq!(moved.masters(7), t2.masters(7));
        assert!(t2.relisted_by(&moved).is_empty(), "nothing moves");
        assert_eq!(
            t2.with_masters(ShardInfo {
                id: 9,
                masters: vec!["x:1".into()]
            }),
            Err(RoutingError::NoSuchShard(9))
        );
        assert_eq!(
            t2.with_masters(ShardInfo {
                id: 1,
                masters: Vec::new()
            }),
            Err(RoutingError::NoMasters(1))
        );
        for bad in ["/", "a/b", "/a//b", "/a/../b", "/a/"] {
            assert_eq!(
                t2.with_pin(bad.as_bytes(), 0),
                Err(RoutingError::BadPrefix(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            t2.shard_of_inode(granary_common::ids::inode_id(7, 5)),
            Ok(7)
        );
        assert!(t2
            .shard_of_inode(granary_common::ids::inode_id(9, 5))
            .is_err());
        assert_eq!(
            RoutingTable::new(TableProto::default()),
            Err(RoutingError::NoShards)
        );
    }

    #[test]
    fn even_short_names_spread_over_every_shard() {
        let t = table(4, &[]);
        let mut counts = [0; 4];
        for c in b'a'..=b'z' {
            counts[t.owner(&[b'/', c]) as usize] += 1;
        }
        assert!(counts.iter().all(|&n| n >= 3), "{counts:?}");
    }

    proptest! {
        /// Adding a shard to n moves about 1/(n+1) of the top-level names, and only to
        /// the new shard.
        #[test]
        fn adding_a_shard_moves_only_its_share(n in 1u32..12, seed in any::<u64>()) {
            let before = table(n, &[]);
            let after = before
                .with_shard(ShardInfo { id: n, masters: vec!["new:1".into()] })
                .unwrap();
            let names: Vec<Vec<u8>> = (0..4000u64)
                .map(|i| format!("/top{:x}", seed.wrapping_add(i)).into_bytes())
                .collect();
            let mut moved = 0;
            for name in &names {
                let (a, b) = (before.owner(name), after.owner(name));
                if a != b {
                    prop_assert_eq!(b, n as u16, "a name moved between old shards");
                    moved += 1;
                }
            }
            let share = names.len() as f64 / (n + 1) as f64;
            prop_assert!((moved as f64) > share * 0.7 && (moved as f64) < share * 1.3,
                "moved {} of {}, share {}", moved, names.len(), share);
        }
    }
}
