//! `granary admin shards …`: the routing table — list it, add a shard, pin a prefix.
//! Changes go to shard 0's leader (hints followed) or through a router.

use anyhow::{bail, Context};
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{
    AddShardRequest, GetRoutingTableRequest, PinPrefixRequest, ReportRequest, RoutingTable,
    ShardInfo,
};

use crate::admin::{channel, Authenticated};

fn client(addr: &str, token: &str) -> anyhow::Result<RoutingClient<Authenticated>> {
    Ok(RoutingClient::new(channel(addr, token)?))
}

/// The routing table served at `master` (a router, or any master).
pub async fn table(master: &str, token: &str) -> anyhow::Result<RoutingTable> {
    Ok(client(master, token)?
        .get_routing_table(GetRoutingTableRequest {})
        .await
        .with_context(|| format!("routing table from {master}"))?
        .into_inner())
}

pub fn print_table(t: &RoutingTable) {
    println!("routing table version {}", t.version);
    println!("{:<6} MASTERS", "SHARD");
    for s in &t.shards {
        println!("{:<6} {}", s.id, s.masters.join(", "));
    }
    if t.pins.is_empty() {
        println!("no pinned prefixes: paths go to the shard their first component hashes to");
    } else {
        println!("{:<40} SHARD", "PINNED PREFIX");
        for p in &t.pins {
            println!("{:<40} {}", String::from_utf8_lossy(&p.prefix), p.shard);
        }
    }
}

pub async fn list(master: &str, token: &str) -> anyhow::Result<()> {
    print_table(&table(master, token).await?);
    Ok(())
}

pub enum TableChange {
    AddShard { id: u32, masters: Vec<String> },
    Pin { prefix: String, shard: u32 },
}

/// Checks that the masters named for new shard `id` serve it: at least one answers, and
/// every one that answers says it is a master of shard `id`. A table that names masters
/// not running sends every path hashed to the shard (and every root listing) to them,
/// and a shard cannot be taken out of the table again.
async fn check_new_shard(id: u32, masters: &[String], token: &str) -> anyhow::Result<()> {
    let mut answered = 0;
    let mut silent = Vec::new();
    for addr in masters {
        let asked = async {
            crate::admin::client(addr, token)?
                .report(ReportRequest {})
                .await
                .map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(std::time::Duration::from_secs(3), asked).await {
            Ok(Ok(r)) if r.get_ref().shard_id == id => answered += 1,
            Ok(Ok(r)) => bail!(
                "{addr} is a master of shard {}, not of shard {id}: give the new shard's masters `shard_id = {id}`",
                r.get_ref().shard_id
            ),
            Ok(Err(e)) => silent.push(format!("{addr}: {e:#}")),
            Err(_) => silent.push(format!("{addr}: no answer within 3 s")),
        }
    }
    if answered == 0 {
        bail!(
            "none of shard {id}'s masters answers ({}); start them first (with `shard_id = {id}` and `routing`), then add the shard",
            silent.join("; ")
        );
    }
    for s in silent {
        eprintln!("warning: {s}; adding the shard with the masters that answer");
    }
    Ok(())
}

/// Makes a change on shard 0's leader, following leader hints; prints the new table.
pub async fn change(master: &str, token: &str, change: TableChange) -> anyhow::Result<()> {
    if let TableChange::AddShard { id, masters } = &change {
        check_new_shard(*id, masters, token).await?;
    }
    let mut target = master.to_string();
    for _ in 0..5 {
        let mut c = client(&target, token)?;
        let r = match &change {
            TableChange::AddShard { id, masters } => {
                c.add_shard(AddShardRequest {
                    shard: Some(ShardInfo {
                        id: *id,
                        masters: masters.clone(),
                    }),
                })
                .await
            }
            TableChange::Pin { prefix, shard } => {
                c.pin_prefix(PinPrefixRequest {
                    prefix: prefix.as_bytes().to_vec(),
                    shard: *shard,
                })
                .await
            }
        };
        match r {
            Ok(t) => {
                print_table(&t.into_inner());
                return Ok(());
            }
            Err(status) => {
                target = crate::admin::leader_hint(&target, &status, "shard 0's leader")?
            }
        }
    }
    bail!("no leader found after following 5 hints")
}
