#!/usr/bin/env python3
"""Lease benchmark: what a read lease on an idle volume costs the next writer.

A service snapshots a small volume (taking a read lease on it, snapfs/local/
leases.py); another process then opens the volume for writing, which breaks the
lease: its open() waits until the service's SIGIO handler has marked the lease
broken and let go. Timed against the same open with no lease held, in the same
run, ten times each; the service's loop is otherwise idle.

    .venv/bin/python scripts/bench/lease.py [--rounds 10] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import trio

from snapfs.local import open_local_service

OPEN = ("import os, time; t = time.perf_counter(); fd = os.open({!r}, os.O_RDWR); "
        "print(time.perf_counter() - t); os.close(fd)")


async def open_for_write(vol: Path) -> float:
    """Seconds a fresh process's open(O_RDWR) of ``vol`` took."""
    out = await trio.run_process([sys.executable, "-c", OPEN.format(str(vol))],
                                 capture_stdout=True)
    return float(out.stdout)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-lease-", dir=args.dir))
    try:
        vol = work / "v.raw"
        vol.write_bytes(os.urandom(4 << 20))
        leased: list[float] = []
        plain: list[float] = []
        async with open_local_service(work / "store") as svc:
            v = await svc.add_volume("v", vol)
            for i in range(args.rounds):
                snap = await svc.create_snapshot("fr-par-1", name=f"s{i}", volume_id=v.id)
                while (await svc.get_snapshot("fr-par-1", snap.id)).state == "snapshotting":
                    await trio.sleep(0.01)
                leased.append(await open_for_write(vol))  # breaks the lease just taken
                plain.append(await open_for_write(vol))  # no lease any more
        ms = 1000
        print(f"open(O_RDWR) of the volume, median of {args.rounds} (max):")
        print(f"  lease held by the service: {statistics.median(leased) * ms:.3f} ms "
              f"({max(leased) * ms:.3f})")
        print(f"  no lease:                  {statistics.median(plain) * ms:.3f} ms "
              f"({max(plain) * ms:.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
