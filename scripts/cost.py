#!/usr/bin/env python3
"""rvol's memory and start-up figures for a 1 TiB sparse volume.

  scripts/bench.sh --cost [--seconds N] [--snapshots N] [--out DIR]

One engine and 3 replica processes serve a 1 TiB volume over NBD, with the
replicas' files under target/ (sparse: only written blocks take space).

1. Idle: resident memory (VmRSS) of each process a few seconds after start.
2. Load: fio 4k random writes (qd32) over the first 8 GiB, then 4k random
   reads over the whole TiB; VmRSS at the end and the peak (VmHWM).
3. Snapshots: N rounds of 2,000 random 4k writes and a snapshot.

Writes stay in the first 8 GiB because on this machine's ext4 an fdatasync
after some 20,000 4 KiB writes scattered over a 1 TiB file sometimes fails
with ENOSPC with tens of GiB free (the replica then reports NoSpace and the
engine drops it); see docs/benchmarks.md.
4. Restart: every process is stopped; one replica is started again alone
   and timed to its ready line, which reports its layers and the bytes of
   its block index (also reported for the empty volume at step 1).

Prints a markdown table and writes cost.json to --out.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RVOL, free_port  # noqa: E402

TIB = 1 << 40
WRITE_SPAN = 8 << 30


def mem_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def spawn_ready(args):
    """Starts a process that prints a JSON ready line; returns (proc, line, seconds to it)."""
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline()
    took = time.monotonic() - t0
    ready = json.loads(line)
    if ready.get("event") != "ready":
        raise RuntimeError(f"not a ready line: {line!r}")
    return p, ready, took


def stop(procs):
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def fio(uri, rw, extra):
    span = WRITE_SPAN if "write" in rw else TIB
    args = ["fio", "--name=cost", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            "--iodepth=32", f"--size={span}", "--norandommap", "--randrepeat=0",
            "--output-format=json"] + extra
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio {rw} failed: {out.stderr[-2000:]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    return {"iops": side["iops"], "ios": side["total_ios"]}


def du_bytes(path):
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20, help="of each load job")
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="rvol-cost-", dir=os.path.join(ROOT, "target"))
    procs = []
    fig = {"size": TIB, "seconds": a.seconds, "snapshots": a.snapshots}
    try:
        replicas, names = [], []
        for i in range(3):
            p, ready, took = spawn_ready([RVOL, "replica", "--dir", os.path.join(work, f"r{i}"),
                                          "--listen", "127.0.0.1:0", "--size", str(TIB)])
            procs.append(p)
            replicas += ["--replica", ready["listen"]]
            names.append(f"replica r{i}")
            fig["index_bytes_empty"] = ready["index_bytes"]
        port, admin = free_port(), f"127.0.0.1:{free_port()}"
        p, _, _ = spawn_ready([RVOL, "engine", "--name", "cost", "--size", str(TIB),
                               "--nbd-listen", f"127.0.0.1:{port}", "--admin-listen", admin] + replicas)
        procs.append(p)
        names.append("engine")
        uri = f"nbd://127.0.0.1:{port}/"
        time.sleep(3)
        fig["idle_rss_kib"] = {n: mem_kib(p.pid, "VmRSS") for n, p in zip(names, procs)}

        w = fio(uri, "randwrite", ["--time_based", f"--runtime={a.seconds}"])
        r = fio(uri, "randread", ["--time_based", f"--runtime={a.seconds}"])
        fig["load"] = {"randwrite_iops": w["iops"], "blocks_written": w["ios"], "randread_iops": r["iops"]}
        fig["load_rss_kib"] = {n: mem_kib(p.pid, "VmRSS") for n, p in zip(names, procs)}
        fig["peak_rss_kib"] = {n: mem_kib(p.pid, "VmHWM") for n, p in zip(names, procs)}

        for i in range(a.snapshots):
            fio(uri, "randwrite", ["--number_ios=2000"])
            subprocess.run([RVOL, "snapshot", "create", f"cost-{i}", "--admin", admin],
                           check=True, capture_output=True)
        stop(procs)
        procs = []
        fig["replica_disk_bytes"] = du_bytes(os.path.join(work, "r0"))

        p, ready, took = spawn_ready([RVOL, "replica", "--dir", os.path.join(work, "r0"),
                                      "--listen", "127.0.0.1:0", "--size", str(TIB)])
        procs.append(p)
        fig["restart"] = {"seconds_to_ready": took, "layers": ready["layers"],
                          "index_bytes": ready["index_bytes"], "rss_kib": mem_kib(p.pid, "VmRSS")}
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    fig["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    fig["machine"] = f"{os.cpu_count()} CPUs, {os.uname().release}"
    with open(os.path.join(a.out, "cost.json"), "w") as f:
        json.dump(fig, f, indent=2)

    mib = lambda kib: f"{kib / 1024:.1f}"
    lines = ["| process | idle RSS MiB | RSS after load MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
    for n in fig["idle_rss_kib"]:
        lines.append(f"| {n} | {mib(fig['idle_rss_kib'][n])} | {mib(fig['load_rss_kib'][n])} | "
                     f"{mib(fig['peak_rss_kib'][n])} |")
    rs = fig["restart"]
    lines += [
        "",
        f"- Load: {fig['load']['randwrite_iops']:.0f} write IOPS for {a.seconds} s "
        f"({fig['load']['blocks_written']} random 4 KiB blocks in the first 8 GiB), then "
        f"{fig['load']['randread_iops']:.0f} read IOPS over the whole TiB.",
        f"- Block index: {fig['index_bytes_empty']} B for the empty 1 TiB volume; "
        f"{rs['index_bytes']} B ({rs['index_bytes'] / 2**20:.1f} MiB) after the load and "
        f"{a.snapshots} snapshots ({rs['layers']} layers).",
        f"- Replica restart with {rs['layers']} layers: ready in {rs['seconds_to_ready'] * 1000:.0f} ms, "
        f"{mib(rs['rss_kib'])} MiB resident.",
        f"- Disk used by one replica: {fig['replica_disk_bytes'] / 2**20:.0f} MiB.",
    ]
    md = "\n".join(lines)
    with open(os.path.join(a.out, "cost.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
