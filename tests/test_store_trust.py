"""The store is recognisable and trusts no one else (issues #12 items 1-2, #13 item 4):
a damaged, foreign or untrusted store is refused by every command with one line,
changing nothing; read-only commands change no file; nothing is deleted that the
metadata does not record as freed; `fsck --repair` says what it does first."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trio

from fixtures_mount import ZONE, Mount, is_mounted, run, stop_process
from fixtures_store import (MiB, random_bytes, read_all, snapfs_cli, snapshot_of,
                            write_volume)
from snapfs.errors import StoreUnusable
from snapfs.local import open_local_service
from snapfs.local.store import MARKER

Tree = dict[str, tuple[int, int, bytes | str]]


def tree(root: Path) -> Tree:
    """Every entry under ``root`` (and root itself): mode, mtime, and bytes (or link
    target): equal trees mean nothing was changed, created or removed."""
    out: Tree = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(p)
        if p.is_symlink():
            body: bytes | str = os.readlink(p)
        elif p.is_file():
            body = p.read_bytes()
        else:
            body = ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, body)
    return out


def make_store(store: Path, tmp: Path, name: str = "v") -> tuple[str, bytes]:
    """A store with a volume and one available snapshot: (its id, its bytes)."""
    data = random_bytes(3 * MiB, seed=len(name))
    vol = write_volume(tmp / f"{name}.raw", 4 * MiB, [(0, data)])

    async def go() -> str:
        async with open_local_service(store) as svc:
            return (await snapshot_of(svc, vol, "s")).id
    return trio.run(go), vol.read_bytes()


def packs(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store / "packs").glob("*"))}


def one_line_refusal(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def damage(store: Path, how: str, tmp: Path) -> str:
    """Damage metadata.db as a user or a disk would; the word the refusal must say."""
    db = store / "metadata.db"
    if how == "removed":
        for p in store.glob("metadata.db*"):
            p.unlink()
        return "missing"
    if how == "empty":
        db.write_bytes(b"")
        return "empty"
    if how == "page":  # a page whose header lies: SQLite's report of it spans lines
        with open(db, "r+b") as f:
            f.seek(3 * 4096)
            f.write(b"\x05" + bytes(7))
        return "damaged: *** in database main *** / Page 4"
    if how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(os.path.getsize(db) // 2)
        return "truncated"
    other = tmp / "other"
    make_store(other, tmp, "w")
    shutil.copyfile(other / "metadata.db", db)
    return "another store"


#: Every command given the store, as a user would run it.
COMMANDS: list[list[str]] = [
    ["volume", "add", "x", "{vol}"], ["volume", "create", "y", "--size", "1M"],
    ["volume", "list"], ["volume", "rm", "v"], ["volume", "repoint", "v", "{vol}"],
    ["project", "create", "p"], ["project", "list"], ["fsck"], ["fsck", "--repair"],
    ["compression"], ["compression", "1"],
]


@pytest.mark.parametrize("how", ["removed", "empty", "truncated", "foreign", "page"])
def test_a_damaged_metadata_db_is_refused_by_every_command_and_nothing_changes(
        tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    word = damage(store, how, tmp_path)
    before = tree(store)
    assert packs(store)  # there is data to lose
    vol = write_volume(tmp_path / "x.raw", MiB, [])
    for cmd in COMMANDS:
        res = snapfs_cli(*(a.format(vol=vol) for a in cmd), store=store)
        one_line_refusal(res, word)
        assert "restore" in res.stderr, res.stderr  # the way out
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = snapfs_cli("mount", str(mnt), store=store)
    try:
        one_line_refusal(res, word)
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    res = snapfs_cli("serve", "--listen", "127.0.0.1:0", store=store)
    one_line_refusal(res, word)
    assert "serving" not in res.stdout
    res = snapfs_cli("wait", str(mnt / "fr-par-1"), store=store)
    one_line_refusal(res)
    assert tree(store) == before  # pack files byte-identical, nothing made or removed


def test_fsck_on_a_directory_of_other_files_refuses_and_writes_nothing(
        tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not a store")
    before = tree(other)
    for cmd in (["fsck"], ["fsck", "--repair"], ["volume", "list"], ["project", "create", "p"]):
        one_line_refusal(snapfs_cli(*cmd, "--store", str(other)), "not a snapfs store")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    one_line_refusal(snapfs_cli("mount", str(mnt), "--store", str(other)), "not a snapfs store")
    assert tree(other) == before


def test_read_only_commands_change_no_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    before = tree(store)
    for cmd in (["volume", "list"], ["project", "list", "--json"], ["fsck"]):
        res = snapfs_cli(*cmd, store=store)
        assert res.returncode == 0, res.stderr
    assert "clean" in snapfs_cli("fsck", store=store).stdout
    one_line_refusal(snapfs_cli("wait", str(store / "nothing")))
    assert tree(store) == before
    # A missing store is not made by a read-only command.
    res = snapfs_cli("volume", "list", store=tmp_path / "none")
    one_line_refusal(res, "no snapfs store")
    assert not (tmp_path / "none").exists()


def test_a_read_only_command_refuses_a_store_that_needs_a_migration(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    with sqlite3.connect(store / "metadata.db") as conn:
        conn.execute("DROP TABLE damaged_chunks")  # the newest migration
        conn.execute("UPDATE meta SET value = value - 1 WHERE key = 'schema_version'")
    conn.close()
    before = tree(store)
    one_line_refusal(snapfs_cli("volume", "list", store=store), "needs a migration")
    assert tree(store) == before
    assert snapfs_cli("project", "create", "p", store=store).returncode == 0  # migrates
    assert snapfs_cli("volume", "list", store=store).returncode == 0


def test_a_store_of_an_earlier_version_opens_and_is_marked(tmp_path: Path) -> None:
    """Stores from before the marker: metadata.db (0644) with a schema version."""
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    (store / MARKER).unlink()
    with sqlite3.connect(store / "metadata.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'store_id'")
    conn.close()
    os.chmod(store / "metadata.db", 0o644)
    before = tree(store)
    assert snapfs_cli("volume", "list", store=store).returncode == 0
    assert tree(store) == before  # read-only: not marked

    async def reopen() -> None:
        async with open_local_service(store) as svc:
            assert await read_all(svc, snap) == data
    trio.run(reopen)
    marker = (store / MARKER).read_text()
    assert marker.startswith("snapfs store\nformat 1\nid ")
    store_id = sqlite3.connect(store / "metadata.db").execute(
        "SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
    assert marker.split()[-1] == store_id
    assert (store / "metadata.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("what", ["format", "schema"])
def test_a_store_of_a_newer_snapfs_is_refused(tmp_path: Path, what: str) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    if what == "format":
        text = (store / MARKER).read_text().replace("format 1", "format 99")
        (store / MARKER).write_text(text)
    else:
        with sqlite3.connect(store / "metadata.db") as conn:
            conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        conn.close()
    before = tree(store)
    for cmd in (["volume", "list"], ["project", "create", "p"], ["fsck", "--repair"]):
        one_line_refusal(snapfs_cli(*cmd, store=store), "newer", "upgrade snapfs")
    assert tree(store) == before


def test_a_store_is_made_only_in_a_missing_or_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    assert snapfs_cli("project", "create", "p", store=empty).returncode == 0
    assert (empty / MARKER).is_file()
    assert (empty / "metadata.db").stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "a" / "b"
    assert snapfs_cli("project", "create", "p", store=fresh).returncode == 0
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_a_file_in_packs_of_no_packs_name_is_reported_and_moved_not_a_crash(
        tmp_path: Path) -> None:
    """"²².pack" passed str.isdigit() and crashed every command in int(); "12.pack"
    was taken for pack 12, whose file is 00000012.pack."""
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    for name in ("²².pack", "12.pack", "notes.txt"):
        (store / "packs" / name).write_text(name)
    res = snapfs_cli("volume", "list", store=store)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    before = tree(store)
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1 and tree(store) == before
    for name in ("²².pack", "12.pack", "notes.txt"):
        assert f"pack file {name} has no metadata" in res.stdout, res.stdout
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0 and res.stdout.splitlines()[-1].endswith("clean"), res.stdout
    assert sorted(os.listdir(store / "lost+found")) == ["12.pack", "notes.txt", "²².pack"]
    assert (store / "lost+found" / "12.pack").read_text() == "12.pack"

    async def reread() -> None:
        async with open_local_service(store) as svc:
            assert await read_all(svc, snap) == data
    trio.run(reread)


def test_open_never_removes_a_pack_file_no_row_knows(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    stray = store / "packs" / "00000077.pack"
    stray.write_bytes(b"bytes the metadata does not account for")

    async def reopen() -> None:
        async with open_local_service(store) as svc:  # exclusive: recovery runs
            assert await read_all(svc, snap) == data
    trio.run(reopen)
    assert stray.read_bytes() == b"bytes the metadata does not account for"


def test_fsck_lists_and_repair_fixes_an_orphan_pack_and_a_queued_extent(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    pack = sorted((store / "packs").glob("*.pack"))[0]
    # A freed chunk's range queued for punching (as a crash between a delete's commit
    # and its punch leaves it), and a pack file no row knows.
    committed = pack.stat().st_size
    with open(pack, "ab") as f:
        f.write(random_bytes(MiB, seed=99))
    with sqlite3.connect(store / "metadata.db") as conn:
        conn.execute("UPDATE packs SET committed = ? WHERE id = ?", (committed + MiB,
                                                                      int(pack.stem)))
        conn.execute("INSERT INTO free_extents (pack, offset, length) VALUES (?, ?, ?)",
                     (int(pack.stem), committed, MiB))
    conn.close()
    orphan = store / "packs" / "00000042.pack"
    orphan.write_bytes(random_bytes(8192, seed=42))
    blocks = pack.stat().st_blocks

    before = tree(store)
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1
    assert "problem: pack file 00000042.pack has no metadata" in res.stdout
    assert "to tidy: punch 1 freed extent(s)" in res.stdout
    assert tree(store) == before  # plain fsck changes nothing

    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fsck --repair" not in res.stderr, res.stderr  # no advice to do what it does
    lines = res.stdout.splitlines()
    planned = [i for i, line in enumerate(lines) if line.startswith("repair: will ")]
    assert len(planned) == 2, res.stdout
    assert "punch 1 freed extent" in lines[planned[0]]
    assert "00000042.pack" in lines[planned[1]] and "lost+found" in lines[planned[1]]
    assert lines[-1].endswith("clean")
    assert not orphan.exists()
    assert (store / "lost+found" / "00000042.pack").read_bytes() == \
        random_bytes(8192, seed=42)
    assert pack.stat().st_blocks <= blocks - MiB // 512  # the extent's space is back

    async def reread() -> None:
        async with open_local_service(store) as svc:
            assert await read_all(svc, snap) == data
    trio.run(reread)
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 0 and "to tidy" not in res.stdout, res.stdout


def test_repair_refuses_while_the_store_is_open_elsewhere(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, trio\nfrom snapfs.local import open_local_service\n"
         "async def main():\n    async with open_local_service(sys.argv[1]):\n"
         "        print('open', flush=True)\n        await trio.sleep_forever()\n"
         "trio.run(main)", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        one_line_refusal(snapfs_cli("fsck", "--repair", store=store), "open in another process")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_store_errors_of_the_cli_are_one_line(tmp_path: Path) -> None:
    one_line_refusal(snapfs_cli("volume", "list", "--store", "/etc/passwd"), "not a directory")
    one_line_refusal(snapfs_cli("project", "create", "p", "--store", "/etc/passwd/x"),
                     "not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ro)], check=True)
    try:
        store = ro / "store"
        assert snapfs_cli("project", "create", "p", store=store).returncode == 0
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        one_line_refusal(snapfs_cli("project", "create", "q", store=store),
                         "read-only filesystem")
        res = snapfs_cli("project", "list", store=store)  # reading still works
        assert res.returncode == 0 and "default" in res.stdout, res.stderr
        one_line_refusal(snapfs_cli("volume", "list", store=ro / "new"))
    finally:
        subprocess.run(["umount", str(ro)])


# --- hostile neighbours (run as user nobody) ---------------------------------------------

@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="snapfs-trust-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *map(str, cmd)],
                          capture_output=True, text=True, timeout=60)


def test_a_store_someone_else_owns_or_may_write_is_refused(shared_tmp: Path) -> None:
    store = shared_tmp / "store"
    make_store(store, shared_tmp)
    os.chown(store, 65534, 65534)  # nobody's
    before = tree(store)
    for cmd in (["volume", "list"], ["project", "create", "p"], ["fsck"]):
        one_line_refusal(snapfs_cli(*cmd, store=store), "belongs to uid 65534")
    mnt = shared_tmp / "mnt"
    mnt.mkdir()
    one_line_refusal(snapfs_cli("mount", str(mnt), store=store), "belongs to uid 65534")
    assert not is_mounted(mnt)
    os.chown(store, 0, 0)
    for mode in (0o770, 0o707, 0o777):
        store.chmod(mode)
        one_line_refusal(snapfs_cli("project", "create", "p", store=store),
                         "writable by group or others", "chmod go-w")
    store.chmod(0o700)
    after = tree(store)
    assert {k: v for k, v in after.items() if k != "."} == \
        {k: v for k, v in before.items() if k != "."}


def test_a_store_someone_else_could_swap_is_refused(shared_tmp: Path) -> None:
    """Whoever may write a directory above the store could swap the store for a
    directory of their choosing between snapfs's checks and its opens (by path):
    refused, by every command, along the path as given (a symlink in their
    directory) and as resolved; a sticky directory (/tmp) is fine."""
    theirs = shared_tmp / "theirs"
    theirs.mkdir()
    store = theirs / "store"
    make_store(store, shared_tmp)
    before = tree(store)
    os.chown(theirs, 65534, 65534)  # nobody's
    mnt = shared_tmp / "mnt"
    mnt.mkdir()
    for cmd in (["volume", "list"], ["project", "create", "p"], ["fsck"]):
        one_line_refusal(snapfs_cli(*cmd, store=store),
                         f"{theirs} above it belongs to uid 65534")
    one_line_refusal(snapfs_cli("mount", str(mnt), store=store), "belongs to uid 65534")
    assert not is_mounted(mnt)
    one_line_refusal(snapfs_cli("project", "create", "p", store=theirs / "new" / "store"),
                     "belongs to uid 65534")
    assert not (theirs / "new").exists()  # nothing made under their directory
    # A link in their directory to a store whose own parents are trusted.
    mine = shared_tmp / "mine"
    mine.mkdir()
    os.chown(theirs, 0, 0)
    store.rename(mine / "store")
    (theirs / "link").symlink_to(mine)
    os.chown(theirs, 65534, 65534)
    one_line_refusal(snapfs_cli("volume", "list", store=theirs / "link" / "store"),
                     "belongs to uid 65534")
    # Root's again, but writable by others: refused; sticky as /tmp: used.
    os.chown(theirs, 0, 0)
    theirs.chmod(0o777)
    one_line_refusal(snapfs_cli("volume", "list", store=theirs / "link" / "store"),
                     "writable by group or others", f"chmod go-w {theirs}")
    theirs.chmod(0o1777)
    res = snapfs_cli("volume", "list", store=theirs / "link" / "store")
    assert res.returncode == 0 and "v" in res.stdout.split(), res.stderr
    # ...but a link there that is theirs, they may point anywhere (the sticky bit
    # guards only our own entries), the store's own path as well as a parent.
    os.lchown(theirs / "link", 65534, 65534)
    (theirs / "store-link").symlink_to(mine / "store")
    os.lchown(theirs / "store-link", 65534, 65534)
    for given in (theirs / "link" / "store", theirs / "store-link"):
        one_line_refusal(snapfs_cli("volume", "list", store=given),
                         "symbolic link of uid 65534")
    assert tree(mine / "store") == before


def test_a_symlinked_mount_log_is_never_followed(shared_tmp: Path) -> None:
    store = shared_tmp / "store"
    make_store(store, shared_tmp)
    victim = shared_tmp / "root-owned.conf"
    victim.write_text("root's file\n")
    victim.chmod(0o644)
    store.chmod(0o777)  # a careless chmod: nobody plants a symlink
    assert as_nobody("ln", "-s", victim, store / "mount.log").returncode == 0
    mnt = shared_tmp / "mnt"
    mnt.mkdir()
    try:
        one_line_refusal(snapfs_cli("mount", str(mnt), store=store),
                         "writable by group or others")
        store.chmod(0o700)  # the mode fixed, the symlink left behind
        res = snapfs_cli("mount", str(mnt), store=store)
        one_line_refusal(res, "mount.log", "symlink")
    finally:
        if is_mounted(mnt):
            pid = int(os.getxattr(mnt, "user.pid"))
            subprocess.run(["fusermount3", "-u", str(mnt)])
            stop_process(pid)
    assert victim.read_text() == "root's file\n"


@pytest.mark.parametrize("planted", ["inodes.sqlite", "inodes.sqlite-wal"])
def test_a_symlinked_inode_map_is_never_followed(tmp_path: Path, planted: str) -> None:
    """SQLite follows symlinks and creates what they point at: the mount's inode
    map (and its -wal) is checked first, as the log and metadata.db are."""
    store = tmp_path / "store"
    make_store(store, tmp_path)
    if planted != "inodes.sqlite":
        (store / "inodes.sqlite").touch(mode=0o600)
    target = tmp_path / "cron.d-file"  # where a root-owned file must not appear
    (store / planted).symlink_to(target)
    before = tree(store)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        one_line_refusal(snapfs_cli("mount", str(mnt), store=store), planted, "symlink")
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            pid = int(os.getxattr(mnt, "user.pid"))
            subprocess.run(["fusermount3", "-u", str(mnt)])
            stop_process(pid)
    assert not list(tmp_path.glob("cron.d-file*"))
    after = tree(store)
    assert {k: v for k, v in after.items() if k not in (".", "mount.log")} == \
        {k: v for k, v in before.items() if k not in (".", "mount.log")}


def test_a_symlinked_packs_directory_is_refused(tmp_path: Path) -> None:
    """A `packs` link planted while the store was open to others would have every
    chunk written (and read) where the link's owner reads them."""
    store = tmp_path / "store"
    make_store(store, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (store / "packs").rename(elsewhere)
    (store / "packs").symlink_to(elsewhere)
    before, theirs = tree(store), tree(elsewhere)
    for cmd in (["volume", "list"], ["fsck"], ["project", "create", "p"]):
        one_line_refusal(snapfs_cli(*cmd, store=store), "packs", "symlink")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    one_line_refusal(snapfs_cli("mount", str(mnt), store=store), "packs", "symlink")
    assert not is_mounted(mnt)
    assert tree(store) == before and tree(elsewhere) == theirs


def test_volume_rm_deletes_only_a_file_inside_the_stores_volumes(shared_tmp: Path) -> None:
    store = shared_tmp / "store"
    make_store(store, shared_tmp)
    victim = shared_tmp / "shadow-like"
    victim.write_text("root's secret\n")
    assert snapfs_cli("volume", "create", "scratch", "--size", "1M", store=store).returncode == 0
    # nobody swaps in a metadata.db whose store-managed volume is root's file.
    evil = shared_tmp / "evil.db"
    shutil.copyfile(store / "metadata.db", evil)
    with sqlite3.connect(evil) as conn:
        conn.execute("UPDATE volumes SET path = ? WHERE name = 'scratch'", (str(victim),))
    conn.close()
    evil.chmod(0o644)
    store.chmod(0o777)
    res = as_nobody("cp", evil, store / "metadata.db.new")
    assert res.returncode == 0, res.stderr
    assert as_nobody("mv", store / "metadata.db.new", store / "metadata.db").returncode == 0
    store.chmod(0o700)
    one_line_refusal(snapfs_cli("volume", "rm", "scratch", store=store), "belongs to uid")
    assert victim.read_text() == "root's secret\n"
    # Even a metadata.db of root's own naming that file: never unlinked.
    os.chown(store / "metadata.db", 0, 0)
    res = snapfs_cli("volume", "rm", "scratch", store=store)
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "root's secret\n"


def test_a_mount_keeps_its_log_and_metadata_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = snapfs_cli("mount", str(mnt), store=store)
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "fr-par-1").is_dir()
        for name in ("mount.log", "metadata.db", MARKER, "lock"):
            assert (store / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        pid = int(os.getxattr(mnt, "user.pid"))
        subprocess.run(["fusermount3", "-u", str(mnt)])
        stop_process(pid)


async def test_a_damaged_store_is_refused_in_process_too(tmp_path: Path) -> None:
    """open_local_service itself refuses (what serve and mount call)."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "packs").mkdir()
    with pytest.raises(StoreUnusable, match="metadata.db is missing"):
        async with open_local_service(store):
            pass
    assert sorted(p.name for p in store.iterdir()) == ["packs"]


def test_a_shadow_no_snapshot_knows_is_kept_reported_and_moved_by_repair(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
    vdir = store / "shadows" / "0b7a9d1e-0000-4000-8000-000000000001"
    vdir.mkdir(parents=True)
    stray = vdir / f"7.4f1c2a3b-0000-4000-8000-000000000002.{boot}"
    stray.write_bytes(b"a clone the metadata lost track of")
    odd = vdir / "notes.txt"
    odd.write_bytes(b"not a shadow's name")

    async def reopen() -> None:
        async with open_local_service(store) as svc:  # exclusive: tidies the shadows
            assert await read_all(svc, snap) == data
    trio.run(reopen)
    assert stray.exists() and odd.exists()
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1 and stray.name in res.stdout and odd.name in res.stdout
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not stray.exists() and not odd.exists()
    moved = sorted(p.name for p in (store / "lost+found").iterdir())
    assert moved == sorted(f"shadow-{vdir.name}-{p.name}" for p in (stray, odd))


def test_a_symlinked_metadata_db_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_store(store, tmp_path)
    real = tmp_path / "elsewhere.db"
    shutil.move(store / "metadata.db", real)
    (store / "metadata.db").symlink_to(real)
    before = tree(store)
    for cmd in (["volume", "list"], ["project", "create", "p"]):
        one_line_refusal(snapfs_cli(*cmd, store=store), "not a regular file")
    assert tree(store) == before


def test_repair_releases_the_map_rows_of_a_deleted_snapshot(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    with sqlite3.connect(store / "metadata.db") as conn:  # what a lost row leaves behind
        conn.execute("INSERT INTO snapshot_chunks (snap, idx, chunk) "
                     "SELECT 999, idx, chunk FROM snapshot_chunks")
        rows = conn.execute("SELECT count(*) FROM snapshot_chunks WHERE snap = 999"
                            ).fetchone()[0]
    conn.close()
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1 and "chunk map rows of a deleted snapshot #999" in res.stdout
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"repair: will release the {rows} chunk map row(s) of deleted snapshot #999" \
        in res.stdout

    async def reread() -> None:
        async with open_local_service(store) as svc:
            assert await read_all(svc, snap) == data  # its chunks were still the other's
    trio.run(reread)
    assert snapfs_cli("fsck", store=store).returncode == 0


def test_a_store_given_by_a_relative_path_records_absolute_volume_paths(
        tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + os.getcwd()}
    res = subprocess.run([sys.executable, "-m", "snapfs", "volume", "create", "v", "--size",
                          "1M", "--store", "rel"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    [vol] = list((tmp_path / "rel" / "volumes").iterdir())
    listed = snapfs_cli("volume", "list", store=tmp_path / "rel").stdout
    assert str(vol) in listed
    assert snapfs_cli("volume", "rm", "v", store=tmp_path / "rel").returncode == 0
    assert not vol.exists()


def test_a_new_pack_never_takes_over_a_file_no_row_knows(tmp_path: Path) -> None:
    """What a metadata.db restored from an older backup meets: pack files above its
    rows. The next capture numbers its pack past them."""
    store = tmp_path / "store"
    make_store(store, tmp_path)
    [first] = sorted((store / "packs").glob("*.pack"))
    stray = store / "packs" / f"{int(first.stem) + 1:08d}.pack"
    stray.write_bytes(random_bytes(8192, seed=5))
    data = random_bytes(2 * MiB, seed=6)
    vol = write_volume(tmp_path / "other.raw", 2 * MiB, [(0, data)])

    async def capture() -> None:
        async with open_local_service(store) as svc:
            snap = await snapshot_of(svc, vol, "next")
            assert await read_all(svc, snap.id) == data
            assert max(svc.index.packs()) > int(stray.stem)
    trio.run(capture)
    assert stray.read_bytes() == random_bytes(8192, seed=5)


def test_a_tail_longer_than_an_interrupted_write_is_kept_until_repair(tmp_path: Path) -> None:
    """A metadata.db restored from a backup records shorter packs than the files: the
    bytes past its committed lengths may be all that is left of newer snapshots."""
    from snapfs.local.recovery import TAIL_LIMIT
    store = tmp_path / "store"
    snap, data = make_store(store, tmp_path)
    [pack] = sorted((store / "packs").glob("*.pack"))
    committed = pack.stat().st_size
    os.truncate(pack, committed + TAIL_LIMIT + 4096)  # sparse: what newer chunks would be

    async def reopen() -> None:
        async with open_local_service(store) as svc:  # exclusive: recovery runs
            assert await read_all(svc, snap) == data
    trio.run(reopen)
    assert pack.stat().st_size == committed + TAIL_LIMIT + 4096
    res = snapfs_cli("fsck", store=store)
    assert res.returncode == 1 and "more than an interrupted write leaves" in res.stdout
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"repair: will truncate pack file {pack.name} to {committed} bytes" in res.stdout
    assert pack.stat().st_size == committed
    # An interrupted write's tail is cut by any exclusive open, as before.
    os.truncate(pack, committed + 8192)
    trio.run(reopen)
    assert pack.stat().st_size == committed


def test_repair_finishes_a_delete_cut_short(tmp_path: Path) -> None:
    from snapfs.local.recovery import DELETING
    store = tmp_path / "store"
    snap, _ = make_store(store, tmp_path)
    kept, kept_data = make_store(store, tmp_path, "kept")

    async def cut_short() -> None:  # what a crash mid-delete leaves: the mark, no release
        async with open_local_service(store) as svc:
            svc.md.mark_deleting(snap, DELETING)
            svc.md.conn.execute("UPDATE snapshots SET owner = 'dead:1:1' WHERE id = ?",
                                (snap,))
    trio.run(cut_short)
    res = snapfs_cli("fsck", "--repair", store=store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"repair: will finish the delete of snapshot {snap}" in res.stdout
    db = sqlite3.connect(store / "metadata.db")
    assert db.execute("SELECT count(*) FROM snapshots WHERE id = ?", (snap,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM free_extents").fetchone() == (0,)
    db.close()

    async def reread() -> None:
        async with open_local_service(store) as svc:
            assert await read_all(svc, kept) == kept_data
    trio.run(reread)


def test_an_immutable_inode_map_mounts_with_numbers_for_this_mount(
        tmp_path: Path, mount_factory: Callable[..., Mount]) -> None:
    """`chattr +i inodes.sqlite` (or a map that cannot be written for another
    reason) refused the mount with 'Operation not permitted (a symlink is
    refused)'. It mounts: the map's numbers are read, new ones last for this
    mount (logged), and the map is left as it was."""
    store = tmp_path / "store"
    make_store(store, tmp_path)
    m = mount_factory(store)
    zone = os.stat(m.path / ZONE).st_ino
    m.stop()
    run("chattr", "+i", store / "inodes.sqlite")
    try:
        before = (store / "inodes.sqlite").read_bytes()
        m = mount_factory(store)
        assert os.stat(m.path / ZONE).st_ino == zone
        fresh = os.stat(m.project / "snapshots").st_ino
        assert fresh > zone and "last only for this mount" in m.log()
        m.stop()
        assert (store / "inodes.sqlite").read_bytes() == before
    finally:
        run("chattr", "-i", store / "inodes.sqlite")
