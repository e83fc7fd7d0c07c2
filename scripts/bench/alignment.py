#!/usr/bin/env python3
"""Why bulk-read buffers are page-aligned (snapfs.memory.aligned_buffer): the
kernel's copy from the page cache into a user buffer, per MiB, by the buffer's
offset from a page boundary. malloc puts a large bytearray's bytes at page + 16.

    .venv/bin/python scripts/bench/alignment.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time

MiB = 1 << 20
OFFSETS = (0, 8, 16, 24, 32, 64, 4096 - 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(args.mib * MiB))
        f.flush()
        fd = f.fileno()
        for off in range(0, args.mib * MiB, MiB):  # cached: only the copy is timed
            os.pread(fd, MiB, off)
        region = memoryview(mmap.mmap(-1, 2 * MiB))  # page-aligned
        times: dict[int, list[float]] = {o: [] for o in OFFSETS}
        for _ in range(args.rounds):
            for o in OFFSETS:
                view = region[o:o + MiB]
                t = time.perf_counter()
                for off in range(0, args.mib * MiB, MiB):
                    os.preadv(fd, [view], off)
                times[o].append((time.perf_counter() - t) / args.mib * 1e6)
        print("offset from a page boundary: us per MiB copied (median of rounds)")
        for o in OFFSETS:
            print(f"{o:>6}  {statistics.median(times[o]):7.0f}")


if __name__ == "__main__":
    main()
