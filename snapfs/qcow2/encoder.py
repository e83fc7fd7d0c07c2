"""A streaming QCOW2 v3 encoder: guest data in, image bytes out, in one pass.

Layout of the image it produces (every piece cluster-aligned, 64 KiB clusters)::

    [header][L1 table][refcount table]          <- the "head", sized up front
    [data clusters of guest range 0][L2 table 0]
    [data clusters of guest range 1][L2 table 1] ...   <- the "body", streamed
    [refcount blocks]                           <- the "tail", at the end

Data clusters are appended in guest order as they are fed; all-zero clusters
stay unallocated. Each L2 table (one per 512 MiB of guest space) is appended
right after the last data cluster it maps, as soon as the feed passes its range,
so only one L2 table is ever held. The head's size depends only on the virtual
size (the refcount table is sized for the worst case: every guest cluster
allocated), so the body's host offsets are known before any byte of it is
produced; the head's *contents* (the L1 table) are only known at the end, which
is why a multipart upload sends the head's part last. The refcount blocks go at
the tail because only then is the number of host clusters known.

Memory: the L1 table (8 bytes per 512 MiB of virtual size), one L2 table
(64 KiB) and whatever output the caller has not consumed yet. No I/O here.
Work: the bytes fed; a caller walking the allocation jumps over holes with
:meth:`skip_to`, so a sparse 64 TiB image costs its data and its tables.
"""

from __future__ import annotations

import sys
from array import array

from .format import (CLUSTER_BITS, CLUSTER_SIZE, HEADER_V3_WRITTEN_LEN, OFLAG_COPIED,
                     REFCOUNT_ORDER, Header, div_round_up)

L2_ENTRIES = CLUSTER_SIZE // 8
REFCOUNT_BITS = 1 << REFCOUNT_ORDER
REFBLOCK_ENTRIES = CLUSTER_SIZE * 8 // REFCOUNT_BITS
REFTABLE_ENTRIES_PER_CLUSTER = CLUSTER_SIZE // 8
_ZERO_CLUSTER = bytes(CLUSTER_SIZE)
_ZERO_BLOCK = bytes(4 << 20)  # feeds up to this size are checked for holes at once


def _be64(values: array) -> bytes:
    out = array("Q", values)
    if out.itemsize != 8:  # pragma: no cover - every platform we run on
        raise RuntimeError("array('Q') is not 64-bit")
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


