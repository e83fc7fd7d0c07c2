"""Eight parallel readers of different images while snapshots are made, renamed
and tagged: no deadlock, no mixed data."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import MiB, Mount, run, snapfs

pytestmark = pytest.mark.mount

READERS = 8
SIZE = 24 * MiB


@pytest.mark.parametrize("mode", [["--direct-io"], []], ids=["direct-io", "page-cache"])
def test_parallel_readers_with_changes_going_on(mount_factory: Callable[..., Mount],
                                                tmp_path: Path, mode: list[str]) -> None:
    store = tmp_path / "store"
    digests = {}
    for i in range(READERS):
        vol = tmp_path / f"v{i}.raw"
        # Different bytes per volume, with a hole, so mixed chunks would show.
        data = os.urandom(SIZE // 2) + bytes(MiB) + os.urandom(SIZE // 2 - MiB)
        vol.write_bytes(data)
        digests[i] = hashlib.sha256(data).hexdigest()
        snapfs("volume", "add", f"v{i}", vol, "--store", store)
    m = mount_factory(store, *mode)  # direct-io: the daemon's read-ahead serves them
    for i in range(READERS):
        run("mkdir", m.volume(f"v{i}") / f"s{i}")
    for i in range(READERS):
        assert m.wait_state(m.snapshots() / f"s{i}") == "available"

    readers = []
    for i in range(READERS):
        image = m.volume(f"v{i}") / f"s{i}" / "image.raw"
        # Half read with 1 MiB requests (dd), half with cat's own buffer size.
        cmd = (f"dd if={image} bs=1M status=none | sha256sum" if i % 2
               else f"cat {image} | sha256sum")
        readers.append(subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True))
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
    assert changes >= 1
    # Every change landed.
    names = set(os.listdir(m.snapshots()))
    assert {f"renamed{c}" for c in range(changes)} <= names
    assert {f"s{i}" for i in range(READERS)} <= names
    for c in range(changes):
        m.wait_state(m.snapshots() / f"renamed{c}")
    assert m.xattr(m.snapshots() / f"s{(changes - 1) % READERS}", "tags") == \
        f"round{changes - 1},busy"
