#!/usr/bin/env python3
"""Concurrency benchmark: many processes on one store (issue 12, item 3).

Two `snapfs mount`s and a `snapfs serve` of one store; ten threads create
snapshots through each of the three (each awaited as `snapfs wait` would), delete
random ones through each, and read the image.raw of available ones through both
mounts, comparing its sha256 with the volume's. The server is SIGKILLed once
40% of the operations are done, and restarted. The same driver as the stress test
(tests/stress_procs.py), for a fixed count of operations instead of a time.

Prints: operations/s (creates + deletes + reads that went through), the
refusals by kind (EBUSY, ENOENT, 412...), each daemon's peak RSS (VmHWM from
/proc, read before they stop), wrong reads (must be 0) and the fsck verdict.

    .venv/bin/python scripts/bench/concurrency.py [--ops 1000] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from stress_procs import Cluster, Stress, fsck, make_volumes, peak_rss  # noqa: E402

MB = 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=1000, help="operations to run (default 1000)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="snapfs-concurrency-", dir=args.dir))
    try:
        store = base / "store"
        volumes = make_volumes(base, store)
        cluster = Cluster(base, store)
        rss: dict[str, int] = {}
        try:
            cluster.start()
            stress = Stress(cluster, volumes, seed=7)
            stats = stress.stats

            def kill_when() -> bool:
                if stats.operations < args.ops * 0.4:
                    return False
                assert cluster.server is not None
                rss["serve (killed)"] = peak_rss(cluster.server.pid)
                return True
            seconds = stress.run(until=lambda: stats.operations >= args.ops,
                                 kill_when=kill_when)
            leftovers = stress.delete_all()
            for i, m in enumerate(cluster.mounts):
                assert m.pid is not None
                rss[f"mount {i}"] = peak_rss(m.pid)
            assert cluster.server is not None
            rss["serve (restarted)"] = peak_rss(cluster.server.pid)
        finally:
            cluster.stop()
        res = fsck(store)
        logs = cluster.logs()
        print(f"operations: {stats.operations} in {seconds:.1f} s = "
              f"{stats.operations / seconds:.1f}/s (created {stats.created}, "
              f"deleted {stats.deleted}, image reads {stats.reads})")
        print("refused or skipped: " + ", ".join(f"{k} {v}"
                                                 for k, v in sorted(stats.refused.items())))
        print("peak RSS: " + ", ".join(f"{k} {v / MB:.0f} MB" for k, v in rss.items()))
        print(f"wrong reads: {len(stats.wrong)}; unexpected errors: {len(stats.errors)}; "
              f"failed captures: {sorted(stats.failed) or 'none'}")
        for e in stats.errors[:5]:
            print(f"  {e}")
        print(f"deleting the rest afterwards: {leftovers or 'all deleted'}")
        print(f"tracebacks in logs: {logs.count('Traceback')}")
        verdict = (res.stdout + res.stderr).strip().splitlines()
        print(f"fsck: exit {res.returncode}: {verdict[-1] if verdict else ''}")
        ok = res.returncode == 0 and not stats.wrong and not stats.errors \
            and "Traceback" not in logs and not leftovers
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
