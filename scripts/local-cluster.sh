#!/usr/bin/env bash
# Starts a master, a worker and a mount as separate processes on this machine, the way a
# real deployment runs them (see README "Deploying a cluster"). Ctrl-C stops all three.
#   scripts/local-cluster.sh UFS_DIR MOUNTPOINT [STATE_DIR]
set -euo pipefail
ufs=$(realpath "${1:?usage: $0 UFS_DIR MOUNTPOINT [STATE_DIR]}")
mnt=$(realpath "${2:?usage: $0 UFS_DIR MOUNTPOINT [STATE_DIR]}")
state=${3:-$(mktemp -d /tmp/granary-cluster.XXXXXX)}
bin=$(dirname "$0")/../target/release
[ -x "$bin/granary-master" ] || cargo build --release --manifest-path "$(dirname "$0")/../Cargo.toml"
mkdir -p "$state"

cat > "$state/master.toml" <<TOML
listen = "127.0.0.1:19998"
data_dir = "$state/master"
ufs = "file://$ufs"
metrics_listen = "127.0.0.1:19991"
TOML
cat > "$state/worker.toml" <<TOML
masters = ["127.0.0.1:19998"]
data_listen = "127.0.0.1:19999"
cache_dir = "$state/cache"
capacity = "10GiB"
metrics_listen = "127.0.0.1:19992"
TOML

pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  grep -qs " $mnt " /proc/mounts && { fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; }
}
trap cleanup EXIT INT TERM

"$bin/granary-master" --config "$state/master.toml" 2>"$state/master.log" & pids+=($!)
sleep 0.5
"$bin/granary-worker" --config "$state/worker.toml" 2>"$state/worker.log" & pids+=($!)
sleep 0.5
"$bin/granary-fuse" --master 127.0.0.1:19998 "$mnt" 2>"$state/mount.log" & pids+=($!)
echo "master, worker and mount running; logs in $state. Ctrl-C stops them."
wait -n "${pids[@]}"
