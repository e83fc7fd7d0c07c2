"""Import: a QCOW2 object read with ranged GETs, as an ImageReader of its guest data.

Opening fetches the header, the L1 table and every L2 table and validates them
(so a truncated or corrupt mapping is refused before anything is stored). Reads map the
guest range through cached L2 tables (LRU, a bounded number of bytes), fetch the
host bytes they need with ranged GETs -- neighbouring ranges merged (compressed
clusters are packed back to back), large ones split into ``max_get`` pieces, all
in parallel under the S3 limiter -- and assemble (decompress) off the trio
thread. Reads go through the read-ahead engine (snapfs/readahead.py) in windows
of ``readahead`` bytes: a sequential reader (the capture, dd through the mount)
has the next ``AHEAD_WINDOWS`` windows in flight in the owner's nursery, so the
stream never waits for a whole round of GETs; a random read GETs just its bytes.
Contiguous data clusters are read by their GETs straight into the window buffer
(no per-cluster work, no join); a read is then a view of the window.
"""

from __future__ import annotations

import bisect
import logging
import mmap
from array import array
from typing import Any

import trio
from urllib3.exceptions import ProtocolError

from ..errors import InvalidAnswer, InvalidData, NotFound, SnapfsError
from ..memory import READERS, aligned_buffer
from ..qcow2.allocation import Allocation
from ..qcow2.decoder import (COMPRESSED, DATA, HEADER_PROBE, ZERO, Extent, Qcow2Map,
                             decompress_cluster, parse_header)
from ..qcow2.format import OFFSET_MASK
from ..qcow2.hostclaims import HostClaims
from ..readahead import ReadAhead
from ..service import Buffer, ImageReader
from ..taskgroups import first_error
from .calls import S3Calls
from .deadline import GetGuard
from .config import S3Settings
from .shared import L2_TABLES, REFUSED, SPARES, VALIDATED, reader_token, version

log = logging.getLogger(__name__)

MERGE_GAP = 64 << 10  # fetch small gaps rather than issue another request
SEQ_SLACK = 1 << 20  # a read this close to the last one continues the stream
#: Read-ahead windows kept in flight ahead of a sequential reader.
AHEAD_WINDOWS = 2
_ZEROS = memoryview(bytes(1 << 20))  # holes written into reused window buffers


def _read_body(resp: dict[str, Any], view: memoryview, guard: GetGuard | None = None) -> int:
    """Read a GET's body into ``view``; the byte count (one more than
    ``len(view)`` when the server sent more). A plain (not chunked, not encoded)
    body is read straight from http.client into ``view``: urllib3's readinto
    reads into a temporary bytes and copies, two passes over every byte and a
    fresh allocation (page faults) per GET -- the reader's main CPU cost."""
    body = resp["Body"]
    length = len(view)
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    headers = getattr(raw, "headers", None) or {}
    direct = (hasattr(fp, "readinto") and hasattr(raw, "release_conn")
              and not getattr(fp, "chunked", True) and not headers.get("content-encoding")
              and int(resp.get("ContentLength", -1)) == length)
    got = 0
    try:
        if direct:
            while got < length:
                n = fp.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < length:  # cut mid-body: transient, as urllib3 would report it
                raise _cut_short(got, length, guard)
            if fp.isclosed():
                if guard is not None:
                    guard.detach()  # before another request may get the connection
                raw.release_conn()  # fully read: the connection goes back to the pool
            return got
        while got < length:
            try:
                n = body.readinto(view[got:])
            except Exception as exc:  # (urllib3's IncompleteRead...): say why it was cut
                if guard is not None and guard.cut:
                    raise _cut_short(got, length, guard) from exc
                raise
            if not n:
                break
            got += n
        if got < length and guard is not None and guard.cut:  # transient: tried again
            raise _cut_short(got, length, guard)
        if got == length and body.read(1):
            got += 1  # more than asked for: reported by the caller
        return got
    finally:
        if guard is not None:
            guard.detach()
        body.close()


def _cut_short(got: int, length: int, guard: GetGuard | None) -> ProtocolError:
    """A body that ended early: transient (retried), saying why when the GET's
    deadline cut it."""
    why = f" ({guard.cut})" if guard is not None and guard.cut else ""
    return ProtocolError(f"body ended after {got} of {length} bytes{why}")


