"""Crafted QCOW2 images for the hostile-input tests: a header, L1 entries, L2
tables and blobs placed where a test says, with none of QEMU's bookkeeping."""

from __future__ import annotations

import struct
from typing import Any

from snapfs.qcow2.format import COMPRESSION_ZSTD, INCOMPAT_COMPRESSION, OFLAG_COMPRESSED, Header


def header(cluster_bits: int, size: int, l1_size: int, *, zstd: bool = False,
           **kw: Any) -> Header:
    """A v3 header: L1 table in cluster 1, refcount table in cluster 2."""
    cs = 1 << cluster_bits
    fields: dict[str, Any] = dict(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=cs,
        refcount_table_offset=2 * cs, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0, header_length=112)
    if zstd:
        fields.update(incompatible_features=INCOMPAT_COMPRESSION,
                      compression_type=COMPRESSION_ZSTD)
    fields.update(kw)
    return Header(**fields)


def image(h: Header, l1: list[int], tables: dict[int, list[int]],
          blobs: dict[int, bytes] | None = None) -> bytes:
    """The bytes of an image: header, L1 entries, L2 tables at their host
    offsets, other bytes (data, compressed clusters) where ``blobs`` says."""
    cs = h.cluster_size
    pieces = [(0, h.pack()), (h.l1_table_offset, struct.pack(f">{len(l1)}Q", *l1))]
    pieces += [(off, struct.pack(f">{len(t)}Q", *t)) for off, t in tables.items()]
    pieces += list((blobs or {}).items())
    end = max(3 * cs, max(off + len(b) for off, b in pieces))
    buf = bytearray(end)
    for off, b in pieces:
        buf[off:off + len(b)] = b
    return bytes(buf)


def compressed_entry(cluster_bits: int, host: int, length: int) -> int:
    """An L2 entry for a compressed cluster of ``length`` bytes at ``host``."""
    x = 62 - (cluster_bits - 8)
    sectors = (host + length - 1) // 512 - host // 512
    return OFLAG_COMPRESSED | sectors << x | host
