"""How much guest data the host bytes of a QCOW2 object can legitimately hold.

An import's work grows with the guest data the image maps (every mapped
cluster is fetched, decompressed and hashed), so a crafted object could ask for
far more work than its size: one data cluster named by every entry of one L2
table, and that table named by every L1 entry, maps 64 TiB of data from a few
hundred kilobytes. QEMU never writes such an image: within the active L1 tree
each data cluster is referenced once (QCOW2 has no deduplication; internal
snapshots share clusters between *different* L1 tables, which an import does
not read), and compressed clusters are packed back to back, each in bytes of
its own. ``qemu-img check`` reports a cluster referenced twice as a refcount
error; an import refuses it before it stores anything.

The check is a ledger of claimed bytes per granule of the object: a data
cluster claims its whole cluster, a compressed one the bytes it surely
occupies -- its descriptor's range rounds up to a 512-byte sector, so it owns
at least ``length - 511`` bytes, and at least the smallest stream that can
hold a cluster (a zstd frame: 9 bytes; deflate: 1/1032 of the cluster, its
best ratio, and 2 bytes). A granule claimed beyond its size is refused.
Granules are one cluster (exact: a data cluster named twice is found) unless
the object has more than MAX_GRANULES clusters, then coarser: memory stays at
most 8 x MAX_GRANULES bytes.

What this bounds: uncompressed guest data to the object's size; compressed
data to what legitimately compressed clusters could hold anyway (a cluster of
one repeated byte is ~18 bytes of zstd), so a crafted image costs no more
import work than an honest one of its size could.
"""

from __future__ import annotations

from array import array

from ..errors import InvalidData
from .decoder import Qcow2Map
from .format import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO

#: Ledger entries at most (8 bytes each: 8 MiB).
MAX_GRANULES = 1 << 20
#: The fewest host bytes a zstd cluster owns: magic, frame header, one block
#: header and its byte (an RLE block).
MIN_ZSTD = 9
#: deflate's best ratio (258 bytes a match, in about two bits) is ~1032:1.
DEFLATE_RATIO = 1032


def min_compressed(cluster_size: int, zstd: bool) -> int:
    """The fewest host bytes a compressed cluster of this image can own."""
    return MIN_ZSTD if zstd else max(2, cluster_size // DEFLATE_RATIO)


class HostClaims:
    """The ledger for one image, fed every L2 table once (with the number of
    L1 entries naming it) while the import validates them."""

    def __init__(self, qmap: Qcow2Map) -> None:
        self.map = qmap
        cs = qmap.header.cluster_size
        granule = cs
        while -(-qmap.file_size // granule) > MAX_GRANULES:
            granule *= 2
        self.granule = granule
        self.claimed = array("Q", bytes(8 * -(-qmap.file_size // granule)))
        self.min_compressed = min_compressed(cs, bool(qmap.header.compression_type))

    def claim_l2(self, l1_indices: list[int], table: array) -> None:
        """Claim the host bytes ``table``'s entries name, once for each L1
        entry of ``l1_indices`` that names it (entries past the virtual size
        map nothing and claim nothing). InvalidData when a granule is
        claimed past its size."""
        qmap = self.map
        cs, span, size = qmap.header.cluster_size, qmap.l2_span(), qmap.size
        limits: dict[int, int] = {}  # entries used -> L1 entries using that many
        for i in l1_indices:
            used = min(len(table), -(-(size - i * span) // cs)) if i * span < size else 0
            if used:
                limits[used] = limits.get(used, 0) + 1
        for used, times in limits.items():
            self._claim(table, used, times)

    def _claim(self, table: array, used: int, times: int) -> None:
        qmap, granule, claimed = self.map, self.granule, self.claimed
        cs, end_of_object = qmap.header.cluster_size, qmap.file_size
        least = self.min_compressed
        for k in range(used):
            entry = table[k]
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                host, length = qmap.compressed_span(entry)
                amount = max(length - 511, least)
            elif entry & OFLAG_ZERO or not entry & OFFSET_MASK:
                continue
            else:
                host, amount = entry & OFFSET_MASK, cs
            # The claimed range, split over the granules it crosses (clusters
            # packed back to back share granules without overlapping).
            pos, end = host, min(host + amount, end_of_object)
            while pos < end:
                g = pos // granule
                piece = min(end, (g + 1) * granule) - pos
                total = claimed[g] + piece * times
                if total > granule:
                    raise InvalidData(
                        f"QCOW2 image maps the host bytes at offset {host} from more "
                        f"guest clusters than they can hold (a cluster used twice, "
                        f"which 'qemu-img check' reports as a refcount error): "
                        f"refused, as it would expand far beyond the object's "
                        f"{end_of_object} bytes")
                claimed[g] = total
                pos += piece
