#!/usr/bin/env python3
"""Where an I/O's CPU goes: runs one fio job against an rvol volume (after
filling it with 1M writes, as the jobs before it in the benchmark do) and
prints its throughput, p50 and p99 latency, and CPU seconds per GiB of
each process (replicas, engine, fio).
For A/B runs of two builds, point --root at another checkout (its
target/release/rvol is used).

  python3 scripts/cpu_split.py [--job seqread|randread|seqwrite|randwrite|randwrite-qd1] [--target rvol-1] [--root DIR] [--engine-arg=ARG ...]
"""
import argparse, importlib.util, json, os, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {
    "seqread": ["--rw=read", "--bs=1M", "--iodepth=8", "--loops=16"],
    "randread": ["--rw=randread", "--bs=4k", "--iodepth=32", "--io_size=1G",
                 "--randrepeat=0", "--norandommap"],
    "seqwrite": ["--rw=write", "--bs=1M", "--iodepth=8", "--loops=4"],
    "randwrite": ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--io_size=512M",
                  "--randrepeat=0", "--norandommap"],
    "randwrite-qd1": ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--io_size=64M",
                      "--randrepeat=0", "--norandommap"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", choices=JOBS, default="seqread")
    ap.add_argument("--target", default="rvol-1", help="rvol-N, rvol-N-unix, or another of scripts/bench.py's targets (nbdkit)")
    ap.add_argument("--root", default=ROOT, help="checkout whose build to run")
    ap.add_argument("--engine-arg", action="append", default=[],
                    help="an extra argument for rvol engine (repeat; e.g. --engine-arg=--direct-reads=false)")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.RVOL = os.path.join(a.root, "target", "release", "rvol")
    work = tempfile.mkdtemp(prefix="rvol-cpu-", dir=os.path.join(ROOT, "target"))
    t = bench.start(a.target, work, 1 << 30, engine_args=a.engine_arg)
    try:
        fio = ["fio", "--name=x", "--size=1G", "--output-format=json"] + t.fio
        # Like scripts/bench.py, where these jobs follow the 1M sequential write.
        if a.job != "seqwrite":
            subprocess.run(fio + ["--rw=write", "--bs=1M", "--iodepth=8"], capture_output=True, check=True)
        before = [bench.cpu_seconds([p]) for p in t.pids()]
        out = subprocess.run(fio + JOBS[a.job], capture_output=True, text=True, check=True)
        used = [bench.cpu_seconds([p]) - b for p, b in zip(t.pids(), before)]
    finally:
        t.stop()
        subprocess.run(["rm", "-rf", work])
    j = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    r = j["read" if "read" in a.job else "write"]
    gib = r["io_bytes"] / 2**30
    fio_cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100 * r["runtime"] / 1000
    # bench.start spawns the replicas first, then the engine (or the one
    # server of another target).
    server = "engine" if a.target.startswith("rvol") else a.target
    parts = [(f"replica{i}", c) for i, c in enumerate(used[:-1])] + [(server, used[-1]), ("fio", fio_cpu)]
    split = "  ".join(f"{name} {c / gib:.2f}" for name, c in parts)
    total = sum(c for _, c in parts) / gib
    pct = r["clat_ns"].get("percentile", {})
    lat = "/".join(f"{pct.get(p, 0) / 1000:.0f}" for p in ("50.000000", "99.000000"))
    print(f"{a.target} {a.job}: {r['bw_bytes'] / 2**20:.0f} MiB/s, p50/p99 {lat} µs; CPU s/GiB: {split}  total {total:.2f}")


if __name__ == "__main__":
    main()
