//! The `Admin` service: the master's report and changes to its group's membership.

use std::time::Duration;

use granary_common::FsError;
use granary_protos::v1::admin_server::Admin;
use granary_protos::v1::*;
use tonic::{Request, Response, Status};

use super::count;
use crate::raft::{Mail, MemberChange};
use crate::service::MasterService;

impl MasterService {
    /// Asks the master at `addr` who it is before it is added as member `id`: one of
    /// another shard, or under another id, would be taken for a member of this group by
    /// every client and worker while it never caught up; one not running would only fail
    /// the add a minute later.
    async fn check_joining(&self, id: u64, addr: &str) -> Result<(), Status> {
        let asked = async {
            self.leader_clients
                .get(addr)?
                .identify(IdentifyRequest {})
                .await
        };
        let refused = |why: String| {
            Err(Status::failed_precondition(format!(
                "not adding master {id} at {addr}: {why}"
            )))
        };
        let me = self.store.shard();
        match tokio::time::timeout(Duration::from_secs(5), asked).await {
            Ok(Ok(who)) => {
                let who = who.into_inner();
                if who.shard_id != u32::from(me) {
                    return refused(format!(
                        "it serves shard {}, this group shard {me}: start it with `shard_id = {me}`{}",
                        who.shard_id,
                        match me {
                            0 => "",
                            _ => " and `routing`",
                        }
                    ));
                }
                if who.master_id != id {
                    return refused(format!(
                        "it runs with `id = {}`: add it as {}, or start it with `id = {id}`",
                        who.master_id, who.master_id
                    ));
                }
                Ok(())
            }
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                refused(format!(
                    "it refused this group's peer token ({}): give it the group's `peer_token`",
                    s.message()
                ))
            }
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => refused(format!(
                "it is not a Granary master, or one older than this one ({}): upgrade it first",
                s.message()
            )),
            Ok(Err(s)) => refused(format!(
                "it does not answer ({}): start it with `join = true` first",
                s.message()
            )),
            Err(_) => refused(
                "no answer within 5 s: start it with `join = true` first (a stopped process?)"
                    .into(),
            ),
        }
    }
}

#[tonic::async_trait]
impl Admin for MasterService {
    async fn report(&self, _: Request<ReportRequest>) -> Result<Response<ReportReply>, Status> {
        count("report");
        let err = |e: crate::store::StoreError| Status::from(FsError::from(e));
        let st = self.raft.status();
        Ok(Response::new(ReportReply {
            master_id: st.id,
            leader_id: st.leader_id,
            term: st.term,
            shard_id: self.store.shard() as u32,
            applied_index: self.store.applied().map_err(err)?.0,
            inodes: self.store.inode_count().map_err(err)?,
            mounts: Some(self.mounts()?),
            workers: self.workers.list(),
            cached_blocks: self.locations.block_count(),
        }))
    }

