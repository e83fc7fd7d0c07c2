#!/usr/bin/env python3
"""Sparse images benchmark: tools that skip holes with SEEK_DATA/SEEK_HOLE, on a
snapshot's image.raw through the mount against the same tools on the volume file
itself (a sparse file on the local filesystem, which answers those seeks natively).

A --size-gib volume (default 1024: 1 TiB) holds --data-mib MiB of random data in
64 runs spread over it; it is snapshotted through a fresh mount, then each tool
copies the image, page cache dropped for both sources before each run:
``cp`` (coreutils, --sparse=auto), ``tar -cSf - | wc -c`` and
``qemu-img convert -O qcow2``; every copy is checked (``qemu-img compare``).
Ratio: snapfs time / local file time (1.0: as fast as reading the disk image
directly). Without lseek in the mount each tool would read the whole virtual
size through FUSE (a TiB of zeros: minutes).

    flock /tmp/snapfs-bench.lock .venv/bin/python scripts/bench/sparse.py \\
        [--size-gib 1024] [--data-mib 256] [--runs 3]
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

MiB = 1 << 20
ZONE = "fr-par-1"


def sh(*cmd: object, timeout: float = 600) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          timeout=timeout).stdout


def snapfs(*args: object) -> str:
    return sh(sys.executable, "-m", "snapfs", *args)


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_volume(path: Path, size: int, data: int, runs: int = 64) -> None:
    step, piece = size // runs, data // runs
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(runs):
            f.seek(i * step + (i * 4096) % step)
            f.write(os.urandom(piece))


TOOLS = {
    "cp": lambda src, out: ["cp", src, out],
    "tar -S | wc": lambda src, out: ["sh", "-c", f"tar -cSf - -C '{src.parent}' "
                                     f"'{src.name}' | wc -c > '{out}'"],
    "qemu-img convert": lambda src, out: ["qemu-img", "convert", "-O", "qcow2", src, out],
}


def timed(tool: str, src: Path, out: Path, volume: Path) -> float:
    drop_caches()
    t0 = time.perf_counter()
    sh(*TOOLS[tool](src, out))
    took = time.perf_counter() - t0
    if tool == "cp":
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", out, volume)
    elif tool == "qemu-img convert":
        sh("qemu-img", "compare", "-F", "raw", out, volume)
    out.unlink()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-sparse-", dir=args.dir))
    store, mnt, vol = work / "store", work / "mnt", work / "volume.raw"
    mnt.mkdir()
    try:
        make_volume(vol, args.size_gib << 30, args.data_mib * MiB)
        snapfs("volume", "add", "sparse", vol, "--store", store)
        snapfs("mount", mnt, "--store", store)
        os.mkdir(mnt / ZONE / "default" / "volumes" / "sparse" / "s")
        snapfs("wait", mnt / ZONE / "default" / "volumes" / "sparse" / "s")
        image = mnt / ZONE / "default" / "snapshots" / "s" / "image.raw"
        pid = int(os.getxattr(mnt, "user.pid"))
        print(f"{args.size_gib} GiB volume, {args.data_mib} MiB of data in 64 runs; "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"{'tool':<18} {'snapfs s':>9} {'local file s':>13} {'ratio':>6}")
        for tool in TOOLS:
            ours = min(timed(tool, image, work / "out", vol) for _ in range(args.runs))
            theirs = min(timed(tool, vol, work / "out", vol) for _ in range(args.runs))
            print(f"{tool:<18} {ours:9.3f} {theirs:13.3f} {ours / theirs:6.2f}")
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(f"daemon peak RSS {rss / 1024:.0f} MB; load {os.getloadavg()[0]:.1f}")
    finally:
        if mounted(mnt):
            subprocess.run([sys.executable, "-m", "snapfs", "umount", str(mnt)], check=False)
            if mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
