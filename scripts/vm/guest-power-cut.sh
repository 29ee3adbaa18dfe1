#!/usr/bin/env bash
# The guest's half of the power-cut test (scripts/vm/power-cut.sh). Runs
# INSIDE the guest, with the test's disk as /dev/vda.
#
#   guest-power-cut.sh write           # until the host cuts the power
#   guest-power-cut.sh verify ROUNDS   # after it, in a fresh guest
#
# write:  ext4 on /dev/vda holds three replicas: r1 and r2 in replica
#         processes, r3 in the engine's process (local:). An NBD client
#         writes, flushes and writes with FUA, printing `acked N` after
#         each round (scripts/vm/power_cut_client.py), until the host
#         SIGKILLs the whole guest.
# verify: mounts the disk again (ext4 replays its journal) and, for each
#         replica alone, starts an engine on it and reads rounds 1..ROUNDS
#         back. Every replica took part in every flush, so each must hold
#         every acknowledged round, with checksums that match.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rvol=$(realpath "${RVOL:-$root/target/release/rvol}")
work=$(mktemp -d /tmp/rvol-cut.XXXXXX)
size=512M
data=/mnt/d
uri=nbd://127.0.0.1:10809/vol
client=("/usr/bin/python3" "$root/scripts/vm/power_cut_client.py")
. "$root/scripts/vm/guest-lib.sh"
trap kill_started EXIT

modprobe virtio_blk
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no /dev/vda: run with scripts/vm/run.sh --disk"
mkdir -p $data

case "${1:-}" in
  write)
    mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 /dev/vda"
    mount /dev/vda $data || fail "mount /dev/vda"
    start_replica 1 $data/r1
    start_replica 2 $data/r2
    start_engine w --replica 127.0.0.1:4101 --replica 127.0.0.1:4102 --replica local:$data/r3 \
      --nbd-listen 127.0.0.1:10809
    log "writing until the power is cut"
    "${client[@]}" write $uri || fail "the client stopped before the power cut"
    ;;
  verify)
    rounds=$2
    [ "$rounds" -ge 1 ] || fail "no round was acknowledged before the cut; the test proves nothing"
    mount /dev/vda $data || fail "mount /dev/vda after the power cut"
    start_replica 1 $data/r1
    start_replica 2 $data/r2
    for r in 127.0.0.1:4101 127.0.0.1:4102 local:$data/r3; do
      tag=v${r##*[:/]}
      start_engine "$tag" --replica "$r" --nbd-listen 127.0.0.1:10809
      "${client[@]}" verify $uri "$rounds" || fail "replica $r after the power cut"
      ! grep -i "checksum" "$work/$tag.log" || fail "replica $r: checksum errors after the power cut"
      stop_engine
      log "PASS replica $r holds all $rounds acknowledged rounds"
    done
    ;;
  *)
    fail "usage: $0 write | verify ROUNDS"
    ;;
esac
