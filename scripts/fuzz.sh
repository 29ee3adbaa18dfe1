#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds each (default 60).
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
[ "$secs" -gt 0 ] || { echo "fuzz: skipped (0 seconds)"; exit 0; }
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=+nightly
rustup toolchain list | grep -q nightly || toolchain=
for t in replica_frame replica_metadata nbd_request nbd_handshake; do
  echo "fuzz: $t for ${secs}s"
  if [ -n "$toolchain" ]; then
    cargo $toolchain fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 2
  else
    cargo fuzz run -s none --fuzz-dir fuzz "$t" -- -max_total_time="$secs" 2>&1 | tail -n 2
  fi
done
