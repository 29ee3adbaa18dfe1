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

# Flags every replica and engine started below gets: set by secure_setup
# (mutual TLS, and the volume encrypted at rest), empty otherwise.
replica_flags=()
engine_flags=()

# secure_setup DIR: a CA, the replicas' and the volume's certificates and
# the volume's encryption key in DIR (made once, so that they outlast a
# power cut when DIR does), and the flags that use them.
secure_setup() {
  local d=$1
  if [ ! -f "$d/ca/ca.crt" ]; then
    mkdir -p "$d"
    "$rvol" cert ca --dir "$d/ca" >/dev/null
    "$rvol" cert issue --ca-dir "$d/ca" --out "$d/node" --node guest --ip 127.0.0.1 >/dev/null
    "$rvol" cert issue --ca-dir "$d/ca" --out "$d/vol" --volume vol >/dev/null
    head -c 32 /dev/urandom >"$d/volume.secret"
    # Durable before anything is written with them: a power cut that
    # left the key file empty would leave the volume unreadable.
    sync
  fi
  replica_flags=(--tls-cert "$d/node.crt" --tls-key "$d/node.key" --tls-ca "$d/ca/ca.crt")
  engine_flags=(--tls-cert "$d/vol.crt" --tls-key "$d/vol.key" --tls-ca "$d/ca/ca.crt"
    --encryption-key-file "$d/volume.secret")
}

# start_replica N DIR: replica N, serving DIR on 127.0.0.1:410N; waits for
# its ready line, so that an engine started next finds it listening.
start_replica() {
  : >"$work/r$1.ready"
  "$rvol" replica --dir "$2" --listen "127.0.0.1:410$1" --size "$size" "${replica_flags[@]}" \
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
    "${engine_flags[@]}" >"$work/$tag.ready" 2>>"$work/$tag.log" &
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
