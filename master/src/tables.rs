//! The namespace's tables as one state-machine pass sees them: a write transaction's,
//! or, for a dry run, a read transaction's with the run's own changes held in memory over
//! it. A dry run then takes no part in redb's single writer (it neither waits for the
//! apply thread's transaction nor holds it up) and allocates no pages.

use std::collections::BTreeMap;

use granary_protos::v1::Inode;
use redb::{ReadOnlyTable, ReadableTable, Table};

use crate::store::{decode_inode, decode_u64, meta_u64, redb_err, StoreError};

/// One table: `T` in a write transaction, `R` in a dry run with its changes (`None`: a
/// removal) by key.
pub(crate) enum View<T, R, K, V> {
    Write(T),
    Dry(R, BTreeMap<K, Option<V>>),
}

pub(crate) type InodeView<'t> =
    View<Table<'t, u64, &'static [u8]>, ReadOnlyTable<u64, &'static [u8]>, u64, Vec<u8>>;
pub(crate) type ChildView<'t> =
    View<Table<'t, &'static [u8], u64>, ReadOnlyTable<&'static [u8], u64>, Vec<u8>, u64>;
pub(crate) type MetaView<'t> = View<
    Table<'t, &'static str, &'static [u8]>,
    ReadOnlyTable<&'static str, &'static [u8]>,
    String,
    Vec<u8>,
>;

impl<T, R, K: Ord, V> View<T, R, K, V> {
    /// Writes through `write` in a transaction; in a dry run records the change `dry`
    /// makes (built only there: the apply thread copies nothing).
    fn change(
        &mut self,
        dry: impl FnOnce() -> (K, Option<V>),
        write: impl FnOnce(&mut T) -> Result<(), redb::StorageError>,
    ) -> Result<(), StoreError> {
        match self {
            View::Write(t) => {
                redb_err!(write(t))?;
            }
            View::Dry(_, over) => {
                let (k, v) = dry();
                over.insert(k, v);
            }
        }
        Ok(())
    }
}

fn read_inode(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<Inode>, StoreError> {
    match redb_err!(t.get(id))? {
        Some(v) => Ok(Some(decode_inode(v.value())?)),
        None => Ok(None),
    }
}

impl InodeView<'_> {
    pub(crate) fn get(&self, id: u64) -> Result<Option<Inode>, StoreError> {
        match self {
            View::Write(t) => read_inode(t, id),
            View::Dry(r, over) => match over.get(&id) {
                Some(Some(v)) => Ok(Some(decode_inode(v)?)),
                Some(None) => Ok(None),
                None => read_inode(r, id),
            },
        }
    }

    pub(crate) fn insert(&mut self, id: u64, v: &[u8]) -> Result<(), StoreError> {
        self.change(|| (id, Some(v.to_vec())), |t| t.insert(id, v).map(drop))
    }

    pub(crate) fn remove(&mut self, id: u64) -> Result<(), StoreError> {
        self.change(|| (id, None), |t| t.remove(id).map(drop))
    }
}

fn read_range(
    t: &impl ReadableTable<&'static [u8], u64>,
    lower: &[u8],
    upper: &[u8],
    out: &mut BTreeMap<Vec<u8>, u64>,
    limit: usize,
) -> Result<(), StoreError> {
    for item in redb_err!(t.range(lower..upper))? {
        let (k, v) = redb_err!(item)?;
        out.insert(k.value().to_vec(), v.value());
        if out.len() >= limit {
            break;
        }
    }
    Ok(())
}