class StreamingEncoder:
    """Feed guest bytes in order with :meth:`feed`, append what it returns to the
    image body, then :meth:`finish` gives the tail (appended last) and the head
    (the first ``head_size`` bytes of the image)."""

    def __init__(self, virtual_size: int) -> None:
        if virtual_size < 0:
            raise ValueError("virtual size must be >= 0")
        self.virtual_size = virtual_size
        self.guest_clusters = div_round_up(virtual_size, CLUSTER_SIZE)
        self.l1_size = div_round_up(self.guest_clusters, L2_ENTRIES)
        self.l1_clusters = max(1, div_round_up(self.l1_size * 8, CLUSTER_SIZE))
        # Worst case host clusters: head + every guest cluster + every L2 table +
        # the refcount blocks covering all of those (and themselves).
        front_guess = 1 + self.l1_clusters + 1
        while True:
            bound = front_guess + self.guest_clusters + self.l1_size
            blocks = div_round_up(bound, REFBLOCK_ENTRIES - 1) + 1
            rt_clusters = max(1, div_round_up(blocks, REFTABLE_ENTRIES_PER_CLUSTER))
            front = 1 + self.l1_clusters + rt_clusters
            if front == front_guess:
                break
            front_guess = front
        self.reftable_clusters = rt_clusters
        self.max_refblocks = rt_clusters * REFTABLE_ENTRIES_PER_CLUSTER
        self.head_size = front * CLUSTER_SIZE
        self._l1 = array("Q", bytes(8 * self.l1_size))
        self._l2: array | None = None
        self._l2_index = -1
        self._host_next = self.head_size  # host offset of the next body cluster
        self._guest_pos = 0
        self.data_clusters = 0
        self._finished = False

    @property
    def body_size(self) -> int:
        """Bytes of body produced so far."""
        return self._host_next - self.head_size

    @property
    def guest_pos(self) -> int:
        return self._guest_pos

    def skip_to(self, guest_pos: int) -> None:
        """Leave guest bytes up to ``guest_pos`` (cluster-aligned, or the virtual
        size) unallocated without feeding them: a hole costs nothing to encode."""
        if self._finished:
            raise ValueError("encoder already finished")
        if guest_pos < self._guest_pos or guest_pos > self.virtual_size:
            raise ValueError("skip_to goes backwards or past the virtual size")
        if guest_pos % CLUSTER_SIZE and guest_pos != self.virtual_size:
            raise ValueError("skip_to must land on a cluster boundary")
        if self._guest_pos % CLUSTER_SIZE and guest_pos != self._guest_pos:
            raise ValueError("only the last feed may end inside a cluster")
        self._guest_pos = guest_pos

    def max_image_size(self, allocated: int) -> int:
        """An upper bound of the image's size when ``allocated`` guest bytes (in
        whole clusters) hold data: head, data, one L2 table per 512 MiB span
        touched, refcount blocks. What an export sizes its parts from."""
        data = min(self.guest_clusters, div_round_up(allocated, CLUSTER_SIZE))
        l2 = min(self.l1_size, data)
        used = self.head_size // CLUSTER_SIZE + data + l2
        return (used + div_round_up(used, REFBLOCK_ENTRIES - 1) + 1) * CLUSTER_SIZE

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Guest bytes at the current guest position (every call but the last must
        be a whole number of clusters). Returns the body bytes to append."""
        return b"".join(self.feed_pieces(data))

    def feed_pieces(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Like :meth:`feed`, but the body bytes as pieces (views into ``data``,
        one per run of data clusters, and L2 tables) for a caller that copies
        them into its own buffers."""
        if self._finished:
            raise ValueError("encoder already finished")
        if self._guest_pos % CLUSTER_SIZE:
            raise ValueError("only the last feed may end inside a cluster")
        n = len(data)
        if self._guest_pos + n > self.virtual_size:
            raise ValueError("fed past the virtual size")
        view = memoryview(data).cast("B")
        out: list[bytes | memoryview] = []
        cluster = self._guest_pos // CLUSTER_SIZE
        self._guest_pos += n
        # Compare as bytes: bytes == bytes is a memcmp, while memoryview == bytes
        # goes element by element (35x slower). startswith compares in place, where
        # a slice would copy every byte first (and a data cluster differs from
        # zeros within its first bytes). A whole block of holes is one memcmp.
        raw = data if isinstance(data, (bytes, bytearray)) else view.tobytes()
        if n <= len(_ZERO_BLOCK) and _ZERO_BLOCK.startswith(raw):
            return out
        run = -1  # where the run of data clusters not yet appended starts (one view)
        for start in range(0, n, CLUSTER_SIZE):
            end = min(start + CLUSTER_SIZE, n)
            full = end - start == CLUSTER_SIZE
            zero = (raw.startswith(_ZERO_CLUSTER, start) if full
                    else _ZERO_CLUSTER.startswith(view[start:end]))
            l1i, l2i = divmod(cluster, L2_ENTRIES)
            cluster += 1
            if run >= 0 and (zero or not full or l1i != self._l2_index):
                out.append(view[run:start])  # the run ends: before what follows it
                run = -1
            if zero:
                continue
            if l1i != self._l2_index:
                self._flush_l2(out)
                self._l2 = array("Q", bytes(CLUSTER_SIZE))
                self._l2_index = l1i
            assert self._l2 is not None
            self._l2[l2i] = self._host_next | OFLAG_COPIED
            self._host_next += CLUSTER_SIZE
            self.data_clusters += 1
            if full:
                run = start if run < 0 else run
            else:  # the image's last, partial cluster: padded with zeros
                out.append(bytes(view[start:end]) + bytes(CLUSTER_SIZE - (end - start)))
        if run >= 0:
            out.append(view[run:])
        return out

    def _flush_l2(self, out: list) -> None:
        """Append the current L2 table (if it maps anything) and point L1 at it."""
        if self._l2 is None:
            return
        self._l1[self._l2_index] = self._host_next | OFLAG_COPIED
        out.append(_be64(self._l2))
        self._host_next += CLUSTER_SIZE
        self._l2 = None
        self._l2_index = -1

    def finish(self) -> tuple[bytes, bytes]:
        """(tail, head): the tail is appended after the body; the head is the
        image's first ``head_size`` bytes. Guest bytes not fed read as zeros."""
        pieces, head = self.finish_pieces()
        return b"".join(pieces), head

    def finish_pieces(self) -> tuple[list[bytes], bytes]:
        """Like :meth:`finish`, the tail as pieces: the last L2 table, then one
        piece per refcount block, every full block the same object -- the tail
        of a 10 TiB image is 320 MiB, its pieces' memory a few hundred KiB."""
        if self._finished:
            raise ValueError("encoder already finished")
        self._finished = True
        out: list = []
        self._flush_l2(out)
        # Refcount blocks cover every host cluster, themselves included.
        used = self._host_next // CLUSTER_SIZE
        blocks = div_round_up(used, REFBLOCK_ENTRIES)
        while div_round_up(used + blocks, REFBLOCK_ENTRIES) > blocks:
            blocks += 1
        if blocks > self.max_refblocks:  # the bound in __init__ makes this impossible
            raise AssertionError("refcount table sized too small")
        total_clusters = used + blocks
        first_block_offset = self._host_next
        reftable = array("Q", bytes(self.reftable_clusters * CLUSTER_SIZE))
        one = (1).to_bytes(REFCOUNT_BITS // 8, "big")
        full = one * REFBLOCK_ENTRIES
        for b in range(blocks):
            reftable[b] = first_block_offset + b * CLUSTER_SIZE
            n = min(REFBLOCK_ENTRIES, total_clusters - b * REFBLOCK_ENTRIES)
            out.append(full if n == REFBLOCK_ENTRIES
                       else one * n + bytes((REFBLOCK_ENTRIES - n) * len(one)))
        self._host_next += blocks * CLUSTER_SIZE

        header = Header(
            version=3, backing_file_offset=0, backing_file_size=0,
            cluster_bits=CLUSTER_BITS, size=self.virtual_size, crypt_method=0,
            l1_size=self.l1_size, l1_table_offset=CLUSTER_SIZE,
            refcount_table_offset=(1 + self.l1_clusters) * CLUSTER_SIZE,
            refcount_table_clusters=self.reftable_clusters, nb_snapshots=0,
            snapshots_offset=0, refcount_order=REFCOUNT_ORDER,
            header_length=HEADER_V3_WRITTEN_LEN)
        hbytes = header.pack()
        l1bytes = _be64(self._l1)
        head = (hbytes + bytes(CLUSTER_SIZE - len(hbytes))
                + l1bytes + bytes(self.l1_clusters * CLUSTER_SIZE - len(l1bytes))
                + _be64(reftable))
        assert len(head) == self.head_size
        return out, head

    @property
    def image_size(self) -> int:
        """The image's total size (valid after :meth:`finish`)."""
        return self._host_next
