"""Makes prechange_store.tar.gz: a store written by the snapfs of commit 5f47fd4
(schema 8, before compressed chunks), with the volume it snapshotted. Run with that
tree first on the path:

    git archive 5f47fd4 snapfs | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_prechange_store.py /tmp/work
    tar -C /tmp/work -czf tests/data/prechange_store.tar.gz store old.raw
"""
import os
import sys
from pathlib import Path

import trio

from snapfs.local import open_local_service

MiB, KiB = 1 << 20, 1 << 10


def text(n: int, seed: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        line = f"{seed}:{i} the quick brown fox jumps over the lazy dog {i * 7919 % 1000}\n"
        out += line.encode()
        i += 1
    return bytes(out[:n])


async def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    vol = work / "old.raw"
    # A compressible chunk with a few random bytes, a short mixed last chunk.
    vol.write_bytes(text(512 * KiB, 0) + os.urandom(16 * KiB) + text(496 * KiB, 1)
                    + os.urandom(32 * KiB) + text(224 * KiB, 2))
    async with open_local_service(work / "store") as svc:
        v = await svc.add_volume("old", vol)
        s = await svc.create_snapshot("fr-par-1", name="old", volume_id=v.id)
        while (await svc.get_snapshot("fr-par-1", s.id)).state != "available":
            await trio.sleep(0.05)


trio.run(main, Path(sys.argv[1]))
