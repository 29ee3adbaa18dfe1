#!/usr/bin/env bash
# Power-cut test: every acknowledged flush and FUA write survives the loss
# of the whole node's memory, which a SIGKILL of rvol's processes cannot
# show (their writes wait in the kernel's page cache, which lives on). A
# guest writes through rvol to replicas on a virtual disk until this host
# SIGKILLs QEMU after a given acknowledged round; a second guest mounts
# the same disk and checks every round the first one acknowledged, on each
# replica alone (scripts/vm/guest-power-cut.sh). Four times: while only
# writing, after a new replica's rebuild finished, in the middle of one,
# and while snapshots are created and removed. With the fdatasync of the
# replica's flush removed, every round was lost on every replica: it fails.
#
#   scripts/vm/power-cut.sh [SCENARIO...]   # default: all four; needs
#                                           # scripts/vm/setup.sh and a release build
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
disk=$(mktemp "${TMPDIR:-/tmp}/rvol-power-cut.XXXXXX")
trap 'rm -f "$disk"' EXIT
export RVOL=${RVOL:-$here/../../target/release/rvol} RVOL_VM_ENV=RVOL
# SCENARIO KILL-ON: see guest-power-cut.sh; the host cuts the power when
# the guest prints KILL-ON.
for run in "plain ^acked 10$" "rebuilt ^acked 30$" "rebuilding ^acked 30$" "snapshots ^acked 60$"; do
  read -r scenario kill_on <<<"$run"
  [ $# = 0 ] || [[ " $* " == *" $scenario "* ]] || continue
  truncate -s 0 "$disk"
  truncate -s 2G "$disk"
  out=$("$here/run.sh" --timeout 900 --disk "$disk" --kill-on "$kill_on" -- \
    "$here/guest-power-cut.sh" write "$scenario") || {
    echo "power cut ($scenario): the writing guest failed"
    exit 1
  }
  # The guest printed these lines after the acknowledgements, so the last
  # one the host received names a round acknowledged before the cut.
  last() { echo "$out" | sed -n "s/^$1 \([0-9]*\)\$/\1/p" | tail -n 1; }
  rounds=$(last acked) snapped=$(last snapped) removed=$(last removed)
  echo "power cut ($scenario): QEMU killed; the last round the host saw acknowledged: $rounds" \
    "${snapped:+(snapshots: s$snapped created, s${removed:-0} removed)}"
  "$here/run.sh" --timeout 900 --disk "$disk" -- \
    "$here/guest-power-cut.sh" verify "$scenario" "$rounds" "${snapped:-0}" "${removed:-0}"
done
