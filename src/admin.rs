//! `granary admin …`: cluster state and membership for operators.

use std::time::Duration;

use anyhow::{bail, Context};
use granary_common::auth::AttachToken;
use granary_protos::v1::admin_client::AdminClient;
use granary_protos::v1::{
    AddMemberRequest, QuorumChangeReply, QuorumInfoReply, QuorumInfoRequest, RemoveMemberRequest,
    TransferLeaderRequest,
};
use granary_protos::LEADER_METADATA_KEY;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Authenticated = InterceptedService<Channel, AttachToken>;

pub fn channel(master: &str, token: &str) -> anyhow::Result<Authenticated> {
    let channel =
        granary_common::net::lazy_channel(master, Duration::from_secs(3), Duration::from_secs(120))
            .with_context(|| format!("bad master address {master}"))?;
    Ok(InterceptedService::new(
        channel,
        AttachToken::new(token).map_err(anyhow::Error::msg)?,
    ))
}

/// How long a master (or router) named on the command line gets to answer before the
/// next one is asked.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// The first of `masters` that answers a call (any answer, a refusal included: it is up),
/// so that an admin command neither fails nor hangs on a member that is down, or stopped,
/// while others serve; the first named when none does (the command then reports why).
pub async fn answering<'a>(masters: &'a [String], token: &str) -> &'a str {
    let first = masters
        .first()
        .map_or(granary_fuse_client::cli::DEFAULT_MASTER, String::as_str);
    if masters.len() < 2 {
        return first;
    }
    for m in masters {
        let Ok(mut c) = client(m, token) else {
            continue;
        };
        let answer = tokio::time::timeout(ANSWER_WAIT, c.quorum_info(QuorumInfoRequest {})).await;
        match answer {
            Ok(Ok(_)) => return m,
            Ok(Err(s))
                if !matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                return m
            }
            _ => eprintln!("{m} does not answer; asking the next one"),
        }
    }
    first
}

/// A client of the master's `Admin` service.
pub fn client(master: &str, token: &str) -> anyhow::Result<AdminClient<Authenticated>> {
    Ok(AdminClient::new(channel(master, token)?).max_decoding_message_size(64 << 20))
}

fn print_quorum(q: &QuorumInfoReply) {
    println!(
        "answered by master {} ({})  leader {}  term {}  commit {}  applied {}  conf index {}",
        q.id, q.role, q.leader_id, q.term, q.commit, q.applied, q.conf_index
    );
    if !q.outgoing_voters.is_empty() {
        println!(
            "joint configuration in progress; outgoing voters {:?}",
            q.outgoing_voters
        );
    }
    println!(
        "{:<6} {:<28} {:<8} {:>10}",
        "ID", "ADDRESS", "ROLE", "MATCHED"
    );
    for p in &q.peers {
        let role = if p.id == q.leader_id {
            "leader"
        } else if p.learner {
            "learner"
        } else {
            "voter"
        };
        let matched = if p.progress_known {
            p.matched.to_string()
        } else {
            "-".into()
        };
        println!("{:<6} {:<28} {:<8} {:>10}", p.id, p.addr, role, matched);
    }
}

pub async fn quorum_info(master: &str, token: &str) -> anyhow::Result<()> {
    let mut c = client(master, token)?;
    let q = c
        .quorum_info(QuorumInfoRequest {})
        .await
        .map_err(|s| quorum_refusal(master, s))?
        .into_inner();
    print_quorum(&q);
    Ok(())
}

pub enum QuorumChange {
    Add { id: u64, addr: String },
    Remove { id: u64 },
    TransferLeader { id: u64 },
}

/// Sends a membership change to the leader, following leader hints.
pub async fn quorum_change(master: &str, token: &str, change: QuorumChange) -> anyhow::Result<()> {
    let mut target = master.to_string();
    if let QuorumChange::Add { id, .. } = &change {
        eprintln!("adding master {id}: it joins as a learner and has 60 s to catch up before it becomes a voter");
    }
    for _ in 0..5 {
        let mut c = client(&target, token)?;
        let r: Result<tonic::Response<QuorumChangeReply>, tonic::Status> = match &change {
            QuorumChange::Add { id, addr } => {
                c.add_member(AddMemberRequest {
                    id: *id,
                    addr: addr.clone(),
                })
                .await
            }
            QuorumChange::Remove { id } => c.remove_member(RemoveMemberRequest { id: *id }).await,
            QuorumChange::TransferLeader { id } => {
                c.transfer_leader(TransferLeaderRequest { id: *id }).await
            }
        };
        match r {
            Ok(r) => {
                if let Some(q) = r.into_inner().info {
                    print_quorum(&q);
                }
                return Ok(());
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Err(quorum_refusal(&target, status))
            }
            Err(status) => target = leader_hint(&target, &status, "the leader")?,
        }
    }
    bail!("no leader found after following 5 hints")
}

/// A quorum call's failure; one that `target` does not serve at all names what to ask.
fn quorum_refusal(target: &str, status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unimplemented => anyhow::anyhow!(
            "{target} serves no quorum calls: it is a router, or not a Granary master; give `--master` a master of the group to change (each shard's group has its own)"
        ),
        _ => anyhow::Error::new(status).context(format!("master {target}")),
    }
}

/// After a call to `target` failed with `status`: the leader it names (`target` is not
/// `who`), to try next; else the failure.
pub fn leader_hint(target: &str, status: &tonic::Status, who: &str) -> anyhow::Result<String> {
    match status
        .metadata()
        .get(LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(leader) => {
            eprintln!("{target} is not {who}; retrying on {leader}");
            Ok(leader.to_string())
        }
        None => bail!("{target}: {}", status.message()),
    }
}
