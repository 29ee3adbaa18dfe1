#!/usr/bin/env python3
"""rvol's backup benchmark: backup and restore of a volume to a real S3
server (SeaweedFS on 127.0.0.1), against `tar | zstd` of the same bytes
streamed up and down by a standard S3 client (the AWS CLI), in one run.

  scripts/bench.sh --backup [--size BYTES] [--chunk-sizes 1M,4M] [--scattered N] [--out DIR]

An engine serves a volume from 3 replicas on loopback; half of it is
written with random data (fio, every buffer refilled: nothing dedupes or
compresses) and a snapshot is taken.

For each chunk size, into a target of its own:
1. full backup of the snapshot (`rvol backup create`, wall time of the CLI);
2. N random 4 KiB writes (fio), a second snapshot, and an incremental
   backup: its time, chunks and bytes uploaded, requests sent;
3. restore of the incremental backup onto 3 new replicas (every chunk
   written to 3 replicas, flushed).

The peer, once: the first snapshot exported to a sparse file (untimed),
then `tar -cS | zstd -1 -T0 | aws s3 cp -` (timed) and
`aws s3 cp - | zstd -d | tar -xS` plus sync (timed). Both sides start with
their data just written (in the page cache); the peer reads a local file
and writes one copy, rvol reads through its replicas and restores three.

Prints a markdown table; writes backup.json and the processes' logs to --out.
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RVOL, free_port, wait_port  # noqa: E402

ACCESS, SECRET, BUCKET = "rvolbench", "rvolbenchsecret", "bench"


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMG]?)", s)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


class Weed:
    def __init__(self, work, out, tag):
        self.dir, self.log = os.path.join(work, f"weed-{tag}"), os.path.join(out, "backup-weed.log")
        os.makedirs(os.path.join(self.dir, "data"))
        ports = [free_port() for _ in range(10)]
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        cfg = os.path.join(self.dir, "s3.json")
        with open(cfg, "w") as f:
            json.dump({"identities": [{"name": "bench", "credentials": [
                {"accessKey": ACCESS, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        names = ["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port",
                 "filer.port.grpc", "volume.port", "volume.port.grpc", "admin.port",
                 "admin.port.grpc"]
        args = ["weed", "mini", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={cfg}", f"-bucket={BUCKET}"]
        args += [f"-{n}={p}" for n, p in zip(names, ports)]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while subprocess.run(["aws", "s3", "ls", f"s3://{BUCKET}"], env=self.env(),
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "weed did not start; see " + self.log
            time.sleep(0.5)

    def env(self):
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


class Volume:
    """3 replicas and an engine."""

    def __init__(self, work, out, name, size, tag):
        self.procs, self.addrs = [], []
        for i in range(3):
            d = os.path.join(work, f"{tag}-r{i}")
            with open(os.path.join(out, f"backup-{tag}-r{i}.log"), "ab") as err:
                p = subprocess.Popen([RVOL, "replica", "--dir", d, "--listen", "127.0.0.1:0",
                                      "--size", str(size)], stdout=subprocess.PIPE, stderr=err)
            self.procs.append(p)
            self.addrs.append(json.loads(p.stdout.readline())["listen"])
        self.name, self.size, self.out, self.tag = name, size, out, tag
        self.dirs = [os.path.join(work, f"{tag}-r{i}") for i in range(3)]

    def serve(self):
        nbd, admin = free_port(), free_port()
        with open(os.path.join(self.out, f"backup-{self.tag}-engine.log"), "ab") as err:
            self.engine = subprocess.Popen(
                [RVOL, "engine", "--name", self.name, "--size", str(self.size),
                 "--nbd-listen", f"127.0.0.1:{nbd}", "--admin-listen", f"127.0.0.1:{admin}"]
                + [x for a in self.addrs for x in ("--replica", a)],
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "RUST_LOG": "info"})
        wait_port(nbd)
        self.uri, self.admin = f"nbd://127.0.0.1:{nbd}/", f"127.0.0.1:{admin}"

    def stop(self):
        for p in [getattr(self, "engine", None)] + self.procs:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)

    def remove(self):
        self.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def timed(cmd, env=None, shell=False):
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, shell=shell, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {r.stderr}")
    return time.monotonic() - t0, r.stdout


def fio(uri, *args):
    subprocess.run(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", "--output-format=terse",
                    "--end_fsync=1", *args], check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=parse_size, default=4 << 30, help="volume bytes (half written)")
    ap.add_argument("--chunk-sizes", default="1M,4M")
    ap.add_argument("--scattered", type=int, default=20000)
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="rvol-backup-", dir=os.path.join(ROOT, "target"))
    data = a.size // 2
    vols, weeds, results = [], [], {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                     "size": a.size, "data": data, "runs": []}
    try:
        # A server of its own for each run (and the peer): the disk holds
        # one run's objects at a time.
        weed = Weed(work, a.out, "peer")
        weeds.append(weed)
        env = weed.env()
        src = Volume(work, a.out, "bench", a.size, "src")
        vols.append(src)
        src.serve()
        fio(src.uri, "--rw=write", "--bs=1M", "--iodepth=8", f"--size={data}", "--refill_buffers=1")
        subprocess.run([RVOL, "snapshot", "create", "s1", "--admin", src.admin], check=True,
                       capture_output=True)

        # The peer: the same bytes as a sparse file, tarred, compressed, streamed up and back.
        img = os.path.join(work, "vol.img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", src.uri, img], check=True)
        key = f"s3://{BUCKET}/peer/vol.tar.zst"
        peer_up, _ = timed(f"tar -cSf - -C {work} vol.img | zstd -1 -T0 -q | "
                           f"aws s3 cp - {key} --expected-size {a.size}", env=env, shell=True)
        os.remove(img)
        restore_dir = os.path.join(work, "peer-restore")
        os.makedirs(restore_dir)
        peer_down, _ = timed(f"aws s3 cp {key} - | zstd -d -q | tar -xSf - -C {restore_dir} && "
                             f"sync -f {restore_dir}/vol.img", env=env, shell=True)
        shutil.rmtree(restore_dir)
        weed.stop()
        results["peer"] = {"backup_seconds": peer_up, "restore_seconds": peer_down}

        for i, cs in enumerate(a.chunk_sizes.split(",")):
            weed = Weed(work, a.out, cs)
            weeds.append(weed)
            env = weed.env()
            target = f"s3://{BUCKET}/rvol-{cs}"
            snap = "s1" if i == 0 else f"s1-{cs}"
            if i > 0:  # the same contents, a snapshot of its own
                subprocess.run([RVOL, "snapshot", "create", snap, "--admin", src.admin],
                               check=True, capture_output=True)
            full_s, out = timed([RVOL, "backup", "create", "bench", "--snapshot", snap,
                                 "--target", target, "--admin", src.admin, "--chunk-size", cs,
                                 "--json"], env=env)
            full = json.loads(out)["stats"]
            fio(src.uri, "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={data}",
                f"--number_ios={a.scattered}", "--refill_buffers=1", f"--randseed={i + 1}")
            snap2 = f"s2-{cs}"
            subprocess.run([RVOL, "snapshot", "create", snap2, "--admin", src.admin], check=True,
                           capture_output=True)
            inc_s, out = timed([RVOL, "backup", "create", "bench", "--snapshot", snap2,
                                "--target", target, "--admin", src.admin, "--json"], env=env)
            inc = json.loads(out)
            dst = Volume(work, a.out, "bench", a.size, f"dst-{cs}")
            vols.append(dst)
            restore_s, out = timed([RVOL, "backup", "restore", inc["name"], "--target", target,
                                    "--volume", "bench", "--json"]
                                   + [x for ad in dst.addrs for x in ("--replica", ad)], env=env)
            dst.remove()
            weed.stop()
            results["runs"].append({"chunk_size": cs, "full_seconds": full_s, "full": full,
                                    "incremental_seconds": inc_s, "incremental": inc["stats"],
                                    "restore_seconds": restore_s, "restore": json.loads(out)})
    finally:
        for v in vols:
            v.stop()
        for w in weeds:
            w.stop()
        shutil.rmtree(work, ignore_errors=True)

    with open(os.path.join(a.out, "backup.json"), "w") as f:
        json.dump(results, f, indent=1)
    mib, gib = 1 << 20, 1 << 30
    p = results["peer"]
    print(f"volume {a.size / gib:.0f} GiB, {data / gib:.0f} GiB of random data; "
          f"{a.scattered} random 4 KiB writes between the backups; {results['date']}\n")
    print("| | chunk | full backup | MiB/s | vs peer | incremental | chunks up | MiB up | requests "
          "| restore | MiB/s | vs peer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| tar \\| zstd \\| aws s3 cp | - | {p['backup_seconds']:.1f} s "
          f"| {data / mib / p['backup_seconds']:.0f} | 1.00x | - | - | - | - "
          f"| {p['restore_seconds']:.1f} s | {data / mib / p['restore_seconds']:.0f} | 1.00x |")
    for r in results["runs"]:
        inc = r["incremental"]
        print(f"| rvol backup | {r['chunk_size']} | {r['full_seconds']:.1f} s "
              f"| {data / mib / r['full_seconds']:.0f} "
              f"| {p['backup_seconds'] / r['full_seconds']:.2f}x "
              f"| {r['incremental_seconds']:.1f} s | {inc['chunks_uploaded']} "
              f"| {inc['bytes_uploaded'] / mib:.0f} | {inc['requests']} "
              f"| {r['restore_seconds']:.1f} s | {data / mib / r['restore_seconds']:.0f} "
              f"| {p['restore_seconds'] / r['restore_seconds']:.2f}x |")


if __name__ == "__main__":
    main()