async def _get_into(calls: S3Calls, bucket: str, key: str, offset: int,
                    buf: bytearray | memoryview, etag: str | None) -> None:
    """Fill ``buf`` with the object's bytes at ``offset`` (one ranged GET) of the
    version ``etag`` names: an object replaced meanwhile answers 412, which
    map_error makes an InvalidData, instead of bytes of another image."""
    client = calls.client
    length = len(buf)
    pinned = {"IfMatch": etag} if etag else {}

    guard = GetGuard(length)

    def fetch() -> tuple[int, str | None]:
        resp = client.get_object(Bucket=bucket, Key=key,
                                 Range=f"bytes={offset}-{offset + length - 1}", **pinned)
        guard.attach(resp)
        with memoryview(buf) as view:
            return _read_body(resp, view, guard), resp.get("ETag")
    got, answered = await calls.call("get_object", bucket, key, fetch)
    if etag and answered and answered != etag:
        # A server that ignores If-Match sends the new version's bytes: checked
        # here too, or an object replaced mid-import made a snapshot of both.
        raise InvalidAnswer(f"object {bucket}/{key} changed while being read (its ETag "
                            f"is {answered} now, {etag} when it was opened)")
    if got != length:
        why = "more than the range asked for: the server may ignore Range" \
            if got > length else "cut short, or the object changed"
        raise InvalidAnswer(f"object {bucket}/{key} returned {got} bytes at offset "
                            f"{offset}, expected {length} ({why})")


async def _get_range(calls: S3Calls, bucket: str, key: str, offset: int,
                     length: int, etag: str | None) -> bytearray:
    # Allocated here, filled by the worker thread with readinto: big buffers made
    # in worker threads land in per-thread malloc arenas and fragment the heap
    # (a 512 MiB import measured 191 MiB peak RSS with read(), 170 with readinto).
    buf = bytearray(length)
    await _get_into(calls, bucket, key, offset, buf, etag)
    return buf


def _endpoint(calls: S3Calls) -> str:
    """The server a client talks to: one version of an object is known by it too."""
    return str(getattr(getattr(calls.client, "meta", None), "endpoint_url", "") or "")


async def open_reader(calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                      cpu_limiter: trio.CapacityLimiter, nursery: trio.Nursery | None = None
                      ) -> "S3Qcow2Reader":
    """``nursery``: where read-ahead runs (the owner's long-lived one; None: none)."""
    client = calls.client
    try:
        head = await calls.call("head_object", bucket, key,
                                lambda: client.head_object(Bucket=bucket, Key=key))
    except NotFound as missing:
        # A HEAD's 404 has no body: ask whether it is the bucket that is missing
        # (a NotFound from head_bucket says so; anything else -- e.g. no right
        # to list the bucket -- leaves the object's NotFound standing).
        try:
            await calls.call("head_bucket", bucket, None,
                             lambda: client.head_bucket(Bucket=bucket))
        except NotFound:
            raise
        except SnapfsError:
            pass
        raise missing from None
    size = int(head["ContentLength"])
    if size == 0:
        raise InvalidData(f"object {bucket}/{key} is empty, not a QCOW2 image")
    etag = head.get("ETag")  # every later GET asks for this very version
    this = version(_endpoint(calls), bucket, key, etag, size)
    known = VALIDATED.get(this)
    if known is not None:  # this version's tables were validated by an earlier open
        qmap, allocation = known
        return S3Qcow2Reader(calls, settings, bucket, key, qmap, cpu_limiter, etag,
                             nursery, allocation)
    refused = REFUSED.get(this) if this else None
    if refused is not None:  # ... or refused by one: the same bytes, the same answer
        raise InvalidData(refused)
    reader = None
    try:
        probe = await _get_range(calls, bucket, key, 0, min(HEADER_PROBE, size), etag)
        header = parse_header(probe, size)
        l1_len = header.l1_used * 8  # entries past the virtual size: neither fetched nor used
        l1 = await _get_range(calls, bucket, key, header.l1_table_offset, l1_len, etag) \
            if l1_len else b""
        qmap = Qcow2Map(header, l1, size)
        reader = S3Qcow2Reader(calls, settings, bucket, key, qmap, cpu_limiter, etag, nursery)
        await reader.validate_tables()
    except BaseException as exc:
        if this and isinstance(exc, InvalidData) and not isinstance(exc, InvalidAnswer):
            REFUSED[this] = str(exc)
        if reader is not None:  # it joined the readers' budget: a refused open leaves it
            with trio.CancelScope(shield=True):
                await reader.aclose()
        raise
    VALIDATED.put(this, qmap, reader.allocation)
    log.info("import from %s/%s: QCOW2 v%d, %d bytes virtual, %d-byte clusters%s",
             bucket, key, header.version, header.size, header.cluster_size,
             ", zstd" if header.compression_type else "")
    return reader


