#!/usr/bin/env bash
# The guest's half of the power-cut test (scripts/vm/power-cut.sh). Runs
# INSIDE the guest, with the test's disk as /dev/vda.
#
#   guest-power-cut.sh write SCENARIO           # until the host cuts the power
#   guest-power-cut.sh verify SCENARIO ROUNDS [SNAPPED REMOVED]
#                                               # after it, in a fresh guest
#
# Every engine and replica runs with mutual TLS (where on TCP) and the
# volume encrypted at rest (secure_setup, keys and certificates on the
# disk that outlives the cut).
#
# write:  ext4 on /dev/vda holds three replicas: r1 and r2 in replica
#         processes, r3 in the engine's process (local:). An NBD client
#         writes, flushes and writes with FUA, printing `acked N` after
#         each round (scripts/vm/power_cut_client.py), until the host
#         SIGKILLs the whole guest. SCENARIO says what else goes on:
#           plain       nothing;
#           rebuilt     after round 20 a new replica r4 is added, and the
#                       rounds go on once its rebuild has finished;
#           rebuilding  the same, but the rounds go on while the rebuild,
#                       held to 1 MiB/s, copies the 20 MiB before it;
#           snapshots   beside the rounds, a loop creates snapshot sN and
#                       removes s(N-2) (whose data the background purge
#                       folds into the next layer), printing `snapped N`
#                       and `removed N` once each is acknowledged.
# verify: mounts the disk again (ext4 replays its journal) and, for each
#         replica alone, starts an engine on it and reads rounds 1..ROUNDS
#         back. Every replica in the set took part in every flush, so each
#         must hold every acknowledged round, with checksums that match.
#         r4 after `rebuilt` too. r4 after `rebuilding` holds a part of the
#         volume: alone it must be refused, and next to r1 it must be
#         rebuilt again and then hold every round. After `snapshots`,
#         each replica alone must also list the snapshots acknowledged
#         created and not acknowledged removed, and none acknowledged
#         removed.
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

# status_is EXPR: a Python expression over the engine's status `s` holds.
status_is() {
  "$rvol" volume status --admin "unix:$work/admin.sock" --json |
    /usr/bin/python3 -c "import json, sys; s = json.load(sys.stdin); sys.exit(0 if ($1) else 1)"
}

# wait_status WHAT EXPR: until status_is EXPR, for up to 60 s.
wait_status() {
  for _ in $(seq 300); do
    status_is "$2" && return 0
    sleep 0.2
  done
  fail "$1: not within 60 s"
}

