#!/usr/bin/env bash
# The chaos soak (docs/chaos.md): one volume with 3 replicas, each on a node
# of its own (network namespaces, each replica on its own small file
# system), its engine on a fourth node and moved to a fifth, clients
# writing, flushing, trimming and reading through NBD while faults are
# injected on a schedule drawn from the seed; every client operation is
# recorded and the history checked.
#
#   scripts/chaos.sh --seed N --minutes M [--faults replica-kill,link-down,...]
#   scripts/chaos.sh --seed N --minutes M --plan     # print the schedule only
#
# Needs root (namespaces, iptables, loop mounts). Exit status 0: every
# check passed; 1: a violation or finding (printed with the seed and the
# schedule to replay it; the run's directory is kept); 2: the soak could
# not run. Other flags: target/release/rvol-chaos --help.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
install_chaos_deps
cargo build --release --quiet --bin rvol --bin rvol-chaos
exec target/release/rvol-chaos "$@"
