"""Shared mounts keep permissions (issue 13 item 5, snapfs/fs/access.py): with
``-o allow_other`` the kernel checks what the mount reports; image.raw is
readable by whom its volume file was; control files and directories are the
mount owner's to change. Driven as user ``nobody`` through the real mount."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fixtures_mount import Mount, is_mounted, run, snapfs
from fixtures_perms import NOBODY_UID, as_nobody
from fixtures_store import MiB, random_bytes, write_volume
from snapfs.errors import InvalidArgument
from snapfs.fs.access import image_access, parse_image_mode, parse_image_owner
from snapfs.fs.daemon import MountConfig, fuse_options
from snapfs.model import FileAccess, Snapshot


@pytest.fixture
def shared_store(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A store with volume ``private`` (root's, 0600) and ``public`` (root's, 0644)."""
    store = tmp_path / "store"
    data = {}
    for name, mode in (("private", 0o600), ("public", 0o644)):
        data[name] = random_bytes(MiB, seed=len(name))
        vol = write_volume(tmp_path / f"{name}.raw", MiB, [(0, data[name])])
        vol.chmod(mode)
        snapfs("volume", "add", name, vol, "--store", store)
    snapfs("volume", "create", "scratch", "--size", "1M", "--store", store)
    return store, data


@pytest.fixture
def shared_mount(shared_dir: Path) -> Iterator[Callable[..., Mount]]:
    """start(store, *extra) -> a live mount with -o allow_other at a mount point
    every user can reach; all are torn down after."""
    mounts: list[Mount] = []

    def start(store: Path, *extra: str) -> Mount:
        mnt = shared_dir / f"mnt{len(mounts)}"
        mnt.mkdir()
        m = Mount(mnt, store, extra=["-o", "allow_other", *extra])
        mounts.append(m)
        m.start()
        return m
    yield start
    for m in mounts:
        m.stop()
    for m in mounts:
        assert not is_mounted(m.path), f"{m.path} is still mounted"


def snapshot(m: Mount, volume: str, name: str) -> Path:
    run("mkdir", m.volume(volume) / name)
    assert m.wait_state(m.volume(volume) / name) == "available"
    return m.snapshots() / name


