#!/usr/bin/env bash
# Starts a 3-master Raft group, a worker and a mount as separate processes on this
# machine, the way a real deployment runs them (README "Deploying a cluster").
# Ctrl-C stops everything and unmounts.
#   scripts/local-cluster.sh UFS_DIR MOUNTPOINT [STATE_DIR]
# Env: MASTERS (default 3), TOKEN (cluster token, default: a random one).
set -euo pipefail
usage="usage: $0 UFS_DIR MOUNTPOINT [STATE_DIR]"
ufs=$(realpath "${1:?$usage}")
mnt=$(realpath "${2:?$usage}")
state=${3:-$(mktemp -d /tmp/granary-cluster.XXXXXX)}
masters=${MASTERS:-3}
token=${TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
peer_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
bin=$(dirname "$0")/../target/release
[ -x "$bin/granary-master" ] || cargo build --release --workspace --bins --manifest-path "$(dirname "$0")/../Cargo.toml"
mkdir -p "$state"

# Masters listen on 19998, 20008, 20018, ...; the worker on 19990; metrics on 1998x.
port() { echo $((19998 + 10 * ($1 - 1))); }
members=""
addrs=""
for i in $(seq 1 "$masters"); do
  members+="\"$i@127.0.0.1:$(port "$i")\", "
  addrs+="\"127.0.0.1:$(port "$i")\", "
done
members="[${members%, }]"
addrs="[${addrs%, }]"

for i in $(seq 1 "$masters"); do
  cat > "$state/master-$i.toml" <<TOML
id = $i
listen = "127.0.0.1:$(port "$i")"
data_dir = "$state/master-$i"
ufs = "file://$ufs"
members = $members
cluster_token = "$token"
peer_token = "$peer_token"
metrics_listen = "127.0.0.1:$((19980 + i))"
TOML
done
cat > "$state/worker.toml" <<TOML
masters = $addrs
cluster_token = "$token"
data_listen = "127.0.0.1:19990"
cache_dir = "$state/cache"
capacity = "10GiB"
metrics_listen = "127.0.0.1:19989"
TOML
cat > "$state/mount.toml" <<TOML
masters = $addrs
cluster_token = "$token"
TOML

pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if grep -qs " $mnt " /proc/mounts; then fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; fi
}
trap cleanup EXIT INT TERM

for i in $(seq 1 "$masters"); do
  "$bin/granary-master" --config "$state/master-$i.toml" 2>"$state/master-$i.log" & pids+=($!)
done
sleep 1
"$bin/granary-worker" --config "$state/worker.toml" 2>"$state/worker.log" & pids+=($!)
sleep 1
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
$masters masters, a worker and a mount are running; configs and logs in $state.
  GRANARY_CLUSTER_TOKEN=$token target/release/granary admin quorum info --master 127.0.0.1:19998
Ctrl-C stops them.
TXT
wait -n "${pids[@]}"
