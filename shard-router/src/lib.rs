//! The routing table: which metadata shard owns a path. Explicit mount-style prefixes win
//! (longest match); other paths go to a shard chosen by hashing their first component, so
//! one namespace spreads over many shards without a central lookup. The table is
//! versioned so clients can cache it and notice when it changes.

use granary_common::ids::shard_of;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: u16,
    /// Master gRPC addresses of the shard's Raft group.
    pub masters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    pub version: u64,
    pub shards: Vec<ShardInfo>,
    /// (path prefix, shard id), e.g. ("/datasets/imagenet", 3).
    pub prefixes: Vec<(String, u16)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("routing table has no shards")]
    NoShards,
    #[error("prefix {prefix} names shard {shard}, which the table does not list")]
    UnknownShard { prefix: String, shard: u16 },
    #[error("inode {0:#x} belongs to shard {1}, which the table does not list")]
    UnknownInodeShard(u64, u16),
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

/// FNV-1a, stable across processes and versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl RoutingTable {
    /// A one-shard table: everything lives on `masters`.
    pub fn single(masters: Vec<String>) -> Self {
        RoutingTable {
            version: 1,
            shards: vec![ShardInfo { id: 0, masters }],
            prefixes: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), RoutingError> {
        if self.shards.is_empty() {
            return Err(RoutingError::NoShards);
        }
        for (prefix, shard) in &self.prefixes {
            if !self.shards.iter().any(|s| s.id == *shard) {
                return Err(RoutingError::UnknownShard {
                    prefix: prefix.clone(),
                    shard: *shard,
                });
            }
        }
        Ok(())
    }

    /// The shard owning `path` (absolute, `/`-separated).
    pub fn route(&self, path: &str) -> Result<&ShardInfo, RoutingError> {
        self.validate()?;
        let best = self
            .prefixes
            .iter()
            .filter(|(p, _)| {
                let p = p.trim_end_matches('/');
                path == p || path.starts_with(&format!("{p}/")) || p.is_empty()
            })
            .max_by_key(|(p, _)| p.trim_end_matches('/').len());
        let id = match best {
            Some((_, id)) => *id,
            None => {
                let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
                let mut ids: Vec<u16> = self.shards.iter().map(|s| s.id).collect();
                ids.sort_unstable();
                ids[jump_hash(fnv1a(first.as_bytes()), ids.len() as u32) as usize]
            }
        };
        Ok(self.shards.iter().find(|s| s.id == id).expect("validated"))
    }

    /// The shard owning an inode id (its high bits).
    pub fn shard_of_inode(&self, ino: u64) -> Result<&ShardInfo, RoutingError> {
        let id = shard_of(ino);
        self.shards
            .iter()
            .find(|s| s.id == id)
            .ok_or(RoutingError::UnknownInodeShard(ino, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: u16) -> RoutingTable {
        RoutingTable {
            version: 1,
            shards: (0..n)
                .map(|id| ShardInfo {
                    id,
                    masters: vec![format!("m{id}:1")],
                })
                .collect(),
            prefixes: vec![("/datasets/imagenet".into(), 2)],
        }
    }

    #[test]
    fn longest_prefix_wins_then_hash() {
        let t = table(4);
        assert_eq!(t.route("/datasets/imagenet/train/x.jpg").unwrap().id, 2);
        assert_eq!(t.route("/datasets/imagenet").unwrap().id, 2);
        let a = t.route("/datasets/imagenet2/x").unwrap().id;
        let b = t.route("/datasets/other").unwrap().id;
        assert_eq!(a, b, "both hash the first component `datasets`");
        assert_eq!(
            t.route("/logs/a").unwrap().id,
            t.route("/logs/b/c").unwrap().id
        );
    }

    #[test]
    fn adding_a_shard_moves_few_paths() {
        let (t4, t5) = (table(4), table(5));
        let names: Vec<String> = (0..2000).map(|i| format!("/top{i}/f")).collect();
        let moved = names
            .iter()
            .filter(|n| t4.route(n).unwrap().id != t5.route(n).unwrap().id)
            .count();
        assert!(moved < 2000 * 30 / 100, "moved {moved} of 2000");
        let used: std::collections::HashSet<_> =
            names.iter().map(|n| t5.route(n).unwrap().id).collect();
        assert_eq!(used.len(), 5);
    }

    #[test]
    fn bad_tables_are_rejected() {
        let mut t = table(2);
        assert!(matches!(
            t.route("/x"),
            Err(RoutingError::UnknownShard { shard: 2, .. })
        ));
        t.prefixes.clear();
        assert_eq!(
            t.shard_of_inode(granary_common::ids::inode_id(1, 5))
                .unwrap()
                .id,
            1
        );
        assert!(t
            .shard_of_inode(granary_common::ids::inode_id(9, 5))
            .is_err());
        assert_eq!(
            RoutingTable {
                version: 1,
                shards: vec![],
                prefixes: vec![]
            }
            .route("/"),
            Err(RoutingError::NoShards)
        );
    }
}
