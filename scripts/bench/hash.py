#!/usr/bin/env python3
"""Chunk hash and chunk size, chosen by measurement.

For each candidate hash (hashlib sha256, blake3; xxh3-128 as the read-path
check) and chunk size, the hashing
throughput on one core over 256 MiB of random data, and what the chunk size
means for a 1 TiB volume (rows in the chunk map) and for a 20 MiB overwrite
scattered in 64 KiB writes (bytes a second snapshot must store).

    .venv/bin/python scripts/bench/hash.py
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import blake3
import xxhash

MiB = 1 << 20
DATA = os.urandom(256 * MiB)
HASHES = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake3": lambda b: blake3.blake3(b).digest(),
    # Not a content address (not collision-resistant): the read-path check.
    "xxh3_128": lambda b: xxhash.xxh3_128_digest(b),
}


def throughput(fn, size: int) -> float:
    view = memoryview(DATA)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for off in range(0, len(DATA), size):
            fn(view[off:off + size])
        best = max(best, len(DATA) / (time.perf_counter() - t))
    return best


def scattered_overwrite_cost(size: int) -> int:
    """Distinct chunks touched by 320 random 64 KiB writes in a 2 GiB volume."""
    rng = random.Random(1)
    touched = {rng.randrange(0, 2048 * MiB // (64 << 10)) * (64 << 10) // size
               for _ in range(320)}
    return len(touched) * size


def main() -> None:
    print(f"{'chunk':>7} " + " ".join(f"{h + ' GB/s':>12}" for h in HASHES)
          + f" {'rows/TiB':>10} {'2nd-snap MiB':>13}")
    for size in (256 << 10, 1 * MiB, 4 * MiB):
        rates = [throughput(fn, size) / 1e9 for fn in HASHES.values()]
        print(f"{size >> 10:>6}K " + " ".join(f"{r:12.2f}" for r in rates)
              + f" {(1 << 40) // size:>10} {scattered_overwrite_cost(size) / MiB:>13.0f}")


if __name__ == "__main__":
    main()
