"""README: on XFS and btrfs a snapshot is a clone of one instant of the volume,
even while a VM writes it. A writer rewrites the volume's blocks round-robin, each
block holding its write's sequence number; a snapshot taken meanwhile must hold
one cut of that sequence: the last N writes before some instant, nothing older,
nothing newer, no block half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fixtures_store import ZONE, read_all, wait_state
from snapfs.local import open_local_service

BLOCK = 4096
BLOCKS = 2048  # an 8 MiB volume

#: pwrite(2)s block seq % BLOCKS with seq repeated (8-byte words) forever,
#: without fsync (dirty pages, as a VM leaves them); says when it has wrapped.
WRITER = f"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
seq = 0
while True:
    os.pwrite(fd, seq.to_bytes(8, "little") * {BLOCK // 8}, (seq % {BLOCKS}) * {BLOCK})
    seq += 1
    if seq == 2 * {BLOCKS}:
        print("wrapped", flush=True)
"""


def sequence_numbers(data: bytes) -> list[int]:
    """Each block's sequence number; a block whose words differ is torn."""
    out = []
    for b in range(BLOCKS):
        block = data[b * BLOCK:(b + 1) * BLOCK]
        word = block[:8]
        assert block == word * (BLOCK // 8), f"block {b} is torn"
        out.append(int.from_bytes(word, "little"))
    return out


def one_instant(seqs: list[int]) -> bool:
    """The blocks hold exactly the writes last-N-before-some-instant: seqs
    M-N+1 .. M, each block b holding the one that is b modulo N."""
    top = max(seqs)
    return sorted(seqs) == list(range(top - BLOCKS + 1, top + 1)) and \
        all(s % BLOCKS == b for b, s in enumerate(seqs))


async def test_a_clone_taken_while_a_writer_runs_holds_one_instant(reflink_dir: Path) -> None:
    """Checked by breaking it: the same check on a plain sequential copy taken
    while the writer runs (dd of the volume: what a capture without a clone
    reads) fails -- its blocks come from many instants."""
    volume = reflink_dir / "vol.raw"
    with open(volume, "wb") as f:
        f.truncate(BLOCKS * BLOCK)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(volume)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "wrapped"
        async with open_local_service(reflink_dir / "store") as svc:
            vol = await svc.add_volume("v", volume)
            snaps = []
            for i in range(3):
                snap = await svc.create_snapshot(ZONE, name=f"s{i}", volume_id=vol.id)
                assert snap.state == "available"  # a clone: available at once
                snaps.append(snap)
            assert writer.poll() is None  # it wrote all along
            tops = []
            for snap in snaps:
                assert (await wait_state(svc, snap.id)).state == "available"
                seqs = sequence_numbers(await read_all(svc, snap.id))
                assert one_instant(seqs), f"{snap.name}: not one instant"
                tops.append(max(seqs))
            assert tops[0] < tops[1] < tops[2]  # three instants, the writer between
    finally:
        writer.kill()
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()
