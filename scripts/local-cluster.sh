#!/usr/bin/env bash
# Starts a 3-master Raft group, a worker and a mount as separate processes on this
# machine, the way a real deployment runs them (README "Deploying a cluster"). With
# SHARDS=N, N shards of that many masters each and a router the worker and mount go
# through. Ctrl-C stops everything and unmounts.
#   scripts/local-cluster.sh UFS_DIR MOUNTPOINT [STATE_DIR]
# Env: MASTERS (per shard, default 3), SHARDS (default 1), TOKEN (cluster token, default:
# a random one), MOUNT_EXTRA (TOML lines added to the mount's config, e.g.
# "allow_other = true").
set -euo pipefail
usage="usage: $0 UFS_DIR MOUNTPOINT [STATE_DIR]"
ufs=$(realpath "${1:?$usage}")
mnt=$(realpath "${2:?$usage}")
state=${3:-$(mktemp -d /tmp/granary-cluster.XXXXXX)}
masters=${MASTERS:-3}
shards=${SHARDS:-1}
token=${TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
bin=$(dirname "$0")/../target/release
[ -x "$bin/granary-master" ] || cargo build --release --workspace --bins --manifest-path "$(dirname "$0")/../Cargo.toml"
mkdir -p "$state"

# Shard s's masters listen on 19998 + 100 s, + 10, + 20, ...; the router on 19997; the
# worker on 19990; metrics on 1998x.
port() { echo $((19998 + 100 * $1 + 10 * ($2 - 1))); }
shard0=""
for i in $(seq 1 "$masters"); do shard0+="\"127.0.0.1:$(port 0 "$i")\", "; done
shard0="[${shard0%, }]"
router="127.0.0.1:19997"

for s in $(seq 0 $((shards - 1))); do
  peer_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  members=""
  for i in $(seq 1 "$masters"); do members+="\"$i@127.0.0.1:$(port "$s" "$i")\", "; done
  for i in $(seq 1 "$masters"); do
    cat > "$state/master-$s-$i.toml" <<TOML
id = $i
shard_id = $s
listen = "127.0.0.1:$(port "$s" "$i")"
data_dir = "$state/master-$s-$i"
ufs = "file://$ufs"
members = [${members%, }]
cluster_token = "$token"
peer_token = "$peer_token"
TOML
    if [ "$s" -gt 0 ]; then echo "routing = $shard0" >> "$state/master-$s-$i.toml"; fi
    if [ "$s" -eq 0 ]; then echo "metrics_listen = \"127.0.0.1:$((19980 + i))\"" >> "$state/master-$s-$i.toml"; fi
  done
done
# With shards, the worker and the mount start from the router; else from shard 0.
if [ "$shards" -gt 1 ]; then entry="[\"$router\"]"; else entry=$shard0; fi
cat > "$state/router.toml" <<TOML
listen = "$router"
masters = $shard0
cluster_token = "$token"
TOML
cat > "$state/worker.toml" <<TOML
masters = $entry
cluster_token = "$token"
data_listen = "127.0.0.1:19990"
cache_dir = "$state/cache"
capacity = "10GiB"
metrics_listen = "127.0.0.1:19989"
TOML
cat > "$state/mount.toml" <<TOML
masters = $entry
cluster_token = "$token"
${MOUNT_EXTRA:-}
TOML

pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if grep -qs " $mnt " /proc/mounts; then fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; fi
}
trap cleanup EXIT INT TERM

for s in $(seq 0 $((shards - 1))); do
  for i in $(seq 1 "$masters"); do
    "$bin/granary-master" --config "$state/master-$s-$i.toml" 2>"$state/master-$s-$i.log" & pids+=($!)
  done
done
sleep 2
if [ "$shards" -gt 1 ]; then
  "$bin/granary-router" --config "$state/router.toml" 2>"$state/router.log" & pids+=($!)
  sleep 1
  for s in $(seq 1 $((shards - 1))); do
    addrs=""
    for i in $(seq 1 "$masters"); do addrs+="127.0.0.1:$(port "$s" "$i"),"; done
    GRANARY_CLUSTER_TOKEN=$token "$bin/granary" admin shards add "$s" "${addrs%,}" --master "$router" >/dev/null
  done
fi
"$bin/granary-worker" --config "$state/worker.toml" 2>"$state/worker.log" & pids+=($!)
sleep 2
"$bin/granary-fuse" --config "$state/mount.toml" "$mnt" 2>"$state/mount.log" & pids+=($!)
sleep 2
for pid in "${pids[@]}"; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "a process exited at startup; its log:" >&2
    for log in "$state"/*.log; do echo "== $log" >&2; tail -5 "$log" >&2; done
    exit 1
  fi
done
cat <<TXT
$shards shard(s) of $masters masters, a worker and a mount are running; configs and logs in $state.
  GRANARY_CLUSTER_TOKEN=$token target/release/granary admin report --master 127.0.0.1:19998
Ctrl-C stops them.
TXT
wait -n "${pids[@]}"
