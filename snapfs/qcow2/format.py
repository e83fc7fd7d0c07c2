"""QCOW2 on-disk constants and the header, as QEMU's docs/interop/qcow2.rst lays
them out. Shared by the encoder (what we write) and the decoder (what we accept).

All numbers are big-endian. Only what snapfs writes or must understand to read
an image is named here; everything else is refused by the decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"

#: v2 header: magic .. snapshots_offset (72 bytes).
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: v3 additions: incompatible/compatible/autoclear features, refcount_order, header_length.
HEADER_V3_EXTRA = struct.Struct(">QQQII")
HEADER_V2_LEN = HEADER_V2.size  # 72
HEADER_V3_MIN_LEN = HEADER_V2.size + HEADER_V3_EXTRA.size  # 104
#: What we write: the v3 fields plus the compression_type byte, padded to 8.
HEADER_V3_WRITTEN_LEN = 112

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

# autoclear_features bits
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

#: QEMU's limit on internal snapshots (QCOW_MAX_SNAPSHOTS).
MAX_SNAPSHOTS = 65536

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# L1/L2 entry bits
OFLAG_COPIED = 1 << 63  # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard cluster reads as zeros (v3)
#: Bits 9-55: a cluster-aligned host offset in L1 entries and standard L2 entries.
OFFSET_MASK = ((1 << 56) - 1) & ~((1 << 9) - 1)
L1_RESERVED_MASK = ((1 << 9) - 1) | (((1 << 63) - 1) & ~((1 << 56) - 1))
#: Reserved bits of a standard L2 entry: 1-8 and 56-61.
L2_STD_RESERVED_MASK = (((1 << 9) - 1) & ~1) | (((1 << 62) - 1) & ~((1 << 56) - 1))

#: What snapfs writes: 64 KiB clusters, 16-bit refcounts.
CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit (2 MiB)
#: QEMU's limits on table sizes; anything larger is not an image QEMU made.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
#: The largest virtual size an import accepts: 64 TiB, what QCOW2 maps at 64 KiB
#: clusters with a 1 MiB L1 table (QEMU's own images of that size), well above
#: Scaleway's largest Block Storage volume (10 TB). An import costs the image's
#: allocation, not this size; the bound keeps the allocation bitmap (8 MiB) and
#: the L1 table small, and refuses a header claiming 1 PiB in 6 MB of object.
MAX_VIRTUAL_SIZE = 64 << 40


@dataclass(frozen=True)
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_LEN
    compression_type: int = COMPRESSION_DEFLATE

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def l1_used(self) -> int:
        """L1 entries the virtual size needs. QEMU reads no other: ``l1_size``
        may be larger (a shrunk image keeps its table), and what lies beyond is
        neither validated nor fetched here either."""
        return div_round_up(div_round_up(self.size, self.cluster_size), self.l2_entries)

    def pack(self) -> bytes:
        """The header bytes (v3 only: the only version we write)."""
        assert self.version == 3
        out = HEADER_V2.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        out += HEADER_V3_EXTRA.pack(
            self.incompatible_features, self.compatible_features,
            self.autoclear_features, self.refcount_order, self.header_length)
        out += bytes([self.compression_type])
        out += bytes(self.header_length - len(out))
        # An explicit end-of-extensions marker (type 0, length 0).
        return out + bytes(8)


def l2_coverage(cluster_bits: int) -> int:
    """Guest bytes one L2 table maps (standard 8-byte entries)."""
    return (1 << cluster_bits) * ((1 << cluster_bits) // 8)


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)
