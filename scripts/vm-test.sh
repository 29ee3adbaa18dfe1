#!/usr/bin/env bash
# rvol against real kernel drivers: boots a throw-away QEMU guest whose
# kernel has ublk_drv and nbd (this host's has neither) and runs
# scripts/vm/guest-tests.sh in it with the freshly built release binary.
#
#   scripts/vm-test.sh          # the guest tests and the power-cut test
#                               # (scripts/vm/power-cut.sh; part of scripts/test.sh)
#   scripts/vm-test.sh bench    # fio on /dev/ublkb0 vs /dev/nbd0, same volume
#
# Skips, saying so, when this machine cannot prepare or boot the guest
# (no root, no network for the kernel package, no TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
skip() {
  echo "vm tests: SKIPPED: $*"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "preparing the guest needs root"
scripts/vm/setup.sh || skip "scripts/vm/setup.sh could not prepare the guest kernel"
out=$(scripts/vm/run.sh --timeout 180 -- sh -c 'test -e /dev/ublk-control && test -e /dev/nbd0 && echo up' 2>&1) || true
[ "$(echo "$out" | tail -n 1)" = up ] || skip "the guest did not boot: $(echo "$out" | tail -n 3)"
cargo build --release --bin rvol --example kubelet_walk
start=$(date +%s)
rc=0
RVOL=$PWD/target/release/rvol RVOL_VM_ENV=RVOL \
  scripts/vm/run.sh --timeout 2400 -- scripts/vm/guest-tests.sh "${1:-all}" || rc=$?
echo "vm tests: guest run took $(($(date +%s) - start)) s, exit status $rc"
if [ $rc = 0 ] && [ "${1:-all}" = all ]; then
  start=$(date +%s)
  scripts/vm/power-cut.sh || rc=$?
  echo "vm tests: power-cut test took $(($(date +%s) - start)) s, exit status $rc"
fi
exit $rc
