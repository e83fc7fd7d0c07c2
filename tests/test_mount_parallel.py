"""Eight parallel readers of different images while snapshots are made, renamed
and tagged: no deadlock, no mixed data."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import MiB, Mount, run, snapfs

pytestmark = pytest.mark.mount

READERS = 8
SIZE = 24 * MiB


def compressible(i: int, size: int) -> bytes:
    """Bytes zstd shrinks ~20x, different in every 64-byte line of every volume:
    a chunk served from another chunk's (pooled) buffer would show."""
    lines = (f"volume {i:3d} line {n:12d} " + "." * 35 + "\n" for n in range(size // 64))
    return "".join(lines).encode()


#: A reader reading 4 KiB at random offsets, each checked against the volume's
#: bytes: pieces of chunks the sequential readers' windows and pooled buffers are
#: recycled under.
RANDOM_READER = """
import os, random, sys
image, volume, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
want = open(volume, "rb").read()
rng = random.Random(n)
with open(image, "rb", buffering=0) as f:
    for _ in range(n):
        off = rng.randrange(0, len(want) - 4096) & ~511
        got = os.pread(f.fileno(), 4096, off)
        if got != want[off:off + 4096]:
            sys.exit(f"wrong bytes at {off}")
"""


@pytest.mark.parametrize("data", ["random", "compressible"])
@pytest.mark.parametrize("mode", [["--direct-io"], []], ids=["direct-io", "page-cache"])
def test_parallel_readers_with_changes_going_on(mount_factory: Callable[..., Mount],
                                                tmp_path: Path, mode: list[str],
                                                data: str) -> None:
    """``compressible``: every chunk stored compressed, so that windows are
    decompressed into the readers' pooled buffers (shared by all readers, lent to
    FUSE replies) while 8 streams and 2 random readers exceed the readers' budget."""
    store = tmp_path / "store"
    digests = {}
    for i in range(READERS):
        vol = tmp_path / f"v{i}.raw"
        # Different bytes per volume, with a hole, so mixed chunks would show.
        part = compressible if data == "compressible" else (lambda _, n: os.urandom(n))
        content = part(i, SIZE // 2) + bytes(MiB) + part(i + 100, SIZE // 2 - MiB)
        vol.write_bytes(content)
        digests[i] = hashlib.sha256(content).hexdigest()
        snapfs("volume", "add", f"v{i}", vol, "--store", store)
    m = mount_factory(store, *mode)  # direct-io: the daemon's read-ahead serves them
    for i in range(READERS):
        run("mkdir", m.volume(f"v{i}") / f"s{i}")
    for i in range(READERS):
        assert m.wait_state(m.snapshots() / f"s{i}") == "available"
    with closing(sqlite3.connect(f"file:{store / 'metadata.db'}?mode=ro", uri=True)) as db:
        kinds = db.execute("SELECT count(raw_length), count(*) FROM chunks").fetchone()
    assert kinds[0] == (kinds[1] if data == "compressible" else 0), kinds

    readers = []
    for i in range(READERS):
        image = m.volume(f"v{i}") / f"s{i}" / "image.raw"
        # Half read with 1 MiB requests (dd), half with cat's own buffer size.
        cmd = (f"dd if={image} bs=1M status=none | sha256sum" if i % 2
               else f"cat {image} | sha256sum")
        readers.append(subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
    randoms = [subprocess.Popen([sys.executable, "-c", RANDOM_READER,
                                 str(m.volume(f"v{i}") / f"s{i}" / "image.raw"),
                                 str(tmp_path / f"v{i}.raw"), "3000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in (1, 6)]
    changes = 0
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in readers):
        assert time.monotonic() < deadline, "readers did not finish: deadlock?"
        j = changes % READERS
        vol_dir = m.volume(f"v{j}")
        run("mkdir", vol_dir / f"extra{changes}")
        run("setfattr", "-n", "user.tags", "-v", f"round{changes},busy",
            m.snapshots() / f"s{j}")
        run("mv", vol_dir / f"extra{changes}", vol_dir / f"renamed{changes}")
        changes += 1
    for i, p in enumerate(readers):
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        assert out.split()[0] == digests[i], f"reader {i} got other bytes"
    for p in randoms:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert changes >= 1
    # Every change landed.
    names = set(os.listdir(m.snapshots()))
    assert {f"renamed{c}" for c in range(changes)} <= names
    assert {f"s{i}" for i in range(READERS)} <= names
    for c in range(changes):
        m.wait_state(m.snapshots() / f"renamed{c}")
    assert m.xattr(m.snapshots() / f"s{(changes - 1) % READERS}", "tags") == \
        f"round{changes - 1},busy"
