//! `granary admin shards …`: the routing table — list it, add a shard, pin a prefix.
//! Changes go to shard 0's leader (hints followed) or through a router.

use anyhow::{bail, Context};
use granary_protos::v1::routing_client::RoutingClient;
use granary_protos::v1::{
    AddShardRequest, GetRoutingTableRequest, PinPrefixRequest, RoutingTable, ShardInfo,
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

/// Makes a change on shard 0's leader, following leader hints; prints the new table.
pub async fn change(master: &str, token: &str, change: TableChange) -> anyhow::Result<()> {
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
