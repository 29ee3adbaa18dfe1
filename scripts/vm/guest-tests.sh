#!/usr/bin/env bash
# rvol's tests against real kernel block drivers (ublk_drv, nbd). Runs
# INSIDE the guest that scripts/vm-test.sh boots; every step uses real rvol
# processes, the kernel's drivers, mkfs/mount and fio.
#
#   RVOL=target/release/rvol scripts/vm/guest-tests.sh [all|bench|cluster]
#
# all:   ext4 across an engine restart (ublk, then kernel NBD); fio verify
#        with a replica SIGKILLed; fio verify across an engine SIGKILL with
#        user recovery; a stale device cleaned up by the next engine; the
#        cluster (etcd, a controller, two agents) attaching a volume as
#        /dev/ublkbN on one node, then on the other, with ext4 across.
#        A replica whose disk turns slow (dm-delay) is reported and evicted.
# bench: fio on /dev/ublkb0 and /dev/nbd0 attached to the same volume.
# cluster: the cluster and CSI tests alone.
# slowdisk: the slow disk test alone.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rvol=$(realpath "${RVOL:-$root/target/release/rvol}")
what=${1:-all}
work=$(mktemp -d /tmp/rvol-guest.XXXXXX)
cd "$work" # fio writes state files here; the host tree is read-only
size=512M
. "$root/scripts/vm/guest-lib.sh"
cleanup() {
  umount /mnt/t 2>/dev/null || true
  nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
  kill_started
  sleep 0.5
  umount /mnt/slow 2>/dev/null || true
  dmsetup remove rvolslow 2>/dev/null || true
}
trap cleanup EXIT

# The volume's replicas: three processes, on ports 4101-4103.
replicas=(--replica 127.0.0.1:4101 --replica 127.0.0.1:4102 --replica 127.0.0.1:4103)

