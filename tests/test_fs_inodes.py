"""Inode numbers kept in the store's map file (snapfs/fs/inodes.py)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


from snapfs.fs.inodes import MAP_NAME, InodeMap, InodeTable, canonical
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


def test_memory_holds_what_the_kernel_holds(tmp_path: Path) -> None:
    """An entry the kernel was given stays in memory until it forgets every one
    of them; then only the map has it, and the number comes back unchanged."""
    t = InodeTable.in_store(tmp_path)
    snap = Key(Kind.SNAPSHOT, "z", "p", View(Kind.SNAPSHOTS), "s")
    img = Key(Kind.FILE, "z", "p", View(Kind.TAG, "t"), "s", "image.raw")
    ino = t.looked_up(snap)
    assert t.looked_up(snap) == ino and t.known(snap) == ino
    t.forget(ino, 1)
    assert t.known(snap) == ino  # one of its two entries is still held
    t.forget(ino, 1)
    assert t.known(snap) is None and t.snapshot_keys("s") == []
    assert t.key(ino) == snap  # a stale inode still resolves, from the map
    assert t.inode(snap) == ino and t.known(snap) is None  # a number alone is not held
    img_ino = t.looked_up(img)
    assert t.known(canonical(img)) == img_ino and len(t) == 2  # the root and image.raw
    t.forget(img_ino, 5)  # more than given (a count kept by another table): gone
    assert len(t) == 1 and t.looked_up(img) == img_ino
    t.close()


def test_numbers_only_memory_has_are_never_forgotten(tmp_path: Path) -> None:
    """Without a map (or once it stops taking rows) a number lives in memory only:
    forgetting it would give the node another number on its next lookup."""
    t = InodeTable()
    a = Key(Kind.ZONE, "a")
    ino = t.looked_up(a)
    t.forget(ino, 1)
    assert t.key(ino) == a and t.known(a) == ino and t.inode(a) == ino
    stored = InodeTable.in_store(tmp_path)
    kept = stored.looked_up(Key(Kind.ZONE, "kept"))
    stored._map.conn.execute("PRAGMA query_only = ON")  # type: ignore[union-attr]
    fresh = stored.looked_up(a)
    assert fresh > kept
    stored.forget(fresh, 1)
    stored.forget(kept, 1)
    assert stored.known(a) == fresh and stored.known(Key(Kind.ZONE, "kept")) is None
    assert stored.looked_up(Key(Kind.ZONE, "kept")) == kept  # still read from the map
    stored.close()


def test_a_detached_table_never_takes_another_mounts_new_numbers(tmp_path: Path) -> None:
    """Two mounts of one store share the map. When one cannot write to it (here:
    the other holds its lock) it numbers in memory above the map's highest --
    the very numbers the other mount goes on taking from the map for other
    keys. Found by a hunt: the detached mount then took those rows' numbers too,
    and two of its nodes had one inode (reads of one gave the other's bytes)."""
    a = InodeTable(InodeMap(tmp_path / MAP_NAME, timeout=0.05))
    b = InodeTable.in_store(tmp_path)
    old = Key(Kind.ZONE, "old")
    kept = a.looked_up(old)
    holder = sqlite3.connect(tmp_path / MAP_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    mine = a.looked_up(Key(Kind.ZONE, "mine"))  # the map is locked: in memory
    holder.execute("ROLLBACK")
    holder.close()
    theirs = b.looked_up(Key(Kind.ZONE, "theirs"))
    assert theirs == mine  # the map gave b the number a holds in memory
    theirs_in_a = a.looked_up(Key(Kind.ZONE, "theirs"))
    assert theirs_in_a not in (mine, kept)
    assert a.key(mine) == Key(Kind.ZONE, "mine")
    assert a.key(theirs_in_a) == Key(Kind.ZONE, "theirs")
    assert a.inode(old) == kept  # numbers the map had before stay the same
    a.forget(kept, 1)
    assert a.inode(old) == kept and a.key(kept) == old
    # b goes on: its numbers pass a's memory numbers. a takes those that are
    # not its own, and numbers in memory above them from then on.
    later = [b.looked_up(Key(Kind.ZONE, f"later{i}")) for i in range(3)]
    assert later[0] == theirs_in_a and later[2] > theirs_in_a
    assert a.looked_up(Key(Kind.ZONE, "later2")) == later[2]
    assert a.looked_up(Key(Kind.ZONE, "later0")) not in (later[0], theirs_in_a)
    assert a.looked_up(Key(Kind.ZONE, "fresh")) > later[2]
    numbers = [a.inode(Key(Kind.ZONE, n)) for n in
               ("old", "mine", "theirs", "later0", "later2", "fresh")]
    assert len(set(numbers)) == len(numbers)
    a.close()
    b.close()


def test_a_detached_table_keeps_numbers_in_the_map_again_once_it_can(
        tmp_path: Path) -> None:
    """A lock held for a while detached a mount for good: every node shown after
    it got a number for this mount only, and another after a remount. It tries
    the map again after retry_after, and new keys are kept there again."""
    a = InodeTable(InodeMap(tmp_path / MAP_NAME, timeout=0.05))
    a.retry_after = 0.2
    holder = sqlite3.connect(tmp_path / MAP_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    early = a.looked_up(Key(Kind.ZONE, "early"))  # in memory only
    holder.execute("ROLLBACK")
    holder.close()
    b = InodeTable.in_store(tmp_path)
    taken = b.looked_up(Key(Kind.ZONE, "b-first"))  # the map gives b a's number
    assert taken == early
    time.sleep(0.3)
    late = a.looked_up(Key(Kind.ZONE, "late"))
    reader = InodeMap(tmp_path / MAP_NAME)
    assert reader.find(Key(Kind.ZONE, "late")) == late  # kept in the map
    reader.close()
    assert a.looked_up(Key(Kind.ZONE, "b-first")) not in (early, late)
    assert a.inode(Key(Kind.ZONE, "early")) == early
    a.close()
    b.close()
    again = InodeTable.in_store(tmp_path)  # a remount: the kept number comes back
    assert again.inode(Key(Kind.ZONE, "late")) == late
    again.close()
