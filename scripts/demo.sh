#!/usr/bin/env bash
# Runs rvol's demo: a small cluster on this machine. A local etcd, a
# controller, and four agents standing in for nodes: three storage nodes
# (zones a, b, c) and one "front" node that runs engines. It creates a
# 1 GiB volume with 3 replicas through the CLI, one per storage node, and
# attaches it to the front node, served as NBD on 127.0.0.1:10809.
# Ctrl-C detaches the volume (the engine flushes and marks its replicas
# clean) and stops everything.
#
#   scripts/demo.sh            the cluster demo
#   scripts/demo.sh --check    the same, writes and reads back through the
#                              volume, moves it, checks, and stops (a test)
#   scripts/demo.sh --single   one volume without a cluster (rvol demo)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
install_run_deps
cargo build --release --bin rvol
RVOL=$PWD/target/release/rvol

if [ "${1:-}" = "--single" ]; then
  shift
  exec "$RVOL" demo "$@"
fi
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

DIR=$(mktemp -d /tmp/rvol-demo.XXXXXX)
ETCD_PORT=${RVOL_DEMO_ETCD_PORT:-23790}
CTL=127.0.0.1:${RVOL_DEMO_CONTROLLER_PORT:-7400}
export RVOL_CLUSTER=http://$CTL
export RVOL_ETCD=http://127.0.0.1:$ETCD_PORT
PIDS=()

stop() {
  trap - EXIT INT TERM
  echo
  echo "stopping: detaching the volume, then agents, replicas, controller, etcd"
  "$RVOL" volume detach demo >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # Replicas outlive their agents by design: stop them too.
  pkill -TERM -f -- "--dir $DIR/" 2>/dev/null || true
  sleep 1
  pkill -KILL -f -- "$DIR/" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap stop EXIT INT TERM

etcd --name demo --data-dir "$DIR/etcd" \
  --listen-client-urls "$RVOL_ETCD" --advertise-client-urls "$RVOL_ETCD" \
  --listen-peer-urls http://127.0.0.1:$((ETCD_PORT + 1)) \
  --initial-advertise-peer-urls http://127.0.0.1:$((ETCD_PORT + 1)) \
  --initial-cluster demo=http://127.0.0.1:$((ETCD_PORT + 1)) >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$RVOL_ETCD" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
# Replicas are sparse: the demo places them however full this disk is.
"$RVOL" controller --listen "$CTL" --replica-replenish-wait 30s --min-free 0 >"$DIR/controller.out" 2>"$DIR/controller.log" &
PIDS+=($!)
agent() { # NAME ZONE PORTS [--label ...]
  local name=$1 zone=$2 ports=$3
  shift 3
  mkdir -p "$DIR/$name"
  "$RVOL" agent --node "$name" --listen 127.0.0.1:0 --disk "$DIR/$name/disk" \
    --zone "$zone" --ports "$ports" "$@" >"$DIR/$name/agent.out" 2>"$DIR/$name/agent.log" &
  PIDS+=($!)
}
agent front f 10809-10819
agent store-a a 11000-11099 --label tier=storage
agent store-b b 11100-11199 --label tier=storage
agent store-c c 11200-11299 --label tier=storage

for _ in $(seq 100); do
  alive=$("$RVOL" node ls --json 2>/dev/null | grep -c '"alive": true' || true)
  [ "$alive" = 4 ] && break
  sleep 0.2
done
[ "$alive" = 4 ] || { echo "the agents did not register; logs in $DIR"; tail "$DIR"/controller.log "$DIR"/*/agent.log; "$RVOL" node ls; exit 1; }

set -x
"$RVOL" node ls
"$RVOL" volume create demo --size 1G --replicas 3 --node-selector tier=storage --zone-anti-affinity hard
"$RVOL" volume attach demo --node front
"$RVOL" volume get demo
{ set +x; } 2>/dev/null

if [ "$CHECK" = 1 ]; then
  set -x
  qemu-io -f raw -c 'write -P 0xab 0 4M' -c flush nbd://127.0.0.1:10809/
  "$RVOL" volume detach demo
  "$RVOL" volume attach demo --node store-b
  { set +x; } 2>/dev/null
  uri=$("$RVOL" volume get demo --json | sed -n 's/.*"nbd": "\(.*\)".*/\1/p')
  set -x
  qemu-io -f raw -c 'read -P 0xab 0 4M' "$uri" | grep -q 'read 4194304/4194304'
  "$RVOL" volume ls
  { set +x; } 2>/dev/null
  echo "demo check passed"
  exit 0
fi

cat <<TXT

The cluster runs under $DIR. The volume "demo" is served on
nbd://127.0.0.1:10809/ by an engine on node "front", with a replica on each
storage node. In another terminal:

  export RVOL_CLUSTER=$RVOL_CLUSTER
  nbdinfo nbd://127.0.0.1:10809
  qemu-io -f raw nbd://127.0.0.1:10809 -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  $RVOL volume get demo
  $RVOL node ls

Ctrl-C stops it all.
TXT
while true; do sleep 3600; done
