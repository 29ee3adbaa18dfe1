#!/usr/bin/env bash
# Runs rvol's demo: 3 replicas under a temporary directory (the first in
# the engine's process, two as replica processes) and an engine
# serving NBD on 127.0.0.1:10809. Ctrl-C stops everything cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
install_run_deps
cargo build --release --bin rvol
exec target/release/rvol demo "$@"
