"""Stores and volumes in odd places: a full disk when a command opens the store
was reported as a damaged database to restore from a backup (a user who did
lost every snapshot since); a store path that is not UTF-8 was made by the first
command and crashed every later one; a volume file whose name is not UTF-8
crashed `volume add` with a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from fixtures_http import start_server, stop_server
from fixtures_store import MiB, snapfs_cli
from test_store_trust import make_store, one_line_refusal, tree


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "none", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def test_a_full_disk_at_open_is_said_to_be_full_and_the_store_works_once_freed(
        small_fs: Path, tmp_path: Path) -> None:
    store = small_fs / "store"
    store.mkdir(mode=0o700)
    vol = tmp_path / "v.raw"
    vol.write_bytes(os.urandom(MiB))
    assert snapfs_cli("volume", "add", "v", str(vol), store=store).returncode == 0
    filler = small_fs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    for cmd in (["project", "create", "p"], ["volume", "list"], ["fsck"]):
        res = snapfs_cli(*cmd, store=store)
        one_line_refusal(res, "is full")
        assert "restore" not in res.stderr, (cmd, res.stderr)
    filler.unlink()
    res = snapfs_cli("volume", "list", store=store)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].startswith("v "), res.stdout
    assert snapfs_cli("fsck", store=store).returncode == 0


def test_a_store_path_that_is_not_utf8_is_refused_and_not_made(tmp_path: Path) -> None:
    store = os.fsdecode(os.fsencode(tmp_path) + b"/st\xffore")
    vol = tmp_path / "v.raw"
    vol.write_bytes(bytes(MiB))
    for cmd in (["volume", "add", "v", str(vol)], ["volume", "list"], ["fsck"]):
        one_line_refusal(snapfs_cli(*cmd, store=Path(store)), "not valid UTF-8")
    assert not os.path.exists(store)
    os.mkdir(store)  # an empty directory there stays empty
    one_line_refusal(snapfs_cli("volume", "add", "v", str(vol), store=Path(store)),
                     "not valid UTF-8")
    assert os.listdir(store) == []


def test_a_volume_file_whose_name_is_not_utf8_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/img\xff.raw")
    with open(odd, "wb") as f:
        f.truncate(MiB)
    before = tree(store)
    for cmd in (["volume", "add", "x", odd], ["volume", "repoint", "v", odd]):
        one_line_refusal(snapfs_cli(*cmd, store=store), "not valid UTF-8")
    after = tree(store)
    # (The directory's own mtime moves: SQLite makes and removes its -wal beside.)
    assert {k: v for k, v in after.items() if k != "."} == \
        {k: v for k, v in before.items() if k != "."}


def test_serve_says_when_it_made_a_new_store(tmp_path: Path) -> None:
    """As `volume`, `project create` and `mount` do: a mistyped --store shows."""
    for made in (True, False):
        log = tmp_path / f"serve-{made}.log"
        proc, _ = start_server(tmp_path / "new", log)
        stop_server(proc)
        said = f"snapfs: made a new store in {tmp_path / 'new'}" in log.read_text()
        assert said == made, log.read_text()
