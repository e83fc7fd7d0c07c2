"""Where a mount may go, and what `snapfs umount` may take down. Before: umount
unmounted any filesystem (and its lazy fallback detached a busy /proc); a mount
over its own store hung its daemon and every caller in a state no signal ends;
the mount helper form with its two arguments swapped made a new empty store and
mounted it over the real one."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from fixtures_mount import is_mounted, random_volume, snapfs
from test_cli_manners import one_line_error

pytestmark = pytest.mark.mount


def files_of(root: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime) for p in root.rglob("*"))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", where], check=True)
    (where / "keep").write_text("mine")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def test_umount_leaves_a_mount_that_is_not_snapfs_alone(tmpfs: Path) -> None:
    one_line_error(snapfs("umount", tmpfs, check=False), "tmpfs mount, not a snapfs one")
    assert is_mounted(tmpfs) and (tmpfs / "keep").read_text() == "mine"
    one_line_error(snapfs("umount", "/proc", check=False), "proc mount, not a snapfs one")
    assert Path("/proc/self/mountinfo").exists()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "outer" / "store"
    store.parent.mkdir()
    random_volume(store, tmp_path / "vol.raw", 1 << 20, "v")
    return store


@pytest.mark.parametrize("where", ["the store", "holds it", "inside it"])
def test_a_mount_over_or_inside_its_store_is_refused(store: Path, where: str) -> None:
    mnt = {"the store": store, "holds it": store.parent,
           "inside it": store / "volumes"}[where]
    mnt.mkdir(exist_ok=True)
    before = files_of(store.parent)
    res = snapfs("mount", mnt, "--store", store, check=False, timeout=30)
    one_line_error(res, "mount elsewhere")
    assert not is_mounted(mnt) and files_of(store.parent) == before


def test_the_helper_form_with_its_arguments_swapped_is_refused(
        store: Path, tmp_path: Path) -> None:
    """`snapfs MNT STORE` for `snapfs STORE MNT`: the empty mount point is not made
    a store, and the store is not hidden."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = files_of(store.parent)
    res = snapfs(mnt, store, check=False, timeout=30)
    one_line_error(res, "is a snapfs store", f"--store {store}")
    assert not is_mounted(store) and files_of(store.parent) == before
    assert list(mnt.iterdir()) == []
