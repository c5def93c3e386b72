//! Directories whose entries in the UFS the namespace may not match. A mutation changes
//! the UFS, then commits; when it stops in between with an outcome the UFS may still
//! carry out (a request that timed out reaches the store later, a commit lost with the
//! leadership, a caller gone mid-way, which drops the call), its directories are listed
//! again by the leader once the UFS answers, so the namespace follows what the UFS has
//! instead of showing a name that no longer exists there. The marks are this member's:
//! one that stops leading has the new leader list them, one that crashes loses them
//! (the client's retry, or the next listing, settles those).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_common::{FsError, FsResult};
use granary_protos::v1::{EnsureLoadedRequest, Inode};

use crate::leader_clients::LeaderClients;
use crate::loader::MetadataLoader;
use crate::raft::RaftLog;

/// How long after a change of unknown outcome its directory is first listed again: a
/// request the UFS was slow to answer may still be carried out meanwhile.
const FIRST_LISTING: Duration = Duration::from_secs(2);
/// A second listing after the first that succeeds: one of the lost call's requests may
/// have been carried out after it.
const CONFIRMING_LISTING: Duration = Duration::from_secs(10);
/// Between listings that fail (the UFS still unreachable).
const RETRY: Duration = Duration::from_secs(5);

/// Whether an error leaves the UFS change it answers undecided.
pub fn uncertain(e: &FsError) -> bool {
    matches!(
        e,
        FsError::Ufs(_) | FsError::Io(_) | FsError::TimedOut(_) | FsError::Unavailable(_)
    )
}

#[derive(Default)]
pub struct Unsettled {
    /// Directory id → when to list it next, and how many listings are still to come.
    dirs: Mutex<HashMap<u64, (Instant, u8)>>,
}

impl Unsettled {
    /// Watches a mutation of `dirs` from its UFS change to its commit: unless it is
    /// [`Unsettling::settle`]d, they are listed again.
    pub fn watch(&self, dirs: &[u64]) -> Unsettling<'_> {
        Unsettling {
            unsettled: self,
            dirs: dirs.to_vec(),
        }
    }

    /// Has `dirs` listed again (a change there left the UFS in a state the namespace
    /// may not follow).
    pub fn mark(&self, dirs: &[u64]) {
        let due = Instant::now() + FIRST_LISTING;
        let mut map = self.dirs.lock().expect("unsettled lock");
        for &d in dirs {
            map.insert(d, (due, 2));
        }
    }

    /// The directories due for a listing now.
    pub fn due(&self) -> Vec<u64> {
        let now = Instant::now();
        let map = self.dirs.lock().expect("unsettled lock");
        map.iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(&d, _)| d)
            .collect()
    }

    /// `dir` was listed (`Ok`), could not be (`Err`: again later), or is gone.
    pub fn listed(&self, dir: u64, ok: bool) {
        let mut map = self.dirs.lock().expect("unsettled lock");
        let Some((at, left)) = map.get_mut(&dir) else {
            return;
        };
        match (ok, *left) {
            (true, 0..=1) => {
                map.remove(&dir);
            }
            (true, _) => {
                *left -= 1;
                *at = Instant::now() + CONFIRMING_LISTING;
            }
            (false, _) => *at = Instant::now() + RETRY,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.lock().expect("unsettled lock").is_empty()
    }
}

/// A mutation between its UFS change and its commit.
pub struct Unsettling<'a> {
    unsettled: &'a Unsettled,
    dirs: Vec<u64>,
}

impl Unsettling<'_> {
    /// The mutation ended with a known outcome: committed, or refused with nothing
    /// changed.
    pub fn settle(mut self) {
        self.dirs.clear();
    }

    /// Settles unless `r` is an error of unknown outcome.
    pub fn after<T>(self, r: &Result<T, FsError>) {
        if !matches!(r, Err(e) if uncertain(e)) {
            self.settle();
        }
    }
}

impl Drop for Unsettling<'_> {
    fn drop(&mut self) {
        if !self.dirs.is_empty() {
            self.unsettled.mark(&self.dirs);
        }
    }
}

/// Lists each unsettled directory again when due: on the leader itself, once the UFS
/// answers (asked first without a turn, so a stalled UFS does not hold every mutation
/// back); a member no longer leading asks the leader to.
pub async fn settle(
    loader: Arc<MetadataLoader<RaftLog>>,
    raft: RaftLog,
    leader: Arc<LeaderClients>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if loader.unsettled.is_empty() {
            continue;
        }
        for dir in loader.unsettled.due() {
            let listed = match loader.store().get(dir) {
                Ok(inode) if raft.leader_caught_up() => relist_here(&loader, inode).await,
                Ok(_) => relist_at_leader(&raft, &leader, dir).await,
                // Gone from the namespace since: nothing to list.
                Err(FsError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            };
            match &listed {
                Ok(()) => tracing::info!(
                    dir,
                    "listed a directory again after a UFS change of unknown outcome"
                ),
                Err(e) => {
                    tracing::warn!(dir, error = %e, "cannot list a directory whose UFS change had an unknown outcome; retrying")
                }
            }
            loader.unsettled.listed(dir, listed.is_ok());
        }
    }
}

async fn relist_here(loader: &Arc<MetadataLoader<RaftLog>>, dir: Inode) -> FsResult<()> {
    let ufs = loader.ufs(dir.mount_id)?;
    let path = dir.ufs_path.clone();
    let answers = tokio::task::spawn_blocking(move || ufs.stat(&path))
        .await
        .map_err(|e| FsError::io_from(format!("UFS task: {e}"), e))?;
    match answers {
        Ok(_) => loader.refresh(&dir).await.map(|_| ()),
        // Not in the UFS any more: its parent's next listing takes it away.
        Err(FsError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn relist_at_leader(raft: &RaftLog, leader: &LeaderClients, dir: u64) -> FsResult<()> {
    let mut client = leader.leader(raft).map_err(FsError::from)?;
    client
        .ensure_loaded(EnsureLoadedRequest {
            dir_id: dir,
            relist: true,
        })
        .await
        .map(|_| ())
        .map_err(FsError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mutations_stopped_short_leave_their_directories_unsettled() {
        let u = Unsettled::default();
        u.watch(&[1]).settle();
        u.watch(&[2])
            .after(&Err::<(), _>(FsError::Exists("x".into())));
        u.watch(&[3]).after(&Ok(()));
        assert!(u.is_empty(), "known outcomes");
        u.watch(&[4, 5])
            .after(&Err::<(), _>(FsError::TimedOut("S3".into())));
        // A call dropped mid-way (its caller went away).
        drop(u.watch(&[6]));
        let mut marked: Vec<u64> = u.dirs.lock().unwrap().keys().copied().collect();
        marked.sort();
        assert_eq!(marked, vec![4, 5, 6]);
        assert!(u.due().is_empty(), "not before the UFS had a moment");

        // Listed twice once the UFS answers; a failed listing is tried again.
        u.dirs
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|v| v.0 = Instant::now());
        assert_eq!(u.due().len(), 3);
        u.listed(4, false);
        u.listed(5, true);
        u.listed(6, true);
        assert!(u.due().is_empty());
        u.dirs
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|v| v.0 = Instant::now());
        for d in [4, 5, 6] {
            u.listed(d, true);
        }
        u.dirs
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|v| v.0 = Instant::now());
        assert_eq!(u.due(), vec![4], "listed once more after its first listing");
        u.listed(4, true);
        assert!(u.is_empty());
    }
}
