#!/usr/bin/env python3
"""rvol's control-plane benchmark: the cluster's own operations at scale,
and how fast a volume recovers from a lost node.

  scripts/cluster_bench.py scale    [--agents 10] [--volumes 1000] [--replicas 1] [--out DIR]
  scripts/cluster_bench.py recovery [--wait 10] [--out DIR]

scale: a local etcd, a controller and --agents agents on loopback (each its
own disk directory and port range). Creates --volumes volumes, one request
at a time through the API, waits until every replica runs, then attaches
and detaches each volume on a node of its own choice (one engine at a time:
the machine has 2 cores), then deletes them all. Reports p50/p99/max of
each operation, the etcd keys and bytes per volume, and the resident memory
of the controller and of the agents (their own, not their replicas').

recovery: 5 agents, one 3-replica volume attached on the fifth, written at
a steady rate. (1) A replica's node is lost (its agent and replica
SIGKILLed): time until the replacement is placed (the replenish wait plus
the agent lease and the healer's pass) and until it is RW (rebuilt).
(2) The engine's node is lost: time until attaching on another node
succeeds (the agent lease, then the new engine's start).
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time
import urllib.request, urllib.error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RVOL = os.path.join(ROOT, "target", "release", "rvol")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def api(base, method, path, body=None, timeout=120):
    req = urllib.request.Request(base + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode()}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Cluster:
    def __init__(self, work, agents, wait="60s", ttl="10s", first_port=20000, span=None):
        self.work, self.procs, self.agents = work, [], []
        self.etcd_url = "http://127.0.0.1:23890"
        self.etcd = self.spawn(["etcd", "--name", "b", "--data-dir", f"{work}/etcd",
                                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                                "--listen-peer-urls", "http://127.0.0.1:23891",
                                "--initial-advertise-peer-urls", "http://127.0.0.1:23891",
                                "--initial-cluster", "b=http://127.0.0.1:23891",
                                "--quota-backend-bytes", str(4 << 30)], "etcd")
        self.wait_for(lambda: subprocess.run(["etcdctl", "--endpoints", self.etcd_url, "endpoint", "health"],
                                             capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}).returncode == 0, 30)
        self.base = "http://127.0.0.1:7490"
        self.controller = self.spawn([RVOL, "controller", "--etcd", self.etcd_url, "--listen", "127.0.0.1:7490",
                                      "--replica-replenish-wait", wait], "controller")
        span = span or max(20, (12000 // agents))
        for i in range(agents):
            lo = first_port + i * span
            self.agents.append(self.spawn([RVOL, "agent", "--node", f"n{i}", "--etcd", self.etcd_url,
                                           "--listen", "127.0.0.1:0", "--disk", f"{work}/n{i}/disk",
                                           "--zone", f"z{i}", "--ports", f"{lo}-{lo + span - 1}", "--ttl", ttl],
                                          f"agent-n{i}"))
        self.wait_for(lambda: sum(n["alive"] for n in self.get("/v1/nodes")) == agents, 60)

    def spawn(self, argv, name):
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
        self.procs.append(p)
        return p

    def get(self, path):
        try:
            return api(self.base, "GET", path)
        except Exception:
            return []

    @staticmethod
    def wait_for(cond, limit):
        deadline = time.time() + limit
        while not cond():
            if time.time() > deadline:
                raise RuntimeError("timed out")
            time.sleep(0.05)

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", self.work + "/"], capture_output=True)
        for p in self.procs:
            p.wait()


def etcd_usage(etcd_url):
    out = subprocess.run(["etcdctl", "--endpoints", etcd_url, "get", "/rvol/", "--prefix", "-w", "json"],
                         capture_output=True, env={**os.environ, "ETCDCTL_API": "3"}, check=True).stdout
    kvs = json.loads(out).get("kvs", [])
    import base64
    per = {}
    for kv in kvs:
        key = base64.b64decode(kv["key"]).decode()
        kind = key.split("/")[2]
        n, b = per.get(kind, (0, 0))
        per[kind] = (n + 1, b + len(key) + len(base64.b64decode(kv.get("value", ""))))
    return per


def scale(a):
    work = tempfile.mkdtemp(prefix="rvol-cbench-")
    c = Cluster(work, a.agents, wait="10m")
    res = {"agents": a.agents, "volumes": a.volumes, "replicas": a.replicas}
    try:
        lat = {"create": [], "attach": [], "detach": [], "delete": []}
        t0 = time.time()
        for i in range(a.volumes):
            t = time.time()
            api(c.base, "POST", "/v1/volumes", {"name": f"v{i}", "size": a.size, "replicas": a.replicas})
            lat["create"].append(time.time() - t)
        def all_running():
            vs = c.get("/v1/volumes")
            return len(vs) == a.volumes and all(v["state"] == "detached" for v in vs)
        c.wait_for(all_running, 1800)
        res["all_replicas_running_s"] = round(time.time() - t0, 1)
        res["etcd_after_create"] = etcd_usage(c.etcd_url)
        res["rss_kib_after_create"] = {"controller": rss_kib(c.controller.pid),
                                       "agent_max": max(rss_kib(p.pid) for p in c.agents)}
        for i in range(a.volumes):
            t = time.time()
            api(c.base, "POST", f"/v1/volumes/v{i}/attach", {"node": f"n{(i + 1) % a.agents}"})
            lat["attach"].append(time.time() - t)
            t = time.time()
            api(c.base, "POST", f"/v1/volumes/v{i}/detach")
            lat["detach"].append(time.time() - t)
        res["etcd_after_attach"] = etcd_usage(c.etcd_url)
        res["rss_kib_after_attach"] = {"controller": rss_kib(c.controller.pid),
                                       "agent_max": max(rss_kib(p.pid) for p in c.agents)}
        for i in range(a.volumes):
            t = time.time()
            api(c.base, "DELETE", f"/v1/volumes/v{i}")
            lat["delete"].append(time.time() - t)
        res["latency_ms"] = {k: {"p50": round(pct(v, 50) * 1e3, 1), "p99": round(pct(v, 99) * 1e3, 1),
                                 "max": round(max(v) * 1e3, 1)} for k, v in lat.items()}
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
    vol = res["etcd_after_create"].get("volumes", (0, 0))
    print(f"\n{a.volumes} volumes x {a.replicas} replica(s), {a.agents} agents")
    print("| operation | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")
    for k, v in res["latency_ms"].items():
        print(f"| {k} | {v['p50']} | {v['p99']} | {v['max']} |")
    print(f"every replica running {res['all_replicas_running_s']} s after the first create")
    print(f"etcd: {vol[0]} volume keys, {vol[1] / max(1, vol[0]):.0f} bytes per volume record after create; "
          f"all keys: {res['etcd_after_create']}")
    print(f"resident memory: {res['rss_kib_after_create']} after create, {res['rss_kib_after_attach']} after attach/detach")
    return res


def recovery(a):
    work = tempfile.mkdtemp(prefix="rvol-crec-")
    c = Cluster(work, 5, wait=f"{a.wait}s", span=100)
    res = {"replenish_wait_s": a.wait, "agent_ttl_s": 10}
    try:
        for n in ("n4",):
            api(c.base, "POST", f"/v1/nodes/{n}/cordon")
        api(c.base, "POST", "/v1/volumes", {"name": "r", "size": 256 << 20, "replicas": 3})
        api(c.base, "POST", "/v1/nodes/n4/uncordon")
        c.wait_for(lambda: api(c.base, "GET", "/v1/volumes/r")["state"] == "detached", 60)
        # The engine on n4, which holds no replica; n3 is the spare.
        uri = api(c.base, "POST", "/v1/volumes/r/attach", {"node": "n4"})["nbd"]
        api(c.base, "POST", "/v1/nodes/n3/cordon")
        v = api(c.base, "GET", "/v1/volumes/r")
        api(c.base, "POST", "/v1/nodes/n3/uncordon")
        fio = subprocess.Popen(["fio", "--name=rec", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                                "--iodepth=8", "--size=256M", "--rate_iops=2000", "--runtime=600", "--time_based"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        lost = v["replicas"][0]["node"]
        idx = int(lost[1:])
        t0 = time.time()
        c.agents[idx].send_signal(signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", f"{work}/{lost}/disk/"], capture_output=True)
        def placed():
            return any(r["node"] not in (x["node"] for x in v["replicas"]) for r in api(c.base, "GET", "/v1/volumes/r")["replicas"])
        c.wait_for(placed, 600)
        res["node_loss_to_replacement_placed_s"] = round(time.time() - t0, 1)
        c.wait_for(lambda: api(c.base, "GET", "/v1/volumes/r")["state"] == "healthy", 600)
        res["node_loss_to_healthy_s"] = round(time.time() - t0, 1)
        fio.send_signal(signal.SIGKILL)
        fio.wait()
        # The engine's node is lost.
        t0 = time.time()
        c.agents[4].send_signal(signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", f"{work}/n4/disk/"], capture_output=True)
        while True:
            try:
                api(c.base, "POST", "/v1/volumes/r/attach", {"node": "n3"})
                break
            except RuntimeError:
                time.sleep(0.2)
        res["engine_node_loss_to_serving_s"] = round(time.time() - t0, 1)
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["scale", "recovery"])
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--volumes", type=int, default=1000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--size", type=int, default=16 << 20)
    p.add_argument("--wait", type=int, default=10, help="replenish wait, seconds")
    p.add_argument("--out", default=os.path.join(ROOT, "target", "cluster-bench"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res = scale(a) if a.mode == "scale" else recovery(a)
    with open(os.path.join(a.out, f"{a.mode}.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
