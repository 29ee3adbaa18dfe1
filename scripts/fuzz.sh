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
  log=$(mktemp)
  if [ -n "$toolchain" ]; then
    run=(cargo "$toolchain" fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$secs" -rss_limit_mb=2048)
  else
    run=(cargo fuzz run -s none --fuzz-dir fuzz "$t" -- -max_total_time="$secs")
  fi
  if "${run[@]}" >"$log" 2>&1; then
    tail -n 1 "$log"
  else
    # A crash: show the panic and the reproducer libFuzzer saved.
    grep -E "panicked|Test unit written|SUMMARY|error" "$log" | head -n 20
    tail -n 40 "$log"
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
