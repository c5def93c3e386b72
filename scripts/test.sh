#!/usr/bin/env bash
# Runs every test: unit tests and the whole-cluster integration tests (real processes,
# real FUSE mounts; needs root or /dev/fuse access). Usage: scripts/test.sh [nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# Integration tests start the real binaries, so build them first.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
else
  exec cargo test --workspace --no-fail-fast "$@"
fi