def test_allow_other_image_raw_is_readable_by_whom_its_volume_was(
        shared_mount: Callable[..., Mount], shared_store: tuple[Path, dict[str, bytes]]) -> None:
    store, data = shared_store
    m = shared_mount(store)
    priv, pub = snapshot(m, "private", "p"), snapshot(m, "public", "q")
    st = os.stat(priv / "image.raw")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o400)
    assert stat.S_IMODE(os.stat(pub / "image.raw").st_mode) == 0o444
    res = as_nobody("cat", priv / "image.raw")
    assert res.returncode != 0 and "Permission denied" in res.stderr
    # Where the data lies (map.json, changes/) is readable by whom image.raw is.
    for doc in (priv / "map.json", priv / "changes" / "p"):
        st = os.stat(doc)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o400), doc
        res = as_nobody("cat", doc)
        assert res.returncode != 0 and "Permission denied" in res.stderr, doc
    res = as_nobody("cat", pub / "map.json")
    assert res.returncode == 0 and res.stdout == (pub / "map.json").read_text()
    res = as_nobody("sha256sum", pub / "image.raw")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == run("sha256sum", m.volume("public") / "q" / "image.raw"
                                        ).stdout.split()[0]
    assert (priv / "image.raw").read_bytes() == data["private"]  # the owner still reads
    # Directories stay traversable and listable by everyone.
    res = as_nobody("ls", priv.parent)
    assert res.returncode == 0 and res.stdout.split() == ["p", "q"]
    # Control files and directories are the mount owner's to change.
    export_before = (pub / "export").read_bytes()
    json_before = (pub / "snapshot.json").read_bytes()
    for target in (pub / "export", pub / "snapshot.json"):
        res = as_nobody("sh", "-c", f"echo bucket/key > '{target}'")
        assert res.returncode != 0 and "Permission denied" in res.stderr, target
    for cmd in (["mkdir", m.volume("public") / "new"],
                ["rmdir", pub], ["mv", pub, pub.with_name("moved")],
                ["setfattr", "-n", "user.name", "-v", "taken", pub],
                ["touch", m.project / "imports" / "x"]):
        res = as_nobody(*cmd)
        assert res.returncode != 0 and "Permission denied" in res.stderr, (cmd, res.stderr)
    # Nothing changed.
    assert (pub / "export").read_bytes() == export_before
    assert (pub / "snapshot.json").read_bytes() == json_before
    assert sorted(os.listdir(pub.parent)) == ["p", "q"]
    assert os.listdir(m.project / "imports") == []
    # A volume the store made (`volume create`) is the store's alone: 0600, so its
    # snapshots are the mount owner's to read.
    [scratch] = (store / "volumes").iterdir()
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o600
    made = snapshot(m, "scratch", "c")
    assert stat.S_IMODE(os.stat(made / "image.raw").st_mode) == 0o400
    res = as_nobody("cat", made / "image.raw")
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_image_mode_and_owner_options_set_every_image(
        shared_mount: Callable[..., Mount], shared_store: tuple[Path, dict[str, bytes]]) -> None:
    store, data = shared_store
    m = shared_mount(store, "--image-mode", "0440",
                     "--image-owner", f"0:{NOBODY_UID}")
    priv = snapshot(m, "private", "p")
    st = os.stat(priv / "image.raw")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY_UID, 0o440)
    res = as_nobody("sha256sum", priv / "image.raw")  # nobody is in group nogroup
    assert res.returncode == 0, res.stderr
    # Bad values are refused before anything is mounted: one line, exit 1.
    for opt, value in (("--image-mode", "0644"), ("--image-mode", "rw"),
                       ("--image-owner", "0"), ("--image-owner", "nosuchuser:0")):
        res = snapfs("mount", m.path.parent, "--store", store, opt, value, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith(f"snapfs: invalid {opt}:"), res.stderr


def test_allow_other_always_brings_default_permissions(tmp_path: Path) -> None:
    cfg = MountConfig(mountpoint=tmp_path, store=tmp_path, options=["allow_other"])
    assert {"allow_other", "default_permissions"} <= fuse_options(cfg)
    assert "default_permissions" not in fuse_options(MountConfig(tmp_path, tmp_path))


def test_image_access_rules() -> None:
    snap = Snapshot(id="i", name="n", organization="o", project="p", tags=[],
                    volume_type="b_ssd", size=512, state="available", base_volume=None,
                    creation_date="", modification_date="", error_reason=None, zone="z")
    # No access recorded (an import, an older snapshot): the mount owner's, 0400.
    assert image_access(snap, 7, 8, None, None) == (7, 8, stat.S_IFREG | 0o400)
    own = Snapshot(**{**snap.__dict__, "access": FileAccess(1000, 100, 0o754)})
    assert image_access(own, 7, 8, None, None) == (1000, 100, stat.S_IFREG | 0o444)
    assert image_access(own, 7, 8, 0o440, (1, 2)) == (1, 2, stat.S_IFREG | 0o440)
    assert parse_image_mode("440") == 0o440 and parse_image_owner("root:0") == (0, 0)
    for bad in ("0200", "8", "-1"):
        with pytest.raises(InvalidArgument):
            parse_image_mode(bad)


def test_image_owner_outside_uid_t_is_refused_before_mounting(tmp_path: Path) -> None:
    # An id the kernel cannot take (over 32 bits, or (uid_t)-1, chown's "no
    # change") used to mount, then fail every lookup with EIO.
    assert parse_image_owner("4294967294:0") == (2**32 - 2, 0)
    assert parse_image_owner("007:0") == (7, 0)
    mnt, store = tmp_path / "mnt", tmp_path / "store"
    mnt.mkdir()
    try:
        for value in ("99999999999:1", "4294967295:4294967295", "0:4294967295",
                      "1:" + "9" * 5000, "²:0"):
            for args in (("--image-owner", value), ("-o", f"image_owner={value}")):
                res = snapfs("mount", mnt, "--store", store, *args, check=False)
                assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
                assert res.stderr.startswith("snapfs: invalid --image-owner:"), res.stderr
                assert not is_mounted(mnt) and not store.exists()
    finally:
        if is_mounted(mnt):  # (what the old code did)
            run("fusermount", "-u", mnt)
