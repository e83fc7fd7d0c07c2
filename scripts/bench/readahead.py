#!/usr/bin/env python3
"""Kernel read-ahead A/B: first reads of one snapshot's image.raw through fresh
page-cache mounts, each variant a setting of the mount's kernel read-ahead
(/sys/class/bdi/<dev>/read_ahead_kb) and of its FUSE connection's background
queue (/sys/fs/fuse/connections/<N>/max_background, congestion_threshold).

    .venv/bin/python scripts/bench/readahead.py [--size-mib 1024] [--rounds 4]
        [--variant ra=1024] [--variant ra=8192,bg=32] [--tools dd,cat,dd4k]

Variants run paired in every round, their order rotated between rounds (A B C,
B C A, ...), so a busy moment of the shared machine hits each about equally;
the load average is printed with each round. The packs stay in the page cache
(one warm-up read), so every first read measures the daemon and the kernel, not
the disk (--cold: the packs are evicted before each read). ``ra`` unset keeps
the daemon's own setting.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pagecache import evict, add_reclaim_option, reclaim_paused  # noqa: E402
from read import make_volume, mounted, peak_rss_mb, snapfs, timed  # noqa: E402

MiB = 1 << 20
TOOLS = {"dd": "dd if={} of=/dev/null bs=1M status=none",
         "cat": "cat {} > /dev/null",
         "dd4k": "dd if={} of=/dev/null bs=4k status=none",
         # issue 17's CPU-bound readers ({out}: where they write, a tmpfs by default:
         # written to this disk, write stalls decided their first reads; tools.py)
         "restic": "RESTIC_PASSWORD=x restic -r {out}/restic backup --force -q --no-cache {} "
                   "> /dev/null",
         "qemu-img": "qemu-img convert -f raw -O qcow2 {} {out}/out.qcow2 && "
                     "rm -f {out}/out.qcow2"}


def parse_variant(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("ra", "bg", "cong"):
            raise SystemExit(f"unknown variant key {key!r} (ra, bg, cong)")
        out[key] = int(value)
    return out


def tune(mnt: Path, variant: dict[str, int]) -> None:
    dev = os.stat(mnt).st_dev
    bdi = f"{os.major(dev)}:{os.minor(dev)}"
    conn = Path(f"/sys/fs/fuse/connections/{os.minor(dev)}")
    if ("bg" in variant or "cong" in variant) and not conn.is_dir():
        # fusectl is often not mounted (it is on systemd hosts): mount it once.
        subprocess.run(["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"],
                       check=True)
    if "ra" in variant:
        Path(f"/sys/class/bdi/{bdi}/read_ahead_kb").write_text(str(variant["ra"]))
    if "bg" in variant:
        (conn / "max_background").write_text(str(variant["bg"]))
    if "cong" in variant:
        (conn / "congestion_threshold").write_text(str(variant["cong"]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched(pid: int) -> tuple[float, float]:
    """Seconds the daemon's trio thread ran and waited for a CPU (runnable);
    the rest of the wall time it slept: nothing to do."""
    run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run) / 1e9, int(wait) / 1e9


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def evict_store(store: Path) -> None:
    """The store's files out of the page cache (theirs only: other work on the
    machine keeps its cache), so that a first read reads the disk."""
    for path in store.rglob("*"):
        if path.is_file():
            evict(path)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--tools", default="dd,cat")
    ap.add_argument("--mount-args", default="")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--volume", type=Path, default=None,
                    help="read a snapshot of this image instead of --size-mib random bytes")
    ap.add_argument("--compression", type=int, default=None,
                    help="the store's zstd level (`snapfs compression`; random data stays raw)")
    ap.add_argument("--cold", action="store_true",
                    help="the store's packs out of the page cache before each read")
    ap.add_argument("--out-dir", type=Path, default=Path("/dev/shm"),
                    help="where restic's repository and qemu-img's output go")
    add_reclaim_option(ap)
    args = ap.parse_args()
    variants = [parse_variant(v) if v else {} for v in (args.variant or ["", "ra=8192"])]
    names = [",".join(f"{k}={v}" for k, v in var.items()) or "daemon" for var in variants]
    tools = args.tools.split(",")

    work = Path(tempfile.mkdtemp(prefix="snapfs-ra-", dir=args.dir))
    out = Path(tempfile.mkdtemp(prefix="snapfs-ra-out-", dir=args.out_dir))
    store, vol, mnt = work / "store", work / "volume.raw", work / "mnt"
    mnt.mkdir()
    size = args.size_mib * MiB if args.volume is None else args.volume.stat().st_size
    margs = args.mount_args.split()
    try:
        if args.volume is None:
            make_volume(vol, size, 0)
        else:
            vol = args.volume
        if args.compression is not None:
            snapfs("compression", args.compression, "--store", store)
        snapfs("volume", "add", "bench", vol, "--store", store)
        snapfs("mount", mnt, "--store", store, *margs)
        vdir = mnt / "fr-par-1" / "default" / "volumes" / "bench"
        (vdir / "snap").mkdir()
        snapfs("wait", vdir / "snap")
        image = vdir / "snap" / "image.raw"
        timed(TOOLS["cat"].format(image, out=out))  # the packs warm
        if "restic" in tools:
            subprocess.run(["restic", "-r", str(out / "restic"), "init", "-q"], check=True,
                           env={**os.environ, "RESTIC_PASSWORD": "x"}, capture_output=True)
        times: dict[tuple[str, str], list[float]] = {}
        busy: dict[tuple[str, str], list[tuple[float, float]]] = {}
        idles: dict[tuple[str, str], list[float]] = {}
        rss = 0.0
        for r in range(args.rounds):
            order = list(range(len(variants)))
            order = order[r % len(order):] + order[:r % len(order)]
            line = [f"round {r + 1} load {load()}:"]
            for tool in tools:
                for i in order:
                    snapfs("umount", mnt)
                    snapfs("mount", mnt, "--store", store, *margs)
                    tune(mnt, variants[i])
                    if args.cold:
                        evict_store(store)
                    pid = int(os.getxattr(mnt, "user.pid"))
                    d0, r0, s0 = cpu_seconds(pid), children_cpu(), sched(pid)
                    t = timed(TOOLS[tool].format(image, out=out))
                    d1, r1, s1 = cpu_seconds(pid), children_cpu(), sched(pid)
                    idle = 1 - (s1[0] - s0[0] + s1[1] - s0[1]) / t
                    idles.setdefault((names[i], tool), []).append(idle)
                    rss = max(rss, peak_rss_mb(pid))
                    times.setdefault((names[i], tool), []).append(t)
                    # share of the wall time the daemon / the reader was on a CPU
                    busy.setdefault((names[i], tool), []).append(((d1 - d0) / t, (r1 - r0) / t))
                    line.append(f"{tool}/{names[i]} {size / t / 1e9:.2f}")
            line.append(f"load {load()}")
            print(" ".join(line), flush=True)
        print(f"\nGB/s of first reads, median (min-max) of {args.rounds}:")
        for tool in tools:
            for name in names:
                gb = [size / t / 1e9 for t in times[(name, tool)]]
                daemon = statistics.median(b[0] for b in busy[(name, tool)])
                reader = statistics.median(b[1] for b in busy[(name, tool)])
                print(f"  {tool:<5} {name:<22} {statistics.median(gb):.2f} "
                      f"({min(gb):.2f}-{max(gb):.2f})  on CPU: daemon {daemon:.0%}, "
                      f"reader {reader:.0%}; trio thread asleep "
                      f"{statistics.median(idles[(name, tool)]):.0%}")
        print(f"daemon peak RSS {rss:.0f} MB")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        time.sleep(0.3)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with reclaim_paused("--leave-reclaim" not in sys.argv):
        sys.exit(main())
