#!/usr/bin/env python3
"""Listing benchmark: 10,000 snapshots in one project, ``ls -l snapshots/``.

    .venv/bin/python scripts/bench/listing.py [--snapshots 10000] [--mkdirs 300]

--mkdirs snapshots are made through the mount with ``mkdir`` (the mkdir rate is
reported); the rest are created through the service directly, beside the running
mount (the store allows that), to keep the run short. Then, on a fresh mount,
``ls -l snapshots/`` is timed (cold: every List page fetched), and again right
after (warm: within the listing TTL). Targets: cold <= 3 s, warm <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ZONE = "fr-par-1"


def snapfs(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "snapfs", *map(str, args)], check=True,
                   capture_output=True, text=True)


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def timed_ls(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(["ls", "-l", str(path)], check=True, capture_output=True).stdout
    return time.perf_counter() - t0, out.count(b"\n") - 1


async def bulk_create(store: Path, count: int) -> float:
    from snapfs.local import open_local_service
    async with open_local_service(store) as svc:
        vol = (await svc.list_volumes(ZONE)).items[0]
        t0 = time.perf_counter()
        ids = []
        for i in range(count):
            snap = await svc.create_snapshot(ZONE, name=f"bulk-{i:05d}", volume_id=vol.id)
            ids.append(snap.id)
        for sid in ids:  # captures run in this process: let them finish
            while (await svc.get_snapshot(ZONE, sid)).state == "snapshotting":
                await trio.sleep(0.01)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=10000)
    ap.add_argument("--mkdirs", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-listing-", dir=args.dir))
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir()
    vol = work / "tiny.raw"
    vol.write_bytes(os.urandom(64 * 1024))  # every snapshot shares these chunks
    try:
        snapfs("volume", "add", "tiny", vol, "--store", store)
        snapfs("mount", mnt, "--store", store)
        project = mnt / ZONE / "default"
        vdir = project / "volumes" / "tiny"
        t0 = time.perf_counter()
        for i in range(args.mkdirs):
            os.mkdir(vdir / f"mk-{i:05d}")
        mk = time.perf_counter() - t0
        print(f"mkdir through the mount: {args.mkdirs} in {mk:.2f}s = "
              f"{args.mkdirs / mk:.0f} snapshots/s")
        rest = args.snapshots - args.mkdirs
        took = trio.run(bulk_create, store, rest)
        print(f"created {rest} more through the service in {took:.1f}s")
        snapfs("umount", mnt)
        snapfs("mount", mnt, "--store", store)  # fresh: nothing cached
        cold, n = timed_ls(project / "snapshots")
        warm, n2 = timed_ls(project / "snapshots")
        assert n == n2 == args.snapshots, (n, n2)
        print(f"ls -l snapshots/ ({n} entries): fresh mount {cold:.2f}s (target <= 3), "
              f"warm {warm:.2f}s (target <= 1)")
        time.sleep(2.5)  # past the listing TTL: the daemon lists again, the kernel keeps attrs
        again, _ = timed_ls(project / "snapshots")
        print(f"ls -l snapshots/ after the TTL: {again:.2f}s")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            if mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        time.sleep(0.5)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
