#!/usr/bin/env python3
"""The export's own per-byte work without the upload: a stored snapshot (1 GiB
of random data in 2 GiB, as scripts/bench/export.py) read, checked, encoded and
cut into parts that a null uploader hands back at once. Paired rounds of
checkouts (``NAME=DIR``, each run in a process of its own with that snapfs),
CPU-seconds and wall time of each; the page cache holds the packs (as after
a capture: the export benches' case).

    .venv/bin/python scripts/bench/encode.py --rounds 5 base=/tmp/base new=.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from export import make_volume  # noqa: E402
from export_ab import CAPTURE  # noqa: E402

RUN = """
import inspect, json, resource, sys, time, trio
from snapfs.local import open_local_service
from snapfs.memory import limit_malloc_arenas
from snapfs.qcow2.encoder import StreamingEncoder
import snapfs.s3.export as ex
limit_malloc_arenas()

async def main():
    store, snap_id = sys.argv[1:3]
    async with open_local_service(store) as svc:
        image = await svc.open_image("fr-par-1", snap_id)
        enc = StreamingEncoder(image.size)
        limiter = trio.CapacityLimiter(2)
        buffers = ex._Buffers(8 << 20, 5)
        extra = [[]] if len(inspect.signature(ex._read_blocks).parameters) == 3 else []
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel(0)
            bsend, brecv = trio.open_memory_channel(1)

            async def null_upload():
                async for number, body, length, part in recv:
                    if part is not None:
                        await buffers.put(part)

            nursery.start_soon(null_upload)
            nursery.start_soon(ex._read_blocks, image, bsend, *extra)
            async with send, brecv:
                await ex._produce(enc, brecv, send, buffers, image.size, lambda d, t: None,
                                  limiter, *extra)
        dt = time.perf_counter() - t
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        await image.aclose()
    print(json.dumps({"seconds": dt, "bytes": enc.image_size,
                      "cpu": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime}))
trio.run(main)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("checkouts", nargs="+", help="NAME=DIR")
    args = ap.parse_args()
    codes = [c.partition("=")[::2] for c in args.checkouts]
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-encode-", dir="/var/tmp"))
    results: dict[str, list[dict]] = {name: [] for name, _ in codes}
    try:
        vol = work / "volume.raw"
        make_volume(vol)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", CAPTURE, str(work / "store"), str(vol)],
                           capture_output=True, text=True, check=True, env=env)
        snap_id = json.loads(r.stdout.strip().splitlines()[-1])["id"]
        for rnd in range(args.rounds):
            for name, code in codes:
                r = subprocess.run([sys.executable, "-c", RUN, str(work / "store"), snap_id],
                                   capture_output=True, text=True, cwd=work,  # -c: cwd first
                                   env=dict(env, PYTHONPATH=str(Path(code).resolve())))
                if r.returncode:
                    sys.stderr.write(r.stderr[-3000:])
                    return 1
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res["load"] = os.getloadavg()[0]
                results[name].append(res)
                print(f"round {rnd} {name:>8}: {res['seconds']:5.2f} s  CPU {res['cpu']:5.2f} s"
                      f"  ({res['bytes'] >> 20} MiB image)  load {res['load']:.1f}", flush=True)
        print("medians:")
        for name, runs in results.items():
            print(f"  {name:>8}: {statistics.median(r['seconds'] for r in runs):5.2f} s, "
                  f"CPU {statistics.median(r['cpu'] for r in runs):5.2f} s")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