class S3Qcow2Reader(ImageReader):
    def __init__(self, calls: S3Calls, settings: S3Settings, bucket: str, key: str,
                 qmap: Qcow2Map, cpu_limiter: trio.CapacityLimiter,
                 etag: str | None = None, nursery: trio.Nursery | None = None,
                 allocation: Allocation | None = None) -> None:
        """``allocation``: the one an earlier open's validate_tables marked for
        this very version (then validate_tables is not called again)."""
        self.calls = calls
        self.etag = etag
        self.settings = settings
        self.bucket = bucket
        self.key = key
        self.map = qmap
        self.header = qmap.header
        self.size = qmap.size
        self.cpu_limiter = cpu_limiter
        #: Its L2 tables are filed under this in the process's one LRU (shared.py).
        self._token = reader_token(_endpoint(calls), bucket, key, etag)
        #: Guest grains holding data, marked as validate_tables reads the L2 tables.
        self.allocation = allocation if allocation is not None else Allocation(self.size)
        # The stream holds the window it reads, the one it just left (kept while
        # shuffled parallel reads may still want it) and AHEAD_WINDOWS ahead.
        window = settings.readahead
        self.ra = ReadAhead(self._fetch_view, self.size, nursery, window=window,
                            ahead=AHEAD_WINDOWS, cached=AHEAD_WINDOWS + 2, slack=window,
                            behind=window + SEQ_SLACK, exact_random=True, on_drop=self._drop,
                            name=f"s3://{bucket}/{key}", budget=READERS)

    @property
    def stats(self) -> dict[str, int]:
        """Windows fetched by background read-ahead / while a read waited."""
        return {"read_ahead": self.ra.stats["ahead"], "on_demand": self.ra.stats["on_demand"]}

    async def validate_tables(self) -> None:
        """Fetch and check every allocated L2 table once (8 bytes per guest
        cluster: 1/8192 of the virtual size with 64 KiB clusters; in parallel
        batches), so truncated or corrupt mappings are refused before the import
        stores anything. The last ones stay in the process's (32 MiB) L2 cache.

        A table several L1 entries name (QEMU never writes one; a crafted
        image may name one table from all of them) is fetched and checked once.
        The host bytes the tables name are claimed in a ledger (hostclaims.py):
        a cluster mapped twice, which would let a small object expand into
        terabytes of import work, is refused here."""
        claims = HostClaims(self.map)
        users: dict[int, list[int]] = {}  # table offset -> L1 indices, ascending
        for i, e in enumerate(self.map.l1):
            if e & OFFSET_MASK:
                users.setdefault(e & OFFSET_MASK, []).append(i)
        tables = list(users.items())
        step = max(1, 4 * self.settings.concurrency)
        for b in range(0, len(tables), step):
            batch = tables[b:b + step]
            got = await self._parallel([(off, self.header.cluster_size) for off, _ in batch])
            for off, indices in batch:
                table = self.map.parse_l2(got[off])
                await trio.to_thread.run_sync(self._check_and_mark, indices, table,
                                              claims, limiter=self.cpu_limiter)
                self._remember_l2(off, table)

    def _check_and_mark(self, l1_indices: list[int], table: array,
                        claims: HostClaims) -> None:
        # The first index checks the most entries: only the last table of the
        # virtual size has entries past it, which are not checked.
        self.map.check_l2(l1_indices[0], table)
        claims.claim_l2(l1_indices, table)
        self.allocation.mark_l2(self.map, l1_indices, table)

    async def fetch(self, offset: int, length: int) -> mmap.mmap:
        """Guest bytes offset..+length in a buffer of their own, from one round of
        parallel ranged GETs, with no read-ahead or caching: for a caller that
        walks the allocation itself (snapfs.s3.allocfetch)."""
        return await self._fetch(offset, length)

    def next_data(self, offset: int) -> int:
        """The first guest offset >= ``offset`` that some L2 table maps (the size
        when none): a span without an L2 table reads as zeros, so an import skips
        it instead of fetching and hashing zeros (an empty 10 TB image)."""
        span, l1 = self.map.l2_span(), self.map.l1
        i = offset // span
        while i < len(l1) and not l1[i] & OFFSET_MASK:
            i += 1
        return min(self.size, max(offset, i * span))

    async def next_allocated(self, offset: int) -> int:
        """From the allocation validate_tables marked (no request): SEEK_DATA."""
        a = self.allocation
        return min(self.size, max(offset, a.next_set(offset // a.grain) * a.grain))

    async def next_hole(self, offset: int) -> int:
        a = self.allocation
        return min(self.size, max(offset, a.next_clear(offset // a.grain) * a.grain))

    async def read(self, offset: int, length: int) -> bytes:
        return await self.ra.read(offset, length)

    async def read_transient(self, offset: int, length: int) -> Buffer:
        """As read(); a range inside one window comes back as a view of it (no
        copy), valid until the caller next awaits."""
        return await self.ra.read_transient(offset, length)

    async def _fetch_view(self, offset: int, length: int) -> Buffer:
        return memoryview(await self._fetch(offset, length)).toreadonly()

    def _drop(self, window: Buffer) -> None:
        """A window leaves the cache: its buffer is kept for the next window of
        any reader (a fresh multi-MiB buffer per window costs page faults --
        measured as the largest item left after direct GETs). Only full-size
        windows (a sequential stream's), a few for the process: bounded memory."""
        buf = window.obj if isinstance(window, memoryview) else None
        if isinstance(buf, mmap.mmap) and len(buf) == self.settings.readahead:
            SPARES.give(buf)

    def _buffer(self, length: int) -> mmap.mmap:
        """A spare window buffer, else a new page-aligned one (see aligned_buffer)."""
        return SPARES.take(length) or aligned_buffer(length)

    async def _fetch(self, offset: int, length: int) -> mmap.mmap:
        """Guest bytes offset..+length, from one round of parallel GETs. Data
        clusters contiguous on the host are read by their GETs straight into
        the result (holes stay its zeros); only compressed clusters and merged
        scattered ones go through a scratch buffer and a copy."""
        # The tables this range needs, held locally: concurrent reads may evict
        # them from the shared LRU while this one awaits.
        tables: dict[int, array] = {}
        missing = []
        for o in dict.fromkeys(self.map.l2_offsets(offset, length)):
            cached = L2_TABLES.get(self._token, o)
            if cached is None:
                missing.append(o)
            else:
                tables[o] = cached
        if missing:
            got_tables = await self._parallel([(o, self.header.cluster_size)
                                               for o in missing])
            for o in missing:
                tables[o] = self.map.parse_l2(got_tables[o])
                self._remember_l2(o, tables[o])
        extents = self.map.extents(offset, length, tables.__getitem__)
        out = self._buffer(length)
        view = memoryview(out)
        direct: list[tuple[int, memoryview]] = []
        scratch: list[tuple[int, int]] = []
        copied: list[Extent] = []
        cap = self.settings.max_get
        for e in extents:  # every byte is written: holes too (the buffer may be reused)
            if e.kind == ZERO:
                pos = e.guest_offset - offset
                for o in range(pos, pos + e.length, len(_ZEROS)):
                    view[o:min(pos + e.length, o + len(_ZEROS))] = \
                        _ZEROS[:min(pos + e.length - o, len(_ZEROS))]
        for lo, hi, members in self._plan(extents):
            if len(members) == 1 and members[0].kind == DATA:
                pos = members[0].guest_offset - offset - lo
                direct += [(o, view[pos + o:pos + min(hi, o + cap)])
                           for o in range(lo, hi, cap)]
            else:
                scratch += [(o, min(cap, hi - o)) for o in range(lo, hi, cap)]
                copied += members
        got: dict[int, bytearray] = {}

        async def one(off: int, n: int) -> None:
            got[off] = await _get_range(self.calls, self.bucket, self.key, off, n, self.etag)
        try:
            async with trio.open_nursery() as nursery:
                for off, piece in direct:
                    nursery.start_soon(_get_into, self.calls, self.bucket, self.key,
                                       off, piece, self.etag)
                for off, n in scratch:
                    nursery.start_soon(one, off, n)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        if copied:
            await trio.to_thread.run_sync(self._copy_in, copied, got, view, offset,
                                          limiter=self.cpu_limiter)
        return out

    def _copy_in(self, extents: list[Extent], got: dict[int, bytearray],
                 view: memoryview, offset: int) -> None:
        """Copy (decompress) ``extents`` from the scratch GETs into ``view``
        (guest bytes from ``offset``). CPU work: runs in a worker thread."""
        starts = sorted(got)
        views = {base: memoryview(data) for base, data in got.items()}

        def host_bytes(off: int, n: int) -> bytes | memoryview:
            # A wanted range lies in one merged range, maybe across its pieces.
            i = bisect.bisect_right(starts, off) - 1
            pieces: list[memoryview] = []
            while n > 0 and 0 <= i < len(starts):
                base = starts[i]
                piece = views[base][off - base:off - base + n]
                if not piece:
                    break
                pieces.append(piece)
                off += len(piece)
                n -= len(piece)
                i += 1
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        for e in extents:
            pos = e.guest_offset - offset
            if e.kind == DATA:
                data = host_bytes(e.host_offset, e.length)
                if len(data) != e.length:
                    raise InvalidData(f"truncated QCOW2 image: data for guest offset "
                                      f"{e.guest_offset} is short")
                view[pos:pos + e.length] = data
            else:
                cluster = decompress_cluster(host_bytes(e.host_offset, e.host_length),
                                             self.header, e.guest_offset - e.skip)
                view[pos:pos + e.length] = memoryview(cluster)[e.skip:e.skip + e.length]

    def _remember_l2(self, off: int, table: array) -> None:
        L2_TABLES.put(self._token, off, table)

    def _plan(self, extents: list[Extent]) -> list[tuple[int, int, list[Extent]]]:
        """The host ranges to GET for ``extents`` (DATA and COMPRESSED), each with
        the extents it holds: neighbouring ranges merged (compressed clusters sit
        back to back; small gaps are cheaper fetched than asked for again) while
        the merged range stays within twice the bytes its extents need. Without
        that bound, clusters a crafted image scatters just under MERGE_GAP apart
        (512-byte clusters, 60 KiB between them) made a 64 KiB read GET 7.5 MiB."""
        wanted = sorted(((e.host_offset, e.length if e.kind == DATA else e.host_length, e)
                         for e in extents if e.kind in (DATA, COMPRESSED)),
                        key=lambda w: w[0])
        merged: list[tuple[int, int, list[Extent]]] = []
        need = 0  # bytes the extents of merged[-1] need, each counted (overlaps too)
        for off, n, e in wanted:
            if merged:
                lo, hi, members = merged[-1]
                top = max(hi, off + n)
                if off <= hi + MERGE_GAP and top - lo <= 2 * (need + n):
                    members.append(e)
                    merged[-1] = (lo, top, members)
                    need += n
                    continue
            merged.append((off, off + n, [e]))
            need = n
        return merged

    async def _parallel(self, ranges: list[tuple[int, int]]) -> dict[int, bytearray]:
        got: dict[int, bytearray] = {}

        async def one(off: int, n: int) -> None:
            got[off] = await _get_range(self.calls, self.bucket, self.key, off, n, self.etag)
        try:
            async with trio.open_nursery() as nursery:
                for off, n in ranges:
                    nursery.start_soon(one, off, n)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return got

    async def aclose(self) -> None:
        # Its L2 tables stay in the shared LRU for the next reader of the object
        # (or age out of it).
        await self.ra.aclose()