# files_write DEV: mkfs, mount, write files, record checksums, unmount.
files_write() {
  mkfs.ext4 -q -F "$1" || fail "mkfs.ext4 $1"
  mkdir -p /mnt/t
  mount "$1" /mnt/t || fail "mount $1"
  head -c 24M /dev/urandom >/mnt/t/random.bin
  cp -r "$root/engine/src" /mnt/t/src
  (cd /mnt/t && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/files.sha256"
  umount /mnt/t
}

files_check() { # DEV
  mount "$1" /mnt/t || fail "mount $1 after the restart"
  (cd /mnt/t && sha256sum --quiet -c "$work/files.sha256") || fail "files differ after the restart"
  umount /mnt/t
}

# fio_start DEV NAME: random writes over 48 MiB, then a verify of all of
# them, in the background (fio_pid).
fio_start() {
  fio --name="$2" --filename="$1" --ioengine=io_uring --direct=1 \
    --rw=randwrite --bs=4k --iodepth=32 --size=48M --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0 --output="$work/$2.fio" &
  fio_pid=$!
}

fio_wait() { # NAME: fio must end with status 0 and no error
  local rc=0
  wait $fio_pid || rc=$?
  [ $rc = 0 ] && grep -q "err= 0" "$work/$1.fio" || fail "fio $1 (status $rc): $(tail -n 8 "$work/$1.fio")"
}

# still_running WHAT: the disruption must land while fio is still at work.
fio_still_running() {
  kill -0 $fio_pid 2>/dev/null || fail "fio ended before $1; the test proves nothing (raise --size)"
}

# cluster_up: etcd, a controller and three agents (g1, g2, g3) in the guest,
# once; RVOL_CLUSTER names the controller.
cluster_up() {
  [ -z "${cluster_started:-}" ] || return 0
  cluster_started=1
  etcd --name g --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster g=http://127.0.0.1:23800 >"$work/etcd.log" 2>&1 &
  pids+=($!)
  "$rvol" controller --etcd http://127.0.0.1:23790 --listen 127.0.0.1:7400 --min-free 0 \
    >"$work/controller.ready" 2>>"$work/controller.log" &
  pids+=($!)
  wait_ready controller "$work/controller.ready" $!
  for n in 1 2 3; do
    mkdir -p "$work/node$n"
    "$rvol" agent --node "g$n" --etcd http://127.0.0.1:23790 --listen "127.0.0.1:750$n" \
      --disk "$work/node$n" --ports "1${n}100-1${n}199" --keys-dir "$work/keys$n" \
      >"$work/agent$n.ready" 2>>"$work/agent$n.log" &
    pids+=($!)
    wait_ready "agent g$n" "$work/agent$n.ready" $!
  done
  export RVOL_CLUSTER=http://127.0.0.1:7400
  for _ in $(seq 100); do
    [ "$("$rvol" node ls --json | grep -c '"alive": true')" = 3 ] && break
    sleep 0.2
  done
}

# cluster_test: a volume attached through the cluster as /dev/ublkbN on one
# node, then on the other, ext4 across.
cluster_test() {
  log "cluster: a volume attached through the cluster as a ublk device, moved between nodes"
  cluster_up
  "$rvol" volume create cv --size 256M --replicas 2 >/dev/null || fail "volume create"
  dev=$("$rvol" volume attach cv --node g1 --frontend ublk | python3 -c 'import json,sys; print(json.load(sys.stdin)["device"])') ||
    fail "attach on g1 as ublk"
  [ -b "$dev" ] || fail "$dev is not a block device"
  files_write "$dev"
  "$rvol" volume detach cv >/dev/null || fail "detach from g1"
  [ ! -e "$dev" ] || fail "detach left $dev behind"
  dev=$("$rvol" volume attach cv --node g2 --frontend ublk | python3 -c 'import json,sys; print(json.load(sys.stdin)["device"])') ||
    fail "attach on g2 as ublk"
  files_check "$dev"
  "$rvol" volume detach cv >/dev/null || fail "detach from g2"
  log "PASS ext4 on a cluster volume's ublk device, on one node and then another"
}

# csi_test: csi-sanity, the CSI conformance suite, against `rvol csi`
# serving every service over the guest's cluster, volumes published as
# ublk devices, for file system and block volumes.
csi_test() {
  local sanity=$root/../shared/tools/csi-sanity
  [ -x "$sanity" ] || sanity=$(command -v csi-sanity || true)
  if [ -z "$sanity" ]; then
    log "SKIPPED csi-sanity: not in ../shared/tools nor on the PATH"
    return 0
  fi
  log "csi: csi-sanity against rvol csi, volumes as ublk devices"
  cluster_up
  "$rvol" csi --endpoint "unix://$work/csi.sock" --cluster "$RVOL_CLUSTER" --controller \
    --frontend ublk --node --node-id g1 --keys-dir "$work/keys1" >"$work/csi.ready" 2>>"$work/csi.log" &
  pids+=($!)
  wait_ready csi "$work/csi.ready" $!
  printf 'numberOfReplicas: "2"\n' >"$work/sc.yaml"
  for type in mount block; do
    "$sanity" --csi.endpoint "unix://$work/csi.sock" --csi.stagingdir "$work/csi-staging-$type" \
      --csi.mountdir "$work/csi-mount-$type" --csi.testvolumeparameters "$work/sc.yaml" \
      --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
      --csi.testvolumeaccesstype "$type" --ginkgo.no-color >"$work/sanity-$type.out" 2>&1 ||
      fail "csi-sanity ($type): $(grep -E '\[FAIL\]|FAIL!' "$work/sanity-$type.out" | head -30)"
    log "PASS csi-sanity ($type): $(grep -E '^Ran |SUCCESS' "$work/sanity-$type.out" | tr '\n' ' ')"
  done
  log "csi: the kubelet's walk (create, publish, stage, write, move to another node, expand, delete; an encrypted volume)"
  "$rvol" csi --endpoint "unix://$work/csi2.sock" --cluster "$RVOL_CLUSTER" \
    --node --node-id g2 --keys-dir "$work/keys2" >"$work/csi2.ready" 2>>"$work/csi2.log" &
  pids+=($!)
  wait_ready "csi on g2" "$work/csi2.ready" $!
  mkdir -p "$work/walk"
  "$root/target/release/examples/kubelet_walk" "$work/csi.sock" "$work/csi.sock" "$work/csi2.sock" \
    "$work/walk" "$work/node1" "$work/node2" "$work/node3" >"$work/walk.out" 2>&1 ||
    fail "the kubelet's walk: $(cat "$work/walk.out")"
  grep "^walk:" "$work/walk.out" | sed 's/^/guest: /'
  log "PASS the kubelet's walk"
}

# fio_p99 NAME SECS: verified 4 KiB random writes (a flush every 8) at
# queue depth 4 through the NBD export on port 10810 for SECS seconds;
# prints the p99 of their completion latency in microseconds.
fio_p99() {
  fio --name="$1" --ioengine=nbd --uri=nbd://127.0.0.1:10810/vol --rw=randwrite --bs=4k \
    --iodepth=4 --size=32M --fsync=8 --time_based --runtime="$2" --verify=crc32c \
    --verify_fatal=1 --verify_state_save=0 --output-format=json --output="$work/$1.json" ||
    fail "fio $1: $(tail -n 5 "$work/$1.json")"
  python3 -c "import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index('{'):]); \
print(round(j['jobs'][0]['write']['clat_ns']['percentile']['99.000000'] / 1000))" "$work/$1.json"
}

# volume_status PYTHON-EXPR: evaluates EXPR on the engine's status (s).
volume_status() {
  curl -sf --unix-socket "$work/admin.sock" http://rvol/v1/volume |
    python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}

# slow_disk_test: one replica's file system sits on a dm-delay device
# that turns slow (200 ms a request) under load. The engine must report
# that replica slow, with its figures, within 30 s, evict it, and the
# writes' p99 must come back within 1.5x of its figure before; fio
# verifies every write throughout.
slow_disk_test() {
  log "slow disk: a replica on a dm-delay device is reported and evicted; p99 recovers"
  modprobe loop && modprobe dm-delay || fail "modprobe loop dm-delay"
  truncate -s 1G "$work/slow.img"
  local dev sectors p99_before p99_after
  dev=$(losetup -f --show "$work/slow.img") || fail "losetup"
  sectors=$(blockdev --getsz "$dev")
  dmsetup create rvolslow --table "0 $sectors delay $dev 0 0" || fail "dmsetup create"
  dmsetup mknodes rvolslow # no udev in the guest to make /dev/mapper/rvolslow
  mkfs.ext4 -q /dev/mapper/rvolslow || fail "mkfs on the delay device"
  mkdir -p /mnt/slow
  mount /dev/mapper/rvolslow /mnt/slow || fail "mount the delay device"
  start_replica 11 /mnt/slow/r
  start_replica 12 "$work/s12"
  start_replica 13 "$work/s13"
  start_engine slow --replica 127.0.0.1:41011 --replica 127.0.0.1:41012 --replica 127.0.0.1:41013 \
    --nbd-listen 127.0.0.1:10810 --evict-slow-replicas --slow-replica-seconds 4
  p99_before=$(fio_p99 slow-before 6)
  dmsetup suspend rvolslow && dmsetup reload rvolslow --table "0 $sectors delay $dev 0 200" &&
    dmsetup resume rvolslow || fail "slowing the delay device"
  fio --name=slow-during --ioengine=nbd --uri=nbd://127.0.0.1:10810/vol --rw=randwrite --bs=4k \
    --iodepth=4 --size=32M --fsync=8 --time_based --runtime=20 --verify=crc32c --verify_fatal=1 \
    --verify_state_save=0 --output="$work/slow-during.fio" &
  local writer=$! reported=
  for _ in $(seq 60); do
    reported=$(volume_status "s['replicas'][0].get('slow') or ''")
    [ -n "$reported" ] && break
    sleep 0.5
  done
  [ -n "$reported" ] || fail "the slow replica was not reported within 30 s"
  log "reported slow: $reported"
  for _ in $(seq 60); do
    [ "$(volume_status "s['replicas'][0]['mode']")" = ERR ] && break
    sleep 0.5
  done
  [ "$(volume_status "s['replicas'][0]['mode']")" = ERR ] || fail "the slow replica was not evicted"
  volume_status "s['replicas'][0]['last_error']" | grep -q "evicted as slow" || fail "eviction reason"
  wait $writer || fail "fio during the slowdown: $(tail -n 5 "$work/slow-during.fio")"
  grep -q "err= 0" "$work/slow-during.fio" || fail "fio during the slowdown saw errors"
  p99_after=$(fio_p99 slow-after 6)
  log "write p99: ${p99_before} us before the slowdown, ${p99_after} us after the eviction"
  [ "$p99_after" -le $((p99_before * 3 / 2)) ] || fail "p99 ${p99_after} us after the eviction, ${p99_before} us before"
  stop_engine
  log "PASS a replica on a slow disk is reported ($reported) and evicted; p99 back within 1.5x"
}

mkdir -p /mnt/t
if [ "$what" = slowdisk ]; then
  secure_setup "$work/pki"
  slow_disk_test
  exit 0
fi
if [ "$what" = cluster ]; then
  cluster_test
  csi_test
  exit 0
fi
# The device tests run with mutual TLS between the engine and its
# replicas and the volume encrypted at rest (the cluster's run them plain).
[ "$what" = bench ] || secure_setup "$work/pki"
for i in 1 2 3; do start_replica $i "$work/r$i"; done

if [ "$what" = bench ]; then
  start_engine bench "${replicas[@]}" --frontend ublk --ublk-id 0 --nbd-listen 127.0.0.1:10809
  nbd-client -N vol -b 4096 127.0.0.1 10809 /dev/nbd0 >/dev/null || fail "nbd-client"
  printf '%-22s %12s %12s %8s\n' job ublk nbd ublk/nbd
  for job in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
    set -- $job
    r=()
    for dev in /dev/ublkb0 /dev/nbd0; do
      out=$(fio --name=b --filename=$dev --ioengine=io_uring --direct=1 --rw="$1" --bs="$2" \
        --iodepth="$3" --size=256M --runtime=10 --time_based --output-format=json)
      r+=("$(echo "$out" | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']))")")
    done
    printf '%-22s %12s %12s %8.2f\n' "$1 $2 qd$3 (IOPS)" "${r[0]}" "${r[1]}" "$(echo "${r[0]} ${r[1]}" | awk '{print $1/$2}')"
  done
  nbd-client -d /dev/nbd0 >/dev/null
  stop_engine
  exit 0
fi

log "ublk: ext4 survives an engine stop and start (mutual TLS to the replicas, encrypted at rest)"
start_engine u1 "${replicas[@]}" --frontend ublk --ublk-id 0
grep -q '"device":"/dev/ublkb0"' "$work/u1.ready" || fail "ready line has no device: $(cat "$work/u1.ready")"
[ -b /dev/ublkb0 ] || fail "/dev/ublkb0 missing"
[ "$(cat /sys/block/ublkb0/queue/logical_block_size)" = 4096 ] || fail "logical block size"
[ "$(cat /sys/block/ublkb0/queue/write_cache)" = "write back" ] || fail "volatile cache not set"
[ "$(ls /sys/block/ublkb0/mq | wc -l)" -ge 2 ] || fail "expected several hardware queues"
files_write /dev/ublkb0
stop_engine
[ ! -e /dev/ublkb0 ] || fail "SIGTERM left /dev/ublkb0 behind"
start_engine u2 "${replicas[@]}" --frontend ublk --ublk-id 0
files_check /dev/ublkb0
log "PASS ext4 on ublk across an engine restart"

log "ublk: fio verify while replica 2 is SIGKILLed"
fio_start /dev/ublkb0 ublk-replica-kill
sleep 3
fio_still_running "replica 2 was killed"
kill -9 "${replica_pid[2]}"
fio_wait ublk-replica-kill
start_replica 2 "$work/r2"
log "PASS fio verify on ublk with a replica killed"

log "ublk: engine SIGKILLed during fio verify; a new engine recovers the device"
fio_start /dev/ublkb0 recover
sleep 4
fio_still_running "the engine was killed"
kill -9 $engine_pid
wait $engine_pid 2>/dev/null || true
sleep 1
[ -b /dev/ublkb0 ] || fail "the device vanished with its engine"
start_engine u3 "${replicas[@]}" --frontend ublk --ublk-id 0
grep -q '"recovered":true' "$work/u3.ready" || fail "the new engine did not recover the device: $(cat "$work/u3.ready")"
fio_wait recover
stop_engine
log "PASS fio verify across an engine SIGKILL (user recovery)"

log "ublk: a device left by a killed engine without recovery is replaced"
start_engine u4 "${replicas[@]}" --frontend ublk --ublk-id 0 --no-user-recovery
kill -9 $engine_pid
wait $engine_pid 2>/dev/null || true
sleep 1
start_engine u5 "${replicas[@]}" --frontend ublk --ublk-id 0
grep -q "deleting stale ublk device" "$work/u5.log" || fail "no message about the stale device"
[ -b /dev/ublkb0 ] || fail "no device after replacing the stale one"
dd if=/dev/ublkb0 of=/dev/null bs=1M count=4 iflag=direct status=none || fail "reading the new device"
stop_engine
log "PASS stale device cleanup"

log "kernel NBD: ext4 across an engine restart, fio verify"
start_engine n1 "${replicas[@]}" --nbd-listen 127.0.0.1:10809
nbd-client -N vol 127.0.0.1 10809 /dev/nbd0 >/dev/null || fail "nbd-client attach"
files_write /dev/nbd0
nbd-client -d /dev/nbd0 >/dev/null
stop_engine
start_engine n2 "${replicas[@]}" --nbd-listen 127.0.0.1:10809
nbd-client -N vol 127.0.0.1 10809 /dev/nbd0 >/dev/null || fail "nbd-client attach"
files_check /dev/nbd0
fio_start /dev/nbd0 nbd-verify
fio_wait nbd-verify
nbd-client -d /dev/nbd0 >/dev/null
stop_engine
log "PASS ext4 and fio verify on /dev/nbd0"

slow_disk_test
cluster_test
csi_test
log "all guest tests passed"
