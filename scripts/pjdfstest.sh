#!/usr/bin/env bash
# Runs pjdfstest (the POSIX conformance suite, Rust rewrite, from crates.io) as root on a
# plain directory and on a Granary mount with allow_other (scripts/local-cluster.sh),
# and prints both summaries. Fails if the mount fails a case the plain directory passes.
#   sudo scripts/pjdfstest.sh [TEST_PATTERNS...]
# Env: MASTERS (default 1), SHARDS (default 1), as local-cluster.sh takes them; LOCAL=1
# mounts `granary local --config` instead (one process: the mount calls its master
# in-process).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "pjdfstest needs root (it switches users)" >&2; exit 1; }
tools=$PWD/target/pjdfstest
if [ ! -x "$tools/bin/pjdfstest" ]; then
  dpkg -s libacl1-dev >/dev/null 2>&1 || apt-get install -y libacl1-dev
  cargo install pjdfstest --version 0.2.2 --locked --root "$tools"
fi
# The users pjdfstest switches to.
id tests >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin tests
nobody_group=$(id -gn nobody)
work=$(mktemp -d /tmp/granary-pjdfstest.XXXXXX)
cat > "$work/pjdfstest.toml" <<TOML
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}

[settings]
naptime = 0.05
allow_remount = false

[dummy_auth]
entries = [["nobody", "$nobody_group"], ["tests", "tests"]]
TOML
mkdir -p "$work/plain" "$work/ufs" "$work/mnt"
# The users it switches to must reach both.
chmod 755 "$work"
chmod 777 "$work/plain"

cluster=""
cleanup() {
  [ -n "$cluster" ] && kill -TERM "$cluster" 2>/dev/null && wait "$cluster" 2>/dev/null || true
  if grep -qs " $work/mnt " /proc/mounts; then fusermount3 -u "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; fi
}
trap cleanup EXIT INT TERM
if [ "${LOCAL:-0}" = 1 ]; then
  echo "allow_other = true" > "$work/mount.toml"
  [ -x target/release/granary ] || cargo build --release --workspace --bins
  target/release/granary local --ufs "$work/ufs" --mount "$work/mnt" --state-dir "$work/state" \
    --master-listen 127.0.0.1:0 --config "$work/mount.toml" >"$work/cluster.log" 2>&1 &
else
  MOUNT_EXTRA="allow_other = true" MASTERS=${MASTERS:-1} \
    scripts/local-cluster.sh "$work/ufs" "$work/mnt" "$work/state" >"$work/cluster.log" 2>&1 &
fi
cluster=$!
for _ in $(seq 60); do grep -qs " $work/mnt " /proc/mounts && break; sleep 1; done
grep -qs " $work/mnt " /proc/mounts || { cat "$work/cluster.log" >&2; exit 1; }
chmod 777 "$work/mnt"

summary() { grep -E "FAILED|^Summary" "$1" || true; }
failed() { grep -E " FAILED$" "$1" | awk '{print $1}' | sort; }
(cd "$work" && "$tools/bin/pjdfstest" -c pjdfstest.toml -p "$work/plain" "$@" >plain.out 2>&1) || true
(cd "$work" && "$tools/bin/pjdfstest" -c pjdfstest.toml -p "$work/mnt" "$@" >mount.out 2>&1) || true
echo "== plain directory ($(stat -f -c %T "$work/plain"))"; summary "$work/plain.out"
echo "== Granary mount"; summary "$work/mount.out"
echo "full output: $work/plain.out, $work/mount.out"
worse=$(comm -13 <(failed "$work/plain.out") <(failed "$work/mount.out"))
if [ -n "$worse" ]; then
  echo "failing on the mount only:"; echo "$worse"
  exit 1
fi
