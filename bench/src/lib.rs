//! rvol benchmarks live in `benches/`; see scripts/bench.sh for the fio harness.
