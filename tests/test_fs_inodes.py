"""Inode numbers kept in the store's map file (snapfs/fs/inodes.py)."""

from __future__ import annotations

from pathlib import Path

from snapfs.fs.inodes import InodeTable, canonical
from snapfs.fs.keys import Key, Kind, View


def test_inode_numbers_persist_and_survive_a_read_only_map(tmp_path: Path) -> None:
    """Numbers come back from the store's map in a new table (a remount); a map
    that stops taking rows (read-only) numbers the rest in memory, above all
    stored numbers, never giving one twice."""
    snap = Key(Kind.SNAPSHOT, "z", "p", View(Kind.TAG, "t"), "s")
    img = Key(Kind.FILE, "z", "p", View(Kind.VOLUME, "v"), "s", "image.raw")
    first = InodeTable.in_store(tmp_path)
    numbers = (first.inode(snap), first.inode(img))
    assert first.inode(canonical(img)) == numbers[1]  # one inode in every view
    first.close()
    again = InodeTable.in_store(tmp_path)
    assert (again.inode(snap), again.inode(img)) == numbers
    assert again.key(numbers[0]) == snap
    again._map.conn.execute("PRAGMA query_only = ON")  # type: ignore[union-attr]
    fresh = again.inode(Key(Kind.ZONE, "other"))
    assert fresh > max(numbers) and again.inode(Key(Kind.ZONE, "other")) == fresh
    assert again.inode(snap) == numbers[0]
    again.close()
