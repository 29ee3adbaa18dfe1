# Helpers for the scripts that run INSIDE the guest (sourced). The caller
# sets $work, a directory for logs; `pids` collects processes to kill on exit.
pids=()

log() { echo "guest: $*"; }

fail() {
  echo "guest: FAIL: $*" >&2
  for f in "$work"/*.log; do
    echo "--- $f" >&2
    tail -n 15 "$f" >&2
  done
  exit 1
}

kill_started() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}

# wait_ready WHAT FILE PID: until FILE has a ready line; fails if PID exits first.
wait_ready() {
  for _ in $(seq 600); do
    grep -q '"ready"' "$2" && return 0
    kill -0 "$3" 2>/dev/null || fail "$1 exited before it was ready"
    sleep 0.1
  done
  fail "$1 not ready within 60 s"
}

# start_replica N DIR: replica N, serving DIR on 127.0.0.1:410N; waits for
# its ready line, so that an engine started next finds it listening.
start_replica() {
  : >"$work/r$1.ready"
  "$rvol" replica --dir "$2" --listen "127.0.0.1:410$1" --size "$size" \
    >"$work/r$1.ready" 2>>"$work/r$1.log" &
  replica_pid[$1]=$!
  pids+=($!)
  wait_ready "replica r$1" "$work/r$1.ready" $!
}

# start_engine TAG ARGS...: an engine for the volume "vol" with the
# replicas and frontends ARGS name; waits for its ready line.
start_engine() {
  local tag=$1
  shift
  : >"$work/$tag.ready"
  "$rvol" engine --name vol --size "$size" --admin-listen "unix:$work/admin.sock" "$@" \
    >"$work/$tag.ready" 2>>"$work/$tag.log" &
  engine_pid=$!
  pids+=($!)
  wait_ready "engine $tag" "$work/$tag.ready" $engine_pid
}

stop_engine() { # SIGTERM; expects exit 0
  kill -TERM $engine_pid
  local rc=0
  wait $engine_pid || rc=$?
  [ $rc = 0 ] || fail "engine exited with $rc on SIGTERM"
}
