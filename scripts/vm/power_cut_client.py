#!/usr/bin/python3
"""The NBD client of the power-cut test (scripts/vm/power-cut.sh), run in
the guest with Debian's python3-libnbd.

  power_cut_client.py write URI          # rounds until the power is cut
  power_cut_client.py verify URI ROUNDS  # checks rounds 1..ROUNDS

Round i writes 1 MiB of data derived from i at i MiB and flushes, then
writes 4 KiB at SMALL_BASE + i * 4 KiB with FUA, and only then prints
`acked i`. So every round the host saw acknowledged was acknowledged
durable twice over, by a flush and by FUA, and must read back after the
power cut.
"""
import hashlib
import sys

import nbd

MIB = 1 << 20
SMALL_BASE = 448 * MIB
ROUNDS_MAX = 400  # slots below SMALL_BASE


def pattern(i, size):
    seed = hashlib.sha256(f"rvol power cut {i} {size}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main():
    mode, uri = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.connect_uri(uri)
    if mode == "write":
        for i in range(1, ROUNDS_MAX + 1):
            h.pwrite(pattern(i, MIB), i * MIB)
            h.flush()
            h.pwrite(pattern(i, 4096), SMALL_BASE + i * 4096, nbd.CMD_FLAG_FUA)
            print(f"acked {i}", flush=True)
        sys.exit("ran out of rounds before the power cut")
    rounds = int(sys.argv[3])
    bad = [i for i in range(1, rounds + 1)
           if h.pread(MIB, i * MIB) != pattern(i, MIB)
           or h.pread(4096, SMALL_BASE + i * 4096) != pattern(i, 4096)]
    if bad:
        sys.exit(f"acknowledged rounds lost or damaged: {bad}")
    print(f"rounds 1..{rounds} read back intact")


if __name__ == "__main__":
    main()
