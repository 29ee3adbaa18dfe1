#!/usr/bin/python3
"""The NBD client of the power-cut test (scripts/vm/power-cut.sh), run in
the guest with Debian's python3-libnbd.

  power_cut_client.py write URI FIRST [LAST]  # rounds FIRST..LAST, or until
                                              # the power is cut
  power_cut_client.py verify URI ROUNDS       # checks rounds 1..ROUNDS

Round i writes 1 MiB of data derived from i at i MiB and flushes, then
writes 4 KiB at SMALL_BASE + i * 8 KiB with FUA, and only then prints
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


def small(i):
    """Every other block: a rebuild copies each small write as a run of its
    own, below the size the replica writes with O_DIRECT, so it goes
    through the page cache, where only a sync makes it durable."""
    return SMALL_BASE + i * 8192


def pattern(i, size):
    seed = hashlib.sha256(f"rvol power cut {i} {size}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def main():
    mode, uri = sys.argv[1], sys.argv[2]
    h = nbd.NBD()
    h.connect_uri(uri)
    if mode == "write":
        first = int(sys.argv[3])
        last = int(sys.argv[4]) if len(sys.argv) > 4 else ROUNDS_MAX
        for i in range(first, last + 1):
            h.pwrite(pattern(i, MIB), i * MIB)
            h.flush()
            h.pwrite(pattern(i, 4096), small(i), nbd.CMD_FLAG_FUA)
            print(f"acked {i}", flush=True)
        if len(sys.argv) <= 4:
            sys.exit("ran out of rounds before the power cut")
        return
    rounds = int(sys.argv[3])
    bad = [i for i in range(1, rounds + 1)
           if h.pread(MIB, i * MIB) != pattern(i, MIB)
           or h.pread(4096, small(i)) != pattern(i, 4096)]
    if bad:
        sys.exit(f"acknowledged rounds lost or damaged: {bad}")
    print(f"rounds 1..{rounds} read back intact")


if __name__ == "__main__":
    main()
