"""Compressed chunks: zstd where it pays, raw where it does not.

A chunk is stored as a zstd frame only when that shrinks it to at most
KEEP_NUM/KEEP_DEN of its length; otherwise (random or already compressed data,
and every chunk cloned with FICLONERANGE) it is stored raw, so incompressible
data costs nothing extra and the fast inline read path stays for it. A sample
of the chunk is tried first: what it says will not shrink gets one pass at
FALLBACK_LEVEL instead of the store's level (zstd runs through random data at
~3 GB/s per core; the pass catches redundancy the samples miss, e.g. copies of
a .gz file in one chunk: 1% of the real image's store). The chunk's row says
which (``chunks.raw_length``: NULL = raw, see schema.py).

What the two hashes cover:
  * the content address (blake3, ``chunks.hash``) covers the *raw* bytes: dedup
    is by content, whatever form a copy was stored in;
  * the read check (xxh3, ``chunks.xxh``) covers the *stored* bytes, and is
    checked before decompressing: a flipped bit reads as CorruptData (EIO),
    never as a decompressor fault; the decompressed length is checked too.
fsck checks both (stored bytes against xxh3, raw bytes against blake3).

The level is a store setting (meta key ``zstd_level``, 0 = off; ``snapfs
compression``); DEFAULT_LEVEL when unset, chosen by measurement (README,
Performance). Compression and decompression run in worker threads: zstandard
releases the GIL, so COMPRESS_THREADS chunks compress at once on as many cores.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import zstandard

from ..errors import CorruptData
from .chunks import CHUNK_SIZE
from .metadata import Metadata

LEVEL_KEY = "zstd_level"
#: Chosen by the issue's order: store size <= restic's first, then time. On the
#: real image's 682 MB of data chunks (scripts/bench/real_image.py; CPU time of
#: one thread, README Performance): level -1 295 MB in 1.33 s, 1: 270 MB / 1.59 s,
#: 2: 258 MB / 2.01 s, 3: 250 MB / 2.26 s. Only 3 keeps the store after both
#: snapshots at restic's repository (0.99-1.02x; level 2 ~1.04x, estimated from
#: its first-snapshot size; level 1 1.07-1.10x); level 1 saves ~30% of the
#: compression CPU for ~8% more bytes (`snapfs compression 1`).
DEFAULT_LEVEL = 3
MAX_LEVEL = 19
#: A compressed chunk is kept only at <= 7/8 of its raw length.
KEEP_NUM, KEEP_DEN = 7, 8
COMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))
#: The probe: PROBES slices of PROBE_BYTES; a chunk is compressed at the store's
#: level only if they shrink below PROBE_KEEP of their length.
PROBES, PROBE_BYTES, PROBE_KEEP = 4, 8 << 10, 0.97
#: The level of a chunk the probe rejects (see compress()).
FALLBACK_LEVEL = 1

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor (a context is not to be shared between threads)."""
    ctxs: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if ctxs is None:
        ctxs = _local.cctx = {}
    c = ctxs.get(level)
    if c is None:
        c = ctxs[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _worth_trying(data: bytes | memoryview) -> bool:
    """Whether a sample (PROBES slices spread over the chunk, at level 1) shrinks:
    random or already compressed data then costs ~2% of a full attempt."""
    n = len(data)
    if n < 4 * PROBE_BYTES * PROBES:
        return True
    view = memoryview(data)
    sample = b"".join(view[i * n // PROBES:i * n // PROBES + PROBE_BYTES]
                      for i in range(PROBES))
    return len(_cctx(1).compress(sample)) < len(sample) * PROBE_KEEP


def compress(data: bytes | memoryview, level: int) -> bytes | None:
    """The chunk's zstd frame, or None when it does not pay (store it raw)."""
    if level <= 0:
        return None
    # A chunk the probe rejects gets one full pass at FALLBACK_LEVEL: its samples
    # miss redundancy between distant parts of the chunk (two copies of a .gz
    # man page), and zstd skips through random data at ~3 GB/s per core anyway.
    out = _cctx(level if _worth_trying(data) else min(level, FALLBACK_LEVEL)).compress(data)
    return out if len(out) * KEEP_DEN <= len(data) * KEEP_NUM else None


def compress_all(chunks: list[bytes | memoryview], level: int) -> list[bytes | None]:
    """compress() of each chunk, COMPRESS_THREADS at a time (for a worker thread)."""
    global _pool
    if level <= 0 or not chunks:
        return [None] * len(chunks)
    if len(chunks) == 1:
        return [compress(chunks[0], level)]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="compress")
        pool = _pool
    return list(pool.map(compress, chunks, [level] * len(chunks)))


def decompress(stored: bytes | memoryview, raw_length: int, what: str) -> bytearray:
    """The raw bytes of a zstd chunk whose stored bytes passed their check;
    CorruptData if they do not decompress to exactly ``raw_length`` bytes (a
    length no chunk has, from a damaged row, is refused before it is allocated)."""
    if not 0 < raw_length <= CHUNK_SIZE:
        raise CorruptData(f"{what} claims {raw_length} raw bytes; a chunk holds "
                          f"1 to {CHUNK_SIZE}")
    out = bytearray(raw_length)
    decompress_into(stored, memoryview(out), what)
    return out


def decompress_into(stored: bytes | memoryview, into: memoryview, what: str) -> None:
    """decompress() into ``into``, whose length is the chunk's raw length: a
    reader's pooled chunk buffer, so that no 1 MiB is allocated, faulted in and
    unmapped per chunk (a daemon streaming a compressed image took ~125 page
    faults per MiB that way, and half again the kernel time)."""
    want = len(into)
    got = 0
    try:
        reader = _dctx().stream_reader(stored, read_across_frames=False)
        while got < want:
            n = reader.readinto(into[got:])
            if not n:
                break
            got += n
        extra = reader.read(1) if got == want else b""
    except zstandard.ZstdError as exc:
        raise CorruptData(f"{what} does not decompress: {exc}") from None
    if got != want or extra:
        raise CorruptData(f"{what} decompresses to {'more than ' if extra else ''}"
                          f"{got} bytes, not {want}")


def store_level(conn: sqlite3.Connection) -> int:
    """The store's compression level (DEFAULT_LEVEL when never set)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (LEVEL_KEY,)).fetchone()
    if row is None:
        return DEFAULT_LEVEL
    try:
        return max(0, min(MAX_LEVEL, int(row[0])))
    except ValueError:
        return DEFAULT_LEVEL


def set_store_level(md: Metadata, level: int) -> None:
    """Chunks stored from now on (by any process on the store) use ``level``."""
    with md.transaction():
        md.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (LEVEL_KEY, str(level)))