# snapshots_are REPLICA: the engine's chain holds the snapshots it must
# (see the header), from $snapped and $removed.
snapshots_are() {
  local live
  live=$("$rvol" snapshot ls --admin "unix:$work/admin.sock" --json | /usr/bin/python3 -c '
import json, sys
print(" ".join(l["name"] for l in json.load(sys.stdin) if not l["removed"]))')
  local j
  for ((j = 1; j <= removed; j++)); do
    [[ " $live " != *" volume-snap-s$j.img "* ]] || fail "replica $1: s$j, removed before the cut, is back: $live"
  done
  for ((j = (removed > snapped - 2 ? removed : snapped - 2) + 1; j <= snapped; j++)); do
    [[ " $live " == *" volume-snap-s$j.img "* ]] || fail "replica $1: s$j, created before the cut, is lost: $live"
  done
  log "PASS replica $1 lists s$((snapped - 1))..s$snapped and none of s1..s$removed"
}

# verify_alone REPLICA ROUNDS: an engine on REPLICA alone serves every round.
verify_alone() {
  local tag=v${1##*[:/]}
  start_engine "$tag" --replica "$1" --nbd-listen 127.0.0.1:10809
  "${client[@]}" verify $uri "$2" || fail "replica $1 after the power cut"
  ! grep -i "checksum" "$work/$tag.log" || fail "replica $1: checksum errors after the power cut"
  [ "$scenario" != snapshots ] || snapshots_are "$1"
  stop_engine
  log "PASS replica $1 holds all $2 acknowledged rounds"
}

modprobe virtio_blk
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no /dev/vda: run with scripts/vm/run.sh --disk"
mkdir -p $data
scenario=${2:-}

case "${1:-}" in
  write)
    mkfs.ext4 -q -F /dev/vda || fail "mkfs.ext4 /dev/vda"
    mount /dev/vda $data || fail "mount /dev/vda"
    secure_setup $data/pki
    start_replica 1 $data/r1
    start_replica 2 $data/r2
    rate=()
    [ "$scenario" = rebuilding ] && rate=(--rebuild-rate-mib 1)
    start_engine w --replica 127.0.0.1:4101 --replica 127.0.0.1:4102 --replica local:$data/r3 \
      --nbd-listen 127.0.0.1:10809 "${rate[@]}"
    first=1
    case "$scenario" in
      plain) ;;
      rebuilt | rebuilding)
        "${client[@]}" write $uri 1 20 || fail "rounds 1..20"
        start_replica 4 $data/r4
        "$rvol" replica add 127.0.0.1:4104 --admin "unix:$work/admin.sock" >/dev/null ||
          fail "replica add"
        if [ "$scenario" = rebuilt ]; then
          wait_status "r4 rebuilt" "[r['mode'] for r in s['replicas']].count('RW') == 4"
        else
          wait_status "r4's rebuild under way" "s['rebuild'] is not None and s['rebuild']['copied'] > 0"
        fi
        log "r4 added; rounds go on ($scenario)"
        first=21
        ;;
      snapshots)
        (
          for ((i = 1; ; i++)); do
            "$rvol" snapshot create "s$i" --admin "unix:$work/admin.sock" >/dev/null || exit 1
            echo "snapped $i"
            if [ $i -gt 2 ]; then
              "$rvol" snapshot rm "s$((i - 2))" --admin "unix:$work/admin.sock" >/dev/null || exit 1
              echo "removed $((i - 2))"
            fi
          done
        ) &
        pids+=($!)
        ;;
      *) fail "unknown scenario $scenario" ;;
    esac
    log "writing until the power is cut"
    "${client[@]}" write $uri $first || fail "the client stopped before the power cut"
    ;;
  verify)
    rounds=$3 snapped=${4:-0} removed=${5:-0}
    [ "$rounds" -ge 1 ] || fail "no round was acknowledged before the cut; the test proves nothing"
    mount /dev/vda $data || fail "mount /dev/vda after the power cut"
    secure_setup $data/pki
    start_replica 1 $data/r1
    start_replica 2 $data/r2
    for r in 127.0.0.1:4101 127.0.0.1:4102 local:$data/r3; do
      verify_alone $r "$rounds"
    done
    case "$scenario" in
      rebuilt | rebuilding) start_replica 4 $data/r4 ;;
    esac
    case "$scenario" in
      plain) ;;
      snapshots)
        [ "$snapped" -ge 3 ] && [ "$removed" -ge 1 ] ||
          fail "only $snapped snapshots created and $removed removed before the cut; the test proves little"
        ;;
      rebuilt) verify_alone 127.0.0.1:4104 "$rounds" ;;
      rebuilding)
        rc=0
        timeout 60 "$rvol" engine --name vol --size $size --admin-listen "unix:$work/admin.sock" \
          --replica 127.0.0.1:4104 --nbd-listen 127.0.0.1:10809 "${engine_flags[@]}" \
          >/dev/null 2>"$work/alone.log" || rc=$?
        [ $rc != 0 ] && [ $rc != 124 ] && grep -q "interrupted rebuild" "$work/alone.log" ||
          fail "an engine on r4 alone, whose rebuild the cut interrupted, was not refused (exit $rc)"
        log "PASS r4 alone is refused: its rebuild was interrupted"
        start_engine again --replica 127.0.0.1:4104 --replica 127.0.0.1:4101 --nbd-listen 127.0.0.1:10809
        wait_status "r4 rebuilt again" \
          "[r['mode'] for r in s['replicas']] == ['RW', 'RW'] and s['rebuilt_bytes'] > 0"
        stop_engine
        verify_alone 127.0.0.1:4104 "$rounds"
        ;;
      *) fail "unknown scenario $scenario" ;;
    esac
    ;;
  *)
    fail "usage: $0 write SCENARIO | verify SCENARIO ROUNDS [SNAPPED REMOVED]"
    ;;
esac
