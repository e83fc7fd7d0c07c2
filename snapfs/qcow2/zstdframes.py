"""One zstd-compressed QCOW2 cluster, decompressed as QEMU does and never into
more memory than the cluster.

QEMU (block/qcow2-threads.c, qcow2_zstd_decompress) runs ZSTD_decompressStream
into a buffer of exactly one cluster, frame after frame, until the buffer is
full; it fails (EIO) when the input ends first, or when the frame that filled
the buffer has not ended there (more output, a missing checksum, a cut block).
Bytes after that frame are never looked at: the entry's sector count rounds
the compressed length up, so they are usually the next cluster's.

zstandard's streaming objects return all of a frame's output at once (a bomb
of 100 KiB inflates to gigabytes) and do not say where a frame ended, so each
frame is first delimited here from its header and block headers (RFC 8878
section 3.1.1; cheap: one 3-byte header per block of up to 128 KiB) and then
decompressed on its own with an output bound: its declared content size, else
the room left in the cluster.
"""

from __future__ import annotations

import struct

from ..errors import InvalidData

_MAGIC = 0xFD2FB528
_SKIPPABLE, _SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0
_UNKNOWN = -1
#: The largest window a frame may ask for, beyond the cluster size: QEMU's
#: frames (one ZSTD_e_end call over one cluster) never need more than the
#: cluster; zstd would allocate what a crafted header asks (up to 128 MiB).
_MIN_WINDOW = 1 << 20


def decompress(data: bytes | memoryview, cluster_size: int, where: str) -> bytes:
    """The cluster's bytes (exactly ``cluster_size``); InvalidData naming
    ``where`` when QEMU would fail to read it."""
    import zstandard  # only images that use it pay for the import
    dctx = zstandard.ZstdDecompressor(max_window_size=max(cluster_size, _MIN_WINDOW))
    src = memoryview(data).cast("B")
    out: list[bytes] = []
    filled = pos = 0
    while filled < cluster_size:
        if pos >= len(src):
            raise InvalidData(f"{where} decompresses to {filled} bytes, not "
                              f"{cluster_size} (truncated?)")
        end, content = _frame_extent(src, pos, where)
        if content is None:  # a skippable frame: no output
            pos = end
            continue
        room = cluster_size - filled
        if content > room:
            raise InvalidData(f"{where}: a zstd frame of {content} bytes overflows the "
                              f"cluster ({room} bytes left)")
        frame = src[pos:end]
        try:
            if content == _UNKNOWN:
                # One shot into a buffer of ``room`` bytes: zstd fails when the
                # frame has more to give (QEMU: the buffer fills before the frame ends).
                piece = dctx.decompress(frame, max_output_size=room)
            else:
                # zstd checks each block against the declared size, so at most
                # one block (128 KiB) beyond it is ever produced before it fails.
                piece = dctx.decompressobj().decompress(frame)
                if len(piece) != content:
                    raise InvalidData(f"{where}: a zstd frame declares {content} bytes "
                                      f"and holds {len(piece)}")
        except zstandard.ZstdError as exc:
            raise InvalidData(f"{where} does not decompress: {exc}") from None
        out.append(piece)
        filled += len(piece)
        pos = end
    return out[0] if len(out) == 1 else b"".join(out)


def _frame_extent(src: memoryview, pos: int, where: str) -> tuple[int, int | None]:
    """(end, content size) of the frame at ``pos``: ``_UNKNOWN`` when the
    header does not say, None for a skippable frame. InvalidData when the
    frame does not end inside ``src`` (QEMU reads it as a cut frame)."""
    n = len(src)

    def need(upto: int) -> None:
        if upto > n:
            raise InvalidData(f"{where}: truncated zstd frame (ends after byte "
                              f"{upto - 1} of {n})")
    need(pos + 4)
    magic = struct.unpack_from("<I", src, pos)[0]
    if magic & _SKIPPABLE_MASK == _SKIPPABLE:
        need(pos + 8)
        end = pos + 8 + struct.unpack_from("<I", src, pos + 4)[0]
        need(end)
        return end, None
    if magic != _MAGIC:
        raise InvalidData(f"{where} does not decompress: not a zstd frame "
                          f"(magic 0x{magic:08x})")
    need(pos + 5)
    fhd = src[pos + 4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    p = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    need(p + fcs_len)
    if fcs_len:
        content = int.from_bytes(src[p:p + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    else:
        content = _UNKNOWN
    p += fcs_len
    while True:
        need(p + 3)
        block = int.from_bytes(src[p:p + 3], "little")
        last, kind, size = block & 1, block >> 1 & 3, block >> 3
        if kind == 3:
            raise InvalidData(f"{where} does not decompress: reserved zstd block type")
        p += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        need(p)
        if last:
            break
    p += 4 * checksum
    need(p)
    return p, content
