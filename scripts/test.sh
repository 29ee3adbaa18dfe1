#!/usr/bin/env bash
# rvol's test command: installs what the tests need, then runs formatting,
# lint, unit, integration and (briefly) fuzz checks.
#
#   scripts/test.sh            # everything CI runs
#   RVOL_FUZZ_SECONDS=0 ...    # skip the fuzz smoke run
#   RVOL_BENCH_CHECK=0 ...     # skip the benchmark regression check
#   RVOL_VM_TESTS=0 ...        # skip the guest tests (real ublk and nbd drivers)
#   RVOL_CHAOS_MINUTES=0 ...   # skip the chaos soak (2 minutes, a fixed seed; longer: set it)
#   RVOL_TEST_TLS=1 cargo test # any test run with mutual TLS between engines and replicas
#   RVOL_TEST_ENCRYPTION=1 cargo test # any test run with every volume encrypted at rest
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
install_test_deps

export CARGO_TERM_COLOR=never
# csi-sanity (the CSI conformance suite) from ../shared/tools, else the PATH.
for c in ../shared/tools/csi-sanity "$(command -v csi-sanity || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then
    export CSI_SANITY=$(realpath "$c")
    break
  fi
done
echo "csi-sanity: ${CSI_SANITY:-not found: the CSI conformance test is SKIPPED}"
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace 2>&1 | tee target/test.log
echo "== deployment files: Kubernetes schema, and every container's flags"
python3 scripts/check_deploy.py --rvol target/debug/rvol
echo "== the replica-path tests again, every replica and engine behind mutual TLS, every volume encrypted"
RVOL_TEST_TLS=1 RVOL_TEST_ENCRYPTION=1 cargo test -p rvol-engine --test rebuild --test snapshots \
  --test replica_loss --test engine_crash --test partition --test seed_drill --test chain_crash \
  --test encryption --test backup 2>&1 | tee -a target/test.log
echo "== guest tests: ublk and kernel NBD in a QEMU guest (skipped, saying so, where it cannot boot)"
if [ "${RVOL_VM_TESTS:-1}" = 1 ]; then
  scripts/vm-test.sh
fi
echo "== chaos soak: random faults on every layer, the clients' history checked (docs/chaos.md)"
if [ "${RVOL_CHAOS_MINUTES:-2}" != 0 ]; then
  rm -rf target/chaos
  scripts/chaos.sh --seed "${RVOL_CHAOS_SEED:-20261207}" --minutes "${RVOL_CHAOS_MINUTES:-2}" \
    --work target/chaos | tee target/chaos.log
fi
echo "== fuzz smoke"
scripts/fuzz.sh "${RVOL_FUZZ_SECONDS:-15}"
echo "== the demo, as a user runs it: a local cluster, a volume written, moved and read back"
scripts/demo.sh --check >target/demo-check.log 2>&1 || { tail -n 40 target/demo-check.log; exit 1; }
grep "demo check passed" target/demo-check.log
echo "== benchmark regression check (a few seconds per job; fails only on gross breakage)"
if [ "${RVOL_BENCH_CHECK:-1}" = 1 ]; then
  cargo build --release --bin rvol
  python3 scripts/bench.py --quick --only nbdkit,rvol-1,rvol-3,rvol-1-local,rvol-3-local,rvol-3-tls,rvol-3-enc --check --out target/bench-check | tail -n 1
fi
# One line for the CI log reader: totals over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' target/test.log
