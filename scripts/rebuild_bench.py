#!/usr/bin/env python3
"""rvol's rebuild benchmark: how long a replica takes to come back, against
`cp` of the same data on the same file system in the same run.

  scripts/bench.sh --rebuild [--size BYTES] [--scattered N] [--out DIR]

An engine serves a volume from 2 replicas on loopback; half the volume is
written (1 MiB writes, flushed).

1. Full: replica 1 is killed (SIGKILL), its directory deleted, and a new,
   empty replica started at its address; the engine rebuilds it online.
   The peer is `cp --sparse=always` of the source replica's data layer
   followed by `sync` of the copy: the same bytes, made durable, with no
   network, no hashing and no engine (the rebuild ends with a sync too).
2. Delta: replica 1 is killed again, N random 4 KiB writes land on the data
   while it is away, and it is restarted with its old directory; the engine
   sends only the blocks that differ.

Reported: the engine's own rebuild time (its "rebuild done" log line, from
the cut to the new replica turning RW) and bytes sent, the time to RW seen
from outside (includes the engine's 2 s reconnect period), and the cp time.
Prints a markdown table; writes rebuild.json and the processes' logs to --out.
"""
import argparse, glob, json, os, re, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RVOL, free_port, wait_port  # noqa: E402

DONE = re.compile(r"rebuild done.*copied=(\d+) seconds=([0-9.]+)")


class Replica:
    def __init__(self, work, out, i, size):
        self.dir, self.port, self.size = os.path.join(work, f"r{i}"), free_port(), size
        self.log, self.proc = os.path.join(out, f"rebuild-r{i}.log"), None

    def start(self):
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [RVOL, "replica", "--dir", self.dir, "--listen", f"127.0.0.1:{self.port}",
                 "--size", str(self.size)], stdout=subprocess.PIPE, stderr=err)
        line = self.proc.stdout.readline()
        assert json.loads(line).get("event") == "ready", line

    def kill9(self):
        self.proc.kill()
        self.proc.wait()


def wait_rebuilt(log, seen, timeout=600):
    """Waits for the engine's next "rebuild done" line; returns (bytes, s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log) as f:
            done = DONE.findall(f.read())
        if len(done) > seen:
            copied, secs = done[seen]
            return int(copied), float(secs)
        time.sleep(0.05)
    raise RuntimeError(f"no rebuild finished within {timeout} s; see {log}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4 << 30, help="volume bytes (half is written)")
    ap.add_argument("--scattered", type=int, default=20000,
                    help="random 4 KiB writes while the replica is away (delta round)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for old in glob.glob(os.path.join(a.out, "rebuild-*.log")):
        os.remove(old)
    work = tempfile.mkdtemp(prefix="rvol-rebuild-", dir=os.path.join(ROOT, "target"))
    rs = [Replica(work, a.out, i, a.size) for i in range(2)]
    engine = None
    try:
        for r in rs:
            r.start()
        nbd = free_port()
        uri = f"nbd://127.0.0.1:{nbd}/"
        elog = os.path.join(a.out, "rebuild-engine.log")
        with open(elog, "ab") as err:
            engine = subprocess.Popen(
                [RVOL, "engine", "--name", "rebuild-bench", "--size", str(a.size),
                 "--nbd-listen", f"127.0.0.1:{nbd}", "--admin-listen", f"127.0.0.1:{free_port()}"]
                + [x for r in rs for x in ("--replica", f"127.0.0.1:{r.port}")],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RUST_LOG": "info"})
        wait_port(nbd)
        data = a.size // 2
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                        "--bs=1M", "--iodepth=8", f"--size={data}", "--end_fsync=1",
                        "--output-format=terse"], check=True, capture_output=True)

        # 1. Full rebuild of a replaced replica.
        rs[1].kill9()
        shutil.rmtree(rs[1].dir)
        t0 = time.monotonic()
        rs[1].start()
        full_bytes, full_s = wait_rebuilt(elog, 0)
        full_wall = time.monotonic() - t0
        layer = max(glob.glob(os.path.join(rs[0].dir, "volume-snap-*.img")), key=os.path.getsize)
        copy = os.path.join(work, "copy.img")
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        subprocess.run(["cp", "--sparse=always", layer, copy], check=True)
        subprocess.run(["sync", "-f", copy], check=True)
        cp_s = time.monotonic() - t0
        os.remove(copy)

        # 2. Delta rebuild of a returning replica.
        rs[1].kill9()
        subprocess.run(["fio", "--name=scatter", "--ioengine=nbd", f"--uri={uri}",
                        "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={data}",
                        f"--number_ios={a.scattered}", "--end_fsync=1", "--output-format=terse"],
                       check=True, capture_output=True)
        changed = a.scattered * 4096
        t0 = time.monotonic()
        rs[1].start()
        delta_bytes, delta_s = wait_rebuilt(elog, 1)
        delta_wall = time.monotonic() - t0
    finally:
        if engine and engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            engine.wait(30)
        for r in rs:
            if r.proc and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
                r.proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    mib = 1 << 20
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "size": a.size, "data": data,
        "full": {"bytes": full_bytes, "seconds": full_s, "wall_seconds": full_wall,
                 "cp_seconds": cp_s},
        "delta": {"scattered_writes": a.scattered, "changed_bytes": changed,
                  "bytes": delta_bytes, "seconds": delta_s, "wall_seconds": delta_wall},
    }
    with open(os.path.join(a.out, "rebuild.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"| rebuild | data | sent | engine s | MiB/s | to RW s | cp + sync s | rebuild / cp |\n"
          f"|---|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| full (new replica) | {data / mib:.0f} MiB | {full_bytes / mib:.1f} MiB | "
          f"{full_s:.2f} | {full_bytes / mib / full_s:.0f} | {full_wall:.2f} | {cp_s:.2f} | "
          f"{full_s / cp_s:.2f}× |\n"
          f"| delta ({a.scattered} × 4 KiB) | {changed / mib:.1f} MiB changed | "
          f"{delta_bytes / mib:.1f} MiB | {delta_s:.2f} | - | {delta_wall:.2f} | - | - |")


if __name__ == "__main__":
    main()
