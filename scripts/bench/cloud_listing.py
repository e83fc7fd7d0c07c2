#!/usr/bin/env python3
"""Cloud listing benchmark: ``ls -l snapshots/`` of a zone holding N Instance and N
Block snapshots, through `snapfs mount --backend scaleway` against `snapfs serve`.

The store gets a local SSD volume (``l_ssd``: its snapshots are the Instance API's)
and a block volume (``b_ssd``: the Block Storage API's); N snapshots of each are
created through the local service directly (quick), then served. A fresh mount
lists snapshots/ (cold: both APIs' lists, every page) and again right after
(warm: within the listing TTL). Targets (issue 15, as for the local listing):
cold <= 3 s, warm <= 1 s. The load average is printed with the figures.

``--read`` then runs scripts/bench/cloud_read.py (image.raw streaming against the
qemu-img anchor, target >= 1.0x): its snapshot is made by mkdir in a ``b_ssd``
volume, so since this issue it is a Block snapshot read through Block's export
(the script prints ``user.api``).

    .venv/bin/python scripts/bench/cloud_listing.py [--per-api 5000] [--read]
                                                    [--data-mib 1024] [--dir DIR]
                                                    [--keep DIR]

``--keep DIR``: the store is populated there once and reused by later runs (each
run still mounts afresh): for repeated timings and profiling.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the `snapfs serve` helpers

from fixtures_http import ACCESS_KEY, SECRET, start_server, stop_server  # noqa: E402

ZONE = "fr-par-1"
BATCH = 1000  # snapshots created before waiting for their captures (queue bound: 4096)


def snapfs(*args: object, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "snapfs", *map(str, args)], check=True,
                          capture_output=True, text=True, env=env).stdout


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def timed_ls(path: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    out = subprocess.run(["ls", "-l", str(path)], check=True, capture_output=True,
                         text=True).stdout
    took = time.perf_counter() - t0
    return took, [line.split()[-1] for line in out.splitlines()[1:]]


async def bulk_create(store: Path, count: int) -> float:
    from snapfs.local import open_local_service
    async with open_local_service(store) as svc:
        vols = (await svc.list_volumes(ZONE)).items
        t0 = time.perf_counter()
        for vol in vols:
            for start in range(0, count, BATCH):
                ids = []
                for i in range(start, min(count, start + BATCH)):
                    snap = await svc.create_snapshot(ZONE, name=f"{vol.name}-{i:05d}",
                                                     volume_id=vol.id)
                    ids.append(snap.id)
                # Captures run in this process (and their queue is bounded): let a
                # batch finish before the next.
                for sid in ids:
                    while (await svc.get_snapshot(ZONE, sid)).state == "snapshotting":
                        await trio.sleep(0.01)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-api", type=int, default=5000)
    ap.add_argument("--read", action="store_true", help="also run cloud_read.py")
    ap.add_argument("--data-mib", type=int, default=1024, help="for --read")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None,
                    help="a directory kept between runs: its store is made once and reused "
                         "(for repeated timings and profiling)")
    args = ap.parse_args()
    if args.keep is not None:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="snapfs-cloud-listing-", dir=args.dir))
    store, mnt = work / "store", work / "mnt"
    shutil.rmtree(work / "mount-state", ignore_errors=True)
    mnt.mkdir(exist_ok=True)
    server = None
    try:
        if not (work / "populated").exists():
            for name, vtype in (("local", "l_ssd"), ("block", "b_ssd")):
                vol = work / f"{name}.raw"
                vol.write_bytes(os.urandom(64 * 1024))  # every snapshot shares these chunks
                snapfs("volume", "add", name, vol, "--type", vtype, "--store", store)
            took = trio.run(bulk_create, store, args.per_api)
            print(f"created {2 * args.per_api} snapshots through the service in {took:.1f}s")
            (work / "populated").write_text(str(args.per_api))
        server, url = start_server(store, work / "serve.log", {"SCW_SECRET_KEY": SECRET})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SCW_", "AWS_"))}
        env.update(SCW_ACCESS_KEY=ACCESS_KEY, SCW_SECRET_KEY=SECRET, SCW_API_URL=url,
                   SCW_DEFAULT_ZONE=ZONE, SCW_CONFIG_PATH=str(work / "no-scw.yaml"))
        snapfs("mount", mnt, "--store", work / "mount-state", "--backend", "scaleway",
               env=env)
        snaps = mnt / ZONE / "default" / "snapshots"
        load = os.getloadavg()
        cold, names = timed_ls(snaps)
        warm, names2 = timed_ls(snaps)
        expected = 2 * args.per_api
        assert len(names) == len(set(names)) == len(names2) == expected, (
            len(names), len(set(names)), len(names2))
        apis = {os.getxattr(snaps / n, "user.api").decode() for n in ("local-00000",
                                                                       "block-00000")}
        assert apis == {"instance", "block"}, apis
        print(f"ls -l snapshots/ ({expected} entries: {args.per_api} Instance + "
              f"{args.per_api} Block, each once): fresh mount {cold:.2f}s (target <= 3), "
              f"warm {warm:.2f}s (target <= 1); load average {load[0]:.2f} "
              f"{load[1]:.2f} {load[2]:.2f} (before), {os.getloadavg()[0]:.2f} (after)")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            if mounted(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if server is not None:
            stop_server(server)
        time.sleep(0.5)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.read:
        print("image.raw of a Block snapshot (scripts/bench/cloud_read.py):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts/bench/cloud_read.py"),
                        "--data-mib", str(args.data_mib),
                        *(["--dir", str(args.dir)] if args.dir else [])], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
