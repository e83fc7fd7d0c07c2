"""The naming and tag rules through the real mount (issue 13): bad names given by
mkdir, mv, setfattr and imports/ (python os calls with bytes paths, in a
subprocess) get their errno and change nothing; names and tags stored before the
rules are listed by ls under escaped labels; links are EPERM; mount.log holds one
escaped line per refusal, no object repr, no traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from fixtures_mount import ZONE, Mount, run
from fixtures_store import wait_state
from snapfs.local import open_local_service

pytestmark = pytest.mark.mount

#: Does one os call with the given bytes arguments; prints its errno (0: done).
PROBE = """
import os, sys
op, args = sys.argv[1], [os.fsencode(a) for a in sys.argv[2:]]
bad = bytes.fromhex(os.environ["BAD"])
args = [a.replace(b"@BAD@", bad) for a in args]
try:
    if op == "mkdir":
        os.mkdir(args[0])
    elif op == "rename":
        os.rename(args[0], args[1])
    elif op == "setxattr":
        os.setxattr(args[0], args[1], args[2])
    elif op == "create":
        os.close(os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644))
    elif op == "symlink":
        os.symlink(args[1], args[0])
    elif op == "mkfifo":
        os.mkfifo(args[0])
    elif op == "link":
        os.link(args[0], args[1])
    elif op == "lookup":
        os.stat(args[0])
    print(0)
except OSError as exc:
    print(exc.errno)
"""


def probe(op: str, *args: str | Path, bad: bytes = b"") -> int:
    res = subprocess.run([sys.executable, "-c", PROBE, op, *map(str, args)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BAD": bad.hex()})
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def state(m: Mount) -> dict[str, Any]:
    """What a refusal must leave alone: every listing, and each snapshot's object."""
    out: dict[str, Any] = {d: sorted(os.listdir(m.project / d))
                           for d in ("snapshots", "tags", "imports")}
    out["volume"] = sorted(os.listdir(m.volume("vol1")))
    for s in out["snapshots"]:
        out[s] = (m.snapshots() / s / "snapshot.json").read_text()
    return out


@pytest.fixture
def one_snapshot(mount_factory: Callable[..., Mount], store_with_volume: Path) -> Mount:
    m = mount_factory(store_with_volume)
    run("mkdir", m.volume("vol1") / "keep")
    assert m.wait_state(m.snapshots() / "keep") == "available"
    return m


#: Names every way of naming refuses with EINVAL.
BAD_NAMES = [b"new\nline", b"tilde~x", b"ctl\x01", b"del\x7f", "c1\x85".encode(),
             b"bad\xffutf8", b"6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01"]


def test_bad_names_through_the_kernel(one_snapshot: Mount) -> None:
    m = one_snapshot
    before = state(m)
    target = b"@BAD@"
    for bad in BAD_NAMES:
        where = f"name {bad!r}"
        assert probe("mkdir", m.volume("vol1") / "@BAD@", bad=bad) == errno.EINVAL, where
        assert probe("rename", m.snapshots() / "keep", m.snapshots() / "@BAD@",
                     bad=bad) == errno.EINVAL, where
        assert probe("create", m.project / "imports" / "@BAD@", bad=bad) == errno.EINVAL, \
            where
        assert probe("setxattr", m.snapshots() / "keep", "user.name", target.decode(),
                     bad=bad) == errno.EINVAL, where
        assert probe("lookup", m.snapshots() / "@BAD@", bad=bad) == errno.ENOENT, where
    # FUSE passes names over 255 bytes on to the filesystem: ENAMETOOLONG, as
    # ext4 answers, wherever the name is a path's (a user.name value: EINVAL).
    long = b"x" * 256
    assert probe("mkdir", m.volume("vol1") / "@BAD@", bad=long) == errno.ENAMETOOLONG
    assert probe("rename", m.snapshots() / "keep", m.snapshots() / "@BAD@",
                 bad=long) == errno.ENAMETOOLONG
    assert probe("create", m.project / "imports" / "@BAD@", bad=long) == errno.ENAMETOOLONG
    assert probe("lookup", m.snapshots() / "@BAD@", bad=long) == errno.ENAMETOOLONG
    assert probe("setxattr", m.snapshots() / "keep", "user.name", target.decode(),
                 bad=long) == errno.EINVAL
    for bad_tags in (b"x" * 5000, b".", b"a\nb", b"a/b", b",".join(b"t%d" % i
                                                                   for i in range(65))):
        assert probe("setxattr", m.snapshots() / "keep", "user.tags", "@BAD@",
                     bad=bad_tags) == errno.EINVAL, bad_tags[:20]
    assert state(m) == before
    log = m.log()
    assert "Traceback" not in log and "object at 0x" not in log
    refusals = [line for line in log.splitlines() if "EINVAL" in line]
    assert any("new\\nline" in line for line in refusals)
    assert not any(line.startswith("line") for line in log.splitlines())


def test_duplicate_tags_are_dropped(one_snapshot: Mount) -> None:
    keep = one_snapshot.snapshots() / "keep"
    os.setxattr(keep, "user.tags", b"b,a,b,a")
    assert os.getxattr(keep, "user.tags") == b"b,a"
    assert sorted(os.listdir(one_snapshot.project / "tags")) == ["a", "b"]


def test_links_and_special_files_are_eperm(one_snapshot: Mount) -> None:
    m = one_snapshot
    before = state(m)
    assert probe("symlink", m.volume("vol1") / "l", "/etc/shadow") == errno.EPERM
    assert probe("symlink", m.project / "imports" / "l", "/etc/shadow") == errno.EPERM
    assert probe("mkfifo", m.volume("vol1") / "f") == errno.EPERM
    assert probe("link", m.snapshots() / "keep" / "snapshot.json",
                 m.volume("vol1") / "h") == errno.EPERM
    assert state(m) == before
    assert m.log().count("EPERM") >= 4


async def _stored_before_the_rules(store: Path) -> dict[str, str]:
    """Snapshots whose name and tags an older snapfs (or another client) stored."""
    ids = {}
    async with open_local_service(store) as svc:
        vol = (await svc.list_all_volumes())[0]
        for name in ("plain", "odd"):
            snap = await svc.create_snapshot(ZONE, name=name, volume_id=vol.id)
            await wait_state(svc, snap.id)
            ids[name] = snap.id
        svc.md.update_snapshot(ids["odd"], name=f"line\nbreak/{ids['plain']}",
                               tags=["ok", "x" * 5000, "y" * 65000, ".", "new\nline"])
    return ids


def test_stored_names_and_tags_are_listed_by_ls(mount_factory: Callable[..., Mount],
                                                store_with_volume: Path) -> None:
    ids = trio.run(_stored_before_the_rules, store_with_volume)
    m = mount_factory(store_with_volume)
    entries = run("ls", "-1", "--quoting-style=literal", m.snapshots()).stdout.splitlines()
    label = f"line\\x0abreak\\x2f{ids['plain']}~{ids['odd'][:8]}"
    assert sorted(entries) == sorted(["plain", label])
    assert json.loads((m.snapshots() / label / "snapshot.json").read_text())["id"] == ids["odd"]
    assert os.getxattr(m.snapshots() / ids["odd"], "user.id").decode() == ids["odd"]
    assert os.getxattr(m.snapshots() / ids["plain"], "user.id").decode() == ids["plain"]
    tags = run("ls", "-1A", "--quoting-style=literal", m.project / "tags").stdout.splitlines()
    assert len(tags) == 5 and "ok" in tags
    for tag in tags:
        assert len(tag.encode()) <= 255
        assert os.listdir(m.project / "tags" / tag) == [label]
