"""The CLI applies the one naming rule (issue 13): a bad name for a project or a
volume is one line on stderr, exit status 1, and nothing changed in the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_store import snapfs_cli, write_volume

BAD_NAMES: list[bytes] = [
    b"a/b", b"a~b", b"new\nline", b"tab\tname", b"del\x7f", b".", b"..", b"x" * 256,
    b"6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01", b"bad\xffutf8", "c1\x85".encode(),
]


def _run(*args: bytes | str, store: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "snapfs", *args], capture_output=True,
                          timeout=120, env=dict(os.environ, SNAPFS_STORE=str(store)))


def _state(store: Path) -> tuple[str, str]:
    return (snapfs_cli("project", "list", "--json", store=store, check=True).stdout,
            snapfs_cli("volume", "list", "--json", store=store, check=True).stdout)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_one_line_and_change_nothing(tmp_path: Path, store_dir: Path,
                                                   name: bytes) -> None:
    img = write_volume(tmp_path / "disk.raw", 1 << 20, [(0, b"hello")])
    snapfs_cli("project", "create", "seed", store=store_dir, check=True)  # the store exists
    before = _state(store_dir)
    for args in ([b"project", b"create", name], [b"volume", b"add", name, str(img)],
                 [b"volume", b"create", name, b"--size", b"1M"]):
        res = _run(*args, store=store_dir)
        err = res.stderr.decode("utf-8", "replace")
        assert res.returncode == 1, (args, err)
        assert err.startswith("snapfs: invalid name:") and err.count("\n") == 1, err
        assert "Traceback" not in err and res.stdout == b""
    assert _state(store_dir) == before
    assert not (store_dir / "volumes").exists() or not any((store_dir / "volumes").iterdir())


@pytest.mark.parametrize("ref", [b"\xff", b"disk\xff"], ids=repr)
def test_a_volume_named_by_undecodable_bytes_is_not_found_in_one_line(
        tmp_path: Path, store_dir: Path, ref: bytes) -> None:
    """`volume rm` and `volume repoint` printed a traceback (the name reached SQLite,
    which cannot take undecodable bytes): no volume has such a name."""
    img = write_volume(tmp_path / "disk.raw", 1 << 20, [(0, b"hello")])
    snapfs_cli("volume", "add", "disk", str(img), store=store_dir, check=True)
    before = _state(store_dir)
    for args in ([b"volume", b"rm", ref], [b"volume", b"repoint", ref, str(img)]):
        res = _run(*args, store=store_dir)
        err = res.stderr.decode("utf-8", "replace")
        assert res.returncode == 1, (args, err)
        assert "not found" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert _state(store_dir) == before


def test_undecodable_text_asked_of_the_database_is_an_invalid_argument(tmp_path: Path) -> None:
    """The store's connections answer a parameter SQLite cannot take (lone
    surrogates: undecodable bytes) with the one table's InvalidArgument, not an
    unexpected UnicodeEncodeError, whichever query it reaches."""
    import sqlite3

    from snapfs import sqlfull
    from snapfs.errors import InvalidArgument

    conn = sqlite3.connect(tmp_path / "t.db", factory=sqlfull.Connection)
    conn.execute("CREATE TABLE t (name TEXT)")
    with pytest.raises(InvalidArgument, match="valid UTF-8"):
        conn.execute("SELECT 1 FROM t WHERE name = ?", ("bad\udcff",))
    with pytest.raises(InvalidArgument, match="valid UTF-8"):
        conn.executemany("INSERT INTO t VALUES (?)", [("ok",), ("bad\udcff",)])
    conn.close()