impl ChildView<'_> {
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self {
            View::Write(t) => Ok(redb_err!(t.get(key))?.map(|v| v.value())),
            View::Dry(r, over) => match over.get(key) {
                Some(v) => Ok(*v),
                None => Ok(redb_err!(r.get(key))?.map(|v| v.value())),
            },
        }
    }

    pub(crate) fn insert(&mut self, key: &[u8], id: u64) -> Result<(), StoreError> {
        self.change(|| (key.to_vec(), Some(id)), |t| t.insert(key, id).map(drop))
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.change(|| (key.to_vec(), None), |t| t.remove(key).map(drop))
    }

    /// The entries with keys in `lower..upper`, the first `limit` of them.
    pub(crate) fn range(
        &self,
        lower: &[u8],
        upper: &[u8],
        limit: usize,
    ) -> Result<BTreeMap<Vec<u8>, u64>, StoreError> {
        let mut out = BTreeMap::new();
        match self {
            View::Write(t) => read_range(t, lower, upper, &mut out, limit)?,
            View::Dry(r, over) => {
                let changed = over.range(lower.to_vec()..upper.to_vec());
                // Enough of the table's own that the dry run's removals cannot starve it.
                let removed = changed.clone().filter(|(_, v)| v.is_none()).count();
                read_range(r, lower, upper, &mut out, limit.saturating_add(removed))?;
                for (k, v) in changed {
                    match v {
                        Some(id) => out.insert(k.clone(), *id),
                        None => out.remove(k),
                    };
                }
                while out.len() > limit {
                    out.pop_last();
                }
            }
        }
        Ok(out)
    }
}

impl MetaView<'_> {
    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            View::Write(t) => Ok(redb_err!(t.get(key))?.map(|v| v.value().to_vec())),
            View::Dry(r, over) => match over.get(key) {
                Some(v) => Ok(v.clone()),
                None => Ok(redb_err!(r.get(key))?.map(|v| v.value().to_vec())),
            },
        }
    }

    /// A counter (0 when unset).
    pub(crate) fn u64(&self, key: &str) -> Result<u64, StoreError> {
        match self {
            View::Write(t) => meta_u64(t, key),
            View::Dry(r, over) => match over.get(key) {
                Some(Some(v)) => decode_u64(key, v),
                Some(None) => Ok(0),
                None => meta_u64(r, key),
            },
        }
    }

    pub(crate) fn insert(&mut self, key: &str, v: &[u8]) -> Result<(), StoreError> {
        self.change(
            || (key.to_string(), Some(v.to_vec())),
            |t| t.insert(key, v).map(drop),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    const T: TableDefinition<&[u8], u64> = TableDefinition::new("t");

    #[test]
    fn a_dry_run_reads_its_own_changes_over_the_table_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for k in [b"a", b"b", b"c", b"d"] {
                t.insert(&k[..], k[0] as u64).unwrap();
            }
        }
        txn.commit().unwrap();
        let read = || db.begin_read().unwrap().open_table(T).unwrap();
        let mut view: ChildView = View::Dry(read(), BTreeMap::new());
        view.remove(b"a").unwrap();
        view.remove(b"b").unwrap();
        view.insert(b"bb", 7).unwrap();
        view.insert(b"c", 9).unwrap();
        assert_eq!(view.get(b"a").unwrap(), None);
        assert_eq!(view.get(b"c").unwrap(), Some(9));
        assert_eq!(view.get(b"d").unwrap(), Some(b'd' as u64));
        let keys = |limit| -> Vec<(Vec<u8>, u64)> {
            view.range(b"a", b"z", limit).unwrap().into_iter().collect()
        };
        let all = vec![
            (b"bb".to_vec(), 7),
            (b"c".to_vec(), 9),
            (b"d".to_vec(), 100),
        ];
        assert_eq!(keys(usize::MAX), all);
        assert_eq!(keys(1), all[..1], "removals do not starve a limited range");
        assert_eq!(keys(2), all[..2]);
        assert!(view.range(b"x", b"z", 1).unwrap().is_empty());
        drop(view);
        assert_eq!(read().get(&b"a"[..]).unwrap().unwrap().value(), b'a' as u64);
        assert!(read().get(&b"bb"[..]).unwrap().is_none());
    }
}