    async fn quorum_info(
        &self,
        _: Request<QuorumInfoRequest>,
    ) -> Result<Response<QuorumInfoReply>, Status> {
        count("quorum_info");
        Ok(Response::new(self.raft.status().info))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("add_member");
        self.leader_only()?;
        let r = req.into_inner();
        if r.id == 0 || !r.addr.contains(':') {
            return Err(Status::invalid_argument(
                "add needs a non-zero id and a host:port address",
            ));
        }
        // Join as a learner first, catch up, then become a voter through joint consensus
        // (a learner left by an add that timed out while it caught up goes on from there).
        let learner = self
            .raft
            .status()
            .info
            .peers
            .into_iter()
            .find(|p| p.id == r.id && p.learner);
        if let Some(l) = learner.as_ref().filter(|l| l.addr != r.addr) {
            return Err(Status::already_exists(format!(
                "master {} is already a learner at {}: `quorum remove {}` first to use {}",
                r.id, l.addr, r.id, r.addr
            )));
        }
        let member = self.raft.status().info.peers.iter().any(|p| p.id == r.id);
        // A member already (a voter; a learner retrying) is left to the change's own check.
        if !member {
            self.check_joining(r.id, &r.addr).await?;
        }
        if learner.is_none() {
            self.raft
                .change_members(MemberChange::AddLearner {
                    id: r.id,
                    addr: r.addr.clone(),
                })
                .await?;
        }
        let target = self.raft.status().info.commit;
        let caught_up = self
            .wait_status(
                "the new member to catch up",
                Duration::from_secs(60),
                |st| {
                    st.info
                        .peers
                        .iter()
                        .any(|p| p.id == r.id && p.progress_known && p.matched >= target)
                },
            )
            .await;
        if let Err(e) = caught_up {
            let st = self.raft.status();
            if !st.is_leader {
                return Err(Status::unavailable(format!(
                    "{}: this master stopped leading meanwhile; master {} stays a learner: \
                     see `quorum info`, then run the same add against the new leader",
                    e.message(),
                    r.id
                )));
            }
            let answered = st
                .info
                .peers
                .iter()
                .find(|p| p.id == r.id && p.answered)
                .map(|p| p.matched);
            if let Some(matched) = answered {
                // Answering but slow (a big snapshot to install): it stays a learner.
                return Err(Status::new(
                    e.code(),
                    format!(
                        "{}: master {} is still catching up as a learner (at index {matched} of {target}); \
                         run the same `quorum add` again to make it a voter once `quorum info` shows it caught up, \
                         or `quorum remove {}`",
                        e.message(),
                        r.id,
                        r.id
                    ),
                ));
            }
            // A learner that never answered would stay listed (and be dialled) for good.
            let undone = self
                .raft
                .change_members(MemberChange::Remove { id: r.id })
                .await;
            return Err(Status::new(
                e.code(),
                format!(
                    "{}: master {} at {} is not running with join = true, or this master cannot reach it; {}",
                    e.message(),
                    r.id,
                    r.addr,
                    match undone {
                        Ok(_) => "it was removed from the group again".to_string(),
                        Err(u) => format!(
                            "removing it again failed ({u}): run `granary admin quorum remove {}`",
                            r.id
                        ),
                    }
                ),
            ));
        }
        self.raft
            .change_members(MemberChange::Promote { id: r.id })
            .await?;
        self.wait_status(
            "the new voter's joint configuration to be left",
            Duration::from_secs(10),
            |st| {
                st.info.outgoing_voters.is_empty()
                    && st.info.peers.iter().any(|p| p.id == r.id && !p.learner)
            },
        )
        .await?;
        tracing::info!(id = r.id, addr = %r.addr, "master added");
        Ok(Response::new(self.quorum()))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("remove_member");
        self.leader_only()?;
        let id = req.into_inner().id;
        let st = self.raft.status();
        if id == st.id {
            // Hand leadership to the most caught-up voter; the caller retries there.
            let next = st
                .info
                .peers
                .iter()
                .filter(|p| p.id != id && !p.learner)
                .max_by_key(|p| p.matched)
                .map(|p| p.id)
                .ok_or_else(|| Status::failed_precondition("cannot remove the only voter"))?;
            self.raft.send(Mail::TransferLeader(next))?;
            self.wait_status("leadership transfer", Duration::from_secs(10), |s| {
                s.leader_id == next
            })
            .await?;
            return Err(self.leader_only().expect_err("leadership moved"));
        }
        self.raft
            .change_members(MemberChange::Remove { id })
            .await?;
        self.wait_status(
            "the removal's joint configuration to be left",
            Duration::from_secs(10),
            |st| st.info.outgoing_voters.is_empty() && !st.info.peers.iter().any(|p| p.id == id),
        )
        .await?;
        tracing::info!(id, "master removed");
        Ok(Response::new(self.quorum()))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<QuorumChangeReply>, Status> {
        count("transfer_leader");
        self.leader_only()?;
        let id = req.into_inner().id;
        if !self
            .raft
            .status()
            .info
            .peers
            .iter()
            .any(|p| p.id == id && !p.learner)
        {
            return Err(Status::not_found(format!("master {id} is not a voter")));
        }
        self.raft.send(Mail::TransferLeader(id))?;
        self.wait_status("leadership transfer", Duration::from_secs(10), |s| {
            s.leader_id == id
        })
        .await?;
        Ok(Response::new(self.quorum()))
    }
}
