#!/usr/bin/env python3
"""Checks deploy/kubernetes/: every file validates against a named
Kubernetes version's schema (kubernetes-validate, offline, strict), and
every container is given only flags its program accepts: rvol's are parsed
by the rvol binary itself (`rvol ARGS --help` fails on an unknown flag or
a bad value), the CSI sidecars' are checked against the flags their
releases document.

    python3 scripts/check_deploy.py [--rvol target/debug/rvol] [--k8s 1.31.0]
"""
import argparse
import glob
import re
import subprocess
import sys

import yaml

# The flags of the sidecar releases the files name (their READMEs).
SIDECAR_FLAGS = {
    "csi-provisioner": {"csi-address", "leader-election", "feature-gates", "extra-create-metadata",
                        "default-fstype", "timeout", "v", "worker-threads", "http-endpoint"},
    "csi-attacher": {"csi-address", "leader-election", "timeout", "v", "worker-threads", "http-endpoint"},
    "csi-resizer": {"csi-address", "leader-election", "timeout", "v", "handle-volume-inuse-error",
                    "http-endpoint", "workers"},
    "csi-node-driver-registrar": {"csi-address", "kubelet-registration-path", "v", "http-endpoint"},
    "livenessprobe": {"csi-address", "health-port", "probe-timeout", "v"},
}

# Values for the $(VAR)s Kubernetes substitutes.
EXAMPLE_ENV = {"POD_NAME": "rvol-etcd-0", "POD_IP": "10.0.0.5", "NODE_NAME": "n1", "NODE_IP": "10.0.0.1"}


def containers(doc):
    spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rvol", default="target/debug/rvol")
    ap.add_argument("--k8s", default="1.31.0")
    a = ap.parse_args()
    files = sorted(glob.glob("deploy/kubernetes/*.yaml"))
    failures = []
    out = subprocess.run(["kubernetes-validate", "--strict", "--quiet", "-k", a.k8s, *files],
                         capture_output=True, text=True)
    if out.returncode != 0:
        failures.append(f"kubernetes-validate {a.k8s}:\n{out.stdout}{out.stderr}")
    checked = 0
    for f in files:
        for doc in yaml.safe_load_all(open(f)):
            for c in containers(doc or {}):
                args = [re.sub(r"\$\((\w+)\)", lambda m: EXAMPLE_ENV.get(m.group(1), "x"), s)
                        for s in c.get("args", [])]
                image = c["image"].split("/")[-1].split(":")[0]
                where = f"{f}: {doc['metadata']['name']}/{c['name']}"
                if image == "rvol":
                    run = subprocess.run([a.rvol, *args, "--help"], capture_output=True, text=True)
                    if run.returncode != 0:
                        failures.append(f"{where}: rvol {' '.join(args)}: {run.stderr.strip()}")
                elif image in SIDECAR_FLAGS:
                    for s in args:
                        name = s.lstrip("-").split("=")[0]
                        if not s.startswith("-") or name not in SIDECAR_FLAGS[image]:
                            failures.append(f"{where}: {image} has no flag {s!r}")
                elif image != "etcd":
                    failures.append(f"{where}: image {c['image']} is not one this check knows")
                checked += 1
    for m in failures:
        print("FAIL", m)
    print(f"deploy check: {len(files)} files against Kubernetes {a.k8s}, {checked} containers' flags, "
          f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
