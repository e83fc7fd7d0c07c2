"""The tree tried as careless users would, through the kernel with real tools: a
name is the project's whichever view takes it, a volume truncated to no volume's
size fails its snapshot, another zone's snapshot is not found by ID, tags/<t>
goes with its last snapshot, image.raw's attributes follow tags as its siblings'
do, a second document written on one open file is a document of its own, and
two mounts of one store racing for a name make one snapshot."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from fixtures_mount import MiB, Mount, gone_soon, random_volume, run, snapfs
from fixtures_store import flip_bits
from test_mount_firsthour import failing, snap, tree

pytestmark = pytest.mark.mount


@pytest.fixture
def two_volumes(mount_factory: Callable[..., Mount], store_with_volume: Path,
                tmp_path: Path) -> Mount:
    random_volume(store_with_volume, tmp_path / "vol2.raw", MiB, "vol2")
    return mount_factory(store_with_volume)


def test_a_name_is_the_projects_whichever_view_takes_it(two_volumes: Mount) -> None:
    m = two_volumes
    run("mkdir", m.volume("vol2") / "g1")
    m.wait_state(m.snapshots() / "g1")
    k9 = snap(m, "k9")
    run("setfattr", "-n", "user.tags", "-v", "t", k9)
    before = tree(m)
    # mkdir in another volume's directory, a rename in a volume's and in a tag's:
    # EEXIST (coreutils' mv words the rename's EEXIST oddly: errno asserted here).
    assert "File exists" in failing("mkdir", m.volume("vol1") / "g1")
    tag = m.project / "tags" / "t"
    for view in (m.volume("vol1"), tag):
        with pytest.raises(OSError) as info:
            os.rename(view / "k9", view / "g1")
        assert info.value.errno == errno.EEXIST, view
    assert tree(m) == before
    assert m.xattr(m.snapshots() / "g1", "id") != m.xattr(k9, "id")
    assert "already exists" in m.log()


def test_a_volume_truncated_to_no_volumes_size_fails_its_snapshot(
        mount_factory: Callable[..., Mount], store_with_volume: Path, tmp_path: Path) -> None:
    vol = random_volume(store_with_volume, tmp_path / "z.raw", MiB, "z")
    m = mount_factory(store_with_volume)
    ok = m.volume("z") / "ok"
    run("mkdir", ok)
    assert m.wait_state(m.snapshots() / "ok") == "available"
    for size in (1000, 0):
        while True:  # the store's read lease on the file may be being broken
            try:
                os.truncate(vol, size)
                break
            except BlockingIOError:
                time.sleep(0.05)
        name = f"z{size}"
        run("mkdir", m.volume("z") / name)
        path = m.snapshots() / name
        assert m.wait_state(path) == "error"
        reason = json.loads((path / "snapshot.json").read_text())["error_reason"]
        assert f"is {size} bytes now" in reason and "multiple of 512" in reason
    # The snapshot taken before is untouched.
    assert m.wait_state(m.snapshots() / "ok") == "available"
    assert os.stat(m.snapshots() / "ok" / "image.raw").st_size == MiB


def test_another_zones_snapshot_is_not_found_by_id(mounted: Mount) -> None:
    s = snap(mounted)
    sid = mounted.xattr(s, "id")
    os.listdir(mounted.snapshots())  # its entry is now cached (by ID)
    other = mounted.path / "fr-par-2" / "default" / "snapshots" / sid
    with pytest.raises(FileNotFoundError):
        os.stat(other)
    with pytest.raises(OSError) as info:
        os.getxattr(other, "user.zone")
    assert info.value.errno == errno.ENOENT
    # ...nor does asking there make this zone forget it.
    assert mounted.xattr(mounted.snapshots() / sid, "id") == sid


def test_a_tag_directory_goes_with_its_last_snapshot(mounted: Mount) -> None:
    s = snap(mounted)
    tags = mounted.project / "tags"
    run("setfattr", "-n", "user.tags", "-v", "tg", s)
    assert (tags / "tg" / "s1").is_dir()  # the kernel now caches tags/tg
    run("setfattr", "-n", "user.tags", "-v", "other", s)
    assert gone_soon(tags / "tg")
    assert (tags / "other" / "s1").is_dir()
    run("rmdir", s)
    assert gone_soon(tags / "other")
    assert os.listdir(tags) == []


def test_image_attributes_follow_tags_as_its_siblings_do(mounted: Mount) -> None:
    s = snap(mounted)
    run("setfattr", "-n", "user.tags", "-v", "p,q", s)
    image, doc = s / "image.raw", s / "snapshot.json"
    assert os.stat(image).st_nlink == 4  # snapshots/, volumes/vol1/, tags/p/, tags/q/
    mtime = os.stat(image).st_mtime_ns
    run("setfattr", "-n", "user.tags", "-v", "", s)
    deadline = time.monotonic() + 1.5  # the attribute timeout is 1 s
    while os.stat(image).st_nlink != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    st, sibling = os.stat(image), os.stat(doc)
    assert (st.st_nlink, st.st_ctime_ns) == (sibling.st_nlink, sibling.st_ctime_ns) \
        and st.st_nlink == 2
    assert st.st_mtime_ns == mtime  # the data's time never moves


def test_a_second_document_on_one_open_file_is_its_own(mounted: Mount) -> None:
    """bash's `exec 9>snapshot.json; echo ... >&9; echo ... >&9`: each echo's dup is
    closed (a flush: the document is applied); the next write lands at the file
    offset after it and is a whole document again, not one behind NUL padding."""
    s = snap(mounted)
    doc = json.loads((s / "snapshot.json").read_text())
    fd = os.open(s / "snapshot.json", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, json.dumps({**doc, "name": "n1"}).encode())
        os.close(os.dup(fd))
        assert mounted.xattr(mounted.snapshots() / "n1", "name") == "n1"
        os.write(fd, json.dumps({**doc, "name": "n2"}).encode())
    finally:
        os.close(fd)
    assert mounted.xattr(mounted.snapshots() / "n2", "name") == "n2"
    assert "not valid JSON" not in mounted.log()


def test_two_mounts_racing_for_one_name_make_one_snapshot(
        mount_factory: Callable[..., Mount], store_with_volume: Path) -> None:
    a, b = mount_factory(store_with_volume), mount_factory(store_with_volume)
    for i in range(8):
        name = f"race{i}"
        procs = [subprocess.Popen(["mkdir", str(m.volume("vol1") / name)],
                                  stderr=subprocess.PIPE, text=True) for m in (a, b)]
        results = [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 1], results  # one made it, the other was told EEXIST
        assert any("File exists" in err for _, err in results), results
    names = os.listdir(a.snapshots())
    assert sorted(names) == [f"race{i}" for i in range(8)], names


def test_two_mounts_racing_to_rename_onto_one_name_rename_one(
        mount_factory: Callable[..., Mount], store_with_volume: Path) -> None:
    """Each mount checks the name in its own listing first; the store checks it
    again under the write lock of the rename, so only one of two renames racing
    from two mounts gets it."""
    a, b = mount_factory(store_with_volume), mount_factory(store_with_volume)
    run("mkdir", a.volume("vol1") / "x0")
    run("mkdir", b.volume("vol1") / "y0")
    for i in range(8):
        name = f"race{i}"
        procs = [subprocess.Popen(["mv", "-T", str(m.snapshots() / old), str(m.snapshots() / name)],
                                  stderr=subprocess.PIPE, text=True)
                 for m, old in ((a, f"x{i}"), (b, f"y{i}"))]
        results = [(p.wait(timeout=60), p.communicate()[1]) for p in procs]
        assert sorted(code for code, _ in results) == [0, 1], results
        assert all("File exists" in err or "cannot overwrite" in err
                   for code, err in results if code), results
        # The one that lost keeps its name; both take the next round's names.
        for m, old, new in ((a, f"x{i}", f"x{i + 1}"), (b, f"y{i}", f"y{i + 1}")):
            src = m.snapshots() / (old if old in os.listdir(m.snapshots()) else name)
            run("mv", "-T", src, m.snapshots() / new)
    assert sorted(os.listdir(a.snapshots())) == ["x8", "y8"]


def test_an_image_on_a_snapfs_mount_is_no_volume(mounted: Mount) -> None:
    """Registered, a capture of it hung the mount for good (its close waited on a
    FLUSH only the mount itself could answer); refused, with one line."""
    s = snap(mounted)
    store = str(mounted.store)
    before = snapfs("volume", "list", "--store", store).stdout
    res = snapfs("volume", "add", "self", s / "image.raw", "--store", store, check=False)
    assert res.returncode != 0
    assert "is on the snapfs mount" in res.stderr and len(res.stderr.splitlines()) == 1
    assert snapfs("volume", "list", "--store", store).stdout == before
    assert os.listdir(mounted.snapshots()) == ["s1"]  # the mount still answers


@pytest.mark.parametrize("kind", ["raw", "compressed"])
def test_a_chunk_a_read_finds_bad_is_marked_and_healed_by_the_next_snapshot(
        mount_factory: Callable[..., Mount], tmp_path: Path, kind: str) -> None:
    """Before, only fsck --repair marked a bad chunk: a read got EIO, and the next
    capture deduplicated onto the bad copy, so the new snapshot read EIO too. Now
    the read marks it, and the next snapshot heals it for both."""
    store = tmp_path / "store"
    vol = tmp_path / "vol.raw"
    random_volume(store, vol, 4 * MiB, "v")
    if kind == "compressed":  # chunk 1 compresses; zstd's frame is checked first
        with open(vol, "r+b") as f:
            f.seek(MiB)
            f.write(b"snapfs compressible line\n" * (MiB // 26) + b"\n" * (MiB % 26))
    m = mount_factory(store, "--page-cache")
    run("mkdir", m.volume("v") / "a")
    assert m.wait_state(m.snapshots() / "a") == "available"
    m.stop()
    db = sqlite3.connect(store / "metadata.db")
    place = db.execute("SELECT c.pack, c.offset, c.raw_length FROM chunks c JOIN "
                       "snapshot_chunks m ON m.chunk = c.id WHERE m.idx = 1").fetchone()
    db.close()
    assert (place[2] is not None) == (kind == "compressed"), place
    flip_bits(store, (int(place[0]), int(place[1])), 77, 0x10)
    m = mount_factory(store, "--page-cache")
    a = m.snapshots() / "a" / "image.raw"
    res = subprocess.run(["dd", f"if={a}", "of=/dev/null", "bs=1M", "skip=1", "count=1"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "Input/output error" in res.stderr, res
    assert "read bad: marked damaged" in m.log()
    run("mkdir", m.volume("v") / "b")
    assert m.wait_state(m.snapshots() / "b") == "available"
    run("cmp", m.snapshots() / "b" / "image.raw", vol)
    m.stop()  # a new mount: the kernel may cache nothing of a's failed read
    m = mount_factory(store, "--page-cache")
    run("cmp", m.snapshots() / "a" / "image.raw", vol)  # healed
    m.stop()
    res = snapfs("fsck", "--store", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_damaged_chunk_is_stored_anew_by_the_next_snapshot_which_heals_the_old(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """A capture deduplicated onto a chunk fsck had found bad: the new snapshot was
    `available` and read EIO, and no snapshot ever replaced the chunk. Marked by
    fsck --repair, it is skipped by deduplication; the next capture stores the
    bytes anew and the chunk's row points at them, so the old snapshot reads right
    again."""
    store = tmp_path / "store"
    vol = random_volume(store, tmp_path / "vol.raw", 4 * MiB, "v")
    m = mount_factory(store, "--page-cache")
    run("mkdir", m.volume("v") / "a")
    assert m.wait_state(m.snapshots() / "a") == "available"
    m.stop()
    db = sqlite3.connect(store / "metadata.db")
    place = db.execute("SELECT c.pack, c.offset FROM chunks c JOIN snapshot_chunks m "
                       "ON m.chunk = c.id WHERE m.idx = 1").fetchone()
    db.close()
    flip_bits(store, (int(place[0]), int(place[1])), 777, 0x10)
    res = snapfs("fsck", "--store", store, check=False)
    assert res.returncode == 1 and "fsck --repair marks it damaged" in res.stdout, res
    res = snapfs("fsck", "--repair", "--store", store, check=False)
    assert "marked 1 chunk(s) damaged" in res.stdout, res.stdout + res.stderr
    m = mount_factory(store, "--page-cache")
    run("mkdir", m.volume("v") / "b")
    assert m.wait_state(m.snapshots() / "b") == "available"
    run("cmp", m.snapshots() / "b" / "image.raw", vol)
    run("cmp", m.snapshots() / "a" / "image.raw", vol)  # healed
    assert "damaged copy replaced" in m.log()
    m.stop()
    res = snapfs("fsck", "--store", store, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_wait_refuses_a_volume_directory_and_a_timeout_that_is_no_number(
        mount_factory: Callable[..., Mount], store_with_volume: Path) -> None:
    """A volume's directory has a user.state too: `wait` printed the volume's
    `available` and exited 0. `--timeout nan` waited for ever."""
    m = mount_factory(store_with_volume)
    res = snapfs("wait", m.volume("vol1"), check=False)
    assert res.returncode == 1 and "is not a snapshot" in res.stderr, res
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1
    s = snap(m, "w1")
    for bad in ("nan", "-1", "inf"):
        res = snapfs("wait", s, "--timeout", bad, check=False)
        assert res.returncode != 0 and "--timeout" in res.stderr, (bad, res)
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr
    assert snapfs("wait", s, "--timeout", "30").stdout.strip() == "available"


def test_metadata_files_made_immutable_are_eio_said_as_the_disks_not_a_bug(
        mount_factory: Callable[..., Mount], store_with_volume: Path) -> None:
    """chattr +i on metadata.db and its -wal/-shm under a live mount: every write
    (mkdir, mv, setfattr) was EIO logged as "failed unexpectedly (bug #N)" with a
    traceback. Still EIO, changing nothing, and the log says it was the files;
    once they are writable again everything works and fsck is clean."""
    m = mount_factory(store_with_volume)
    s = snap(m, "keep")
    files = [p for p in store_with_volume.glob("metadata.db*") if p.is_file()]
    assert len(files) == 3, files
    before = tree(m)
    subprocess.run(["chattr", "+i", *map(str, files)], check=True)
    try:
        assert "Input/output error" in failing("mv", s, m.snapshots() / "renamed")
        assert "Input/output error" in failing("setfattr", "-n", "user.tags", "-v", "x", s)
        assert "Input/output error" in failing("mkdir", m.volume("vol1") / "new")
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], check=True)
    assert tree(m) == before
    log = m.log()
    assert "metadata.db cannot be" in log
    assert "bug" not in log and "Traceback" not in log, log[-3000:]
    run("mv", s, m.snapshots() / "renamed")
    snap(m, "after")
    m.stop()
    res = snapfs("fsck", "--store", store_with_volume)
    assert "clean" in res.stdout or res.returncode == 0, res
