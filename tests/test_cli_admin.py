"""The store administration CLI, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_store import snapfs_cli, write_volume


def test_volume_add_create_list_rm(tmp_path: Path, store_dir: Path) -> None:
    img = write_volume(tmp_path / "disk.raw", 1 << 20, [(0, b"hello")])
    res = snapfs_cli("volume", "add", "disk", str(img), "--zone", "nl-ams-1", store=store_dir)
    assert res.returncode == 0, res.stderr
    vid = res.stdout.strip()
    res = snapfs_cli("volume", "create", "scratch", "--size", "64M", "--type", "l_ssd",
                     store=store_dir)
    assert res.returncode == 0, res.stderr
    vols = json.loads(snapfs_cli("volume", "list", "--json", store=store_dir, check=True).stdout)
    by_name = {v["name"]: v for v in vols}
    assert by_name["disk"]["id"] == vid
    assert by_name["disk"]["zone"] == "nl-ams-1" and by_name["disk"]["size"] == 1 << 20
    assert by_name["disk"]["path"] == str(img)
    scratch = Path(by_name["scratch"]["path"])
    assert scratch.parent == store_dir / "volumes" and scratch.stat().st_size == 64 << 20
    assert scratch.stat().st_blocks == 0  # sparse
    assert by_name["scratch"]["volume_type"] == "l_ssd"
    assert {"id", "name", "size", "zone", "project", "path"} <= set(by_name["scratch"])
    assert snapfs_cli("volume", "rm", "scratch", store=store_dir).returncode == 0
    assert not scratch.exists()
    assert snapfs_cli("volume", "rm", "disk", store=store_dir).returncode == 0
    assert img.exists()  # a registered file is never deleted
    assert json.loads(snapfs_cli("volume", "list", "--json", store=store_dir).stdout) == []


def test_projects(store_dir: Path) -> None:
    res = snapfs_cli("project", "create", "web", store=store_dir)
    assert res.returncode == 0, res.stderr
    projects = json.loads(snapfs_cli("project", "list", "--json", store=store_dir).stdout)
    assert [p["name"] for p in projects] == ["default", "web"]
    assert projects[1]["id"] == res.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["volume", "add", "x", "/nonexistent/disk.raw"], "does not exist"),
    (["volume", "create", "x", "--size", "12x"], "not a size"),
    (["volume", "create", "x", "--size", "1000"], "multiple of 512"),
    (["volume", "create", "a/b", "--size", "1M"], "invalid name"),
    (["volume", "create", "x", "--size", "1M", "--project", "nope"], "not found"),
    (["volume", "rm", "nope"], "not found"),
    (["project", "create", "default"], "already exists"),
    (["volume", "add"], "required"),
    (["volume", "create", "x", "--size", "99999999T"], "larger than"),
    (["volume", "create", "x", "--size", "1M", "--zone", "mars-1"], "invalid choice"),
])
def test_bad_input_is_one_line_and_changes_nothing(store_dir: Path, args: list[str],
                                                   message: str) -> None:
    # A writing command makes the store; read-only ones (list) refuse a missing one.
    snapfs_cli("volume", "create", "seed", "--size", "1M", store=store_dir, check=True)
    before = snapfs_cli("volume", "list", "--json", store=store_dir, check=True).stdout
    res = snapfs_cli(*args, store=store_dir)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert snapfs_cli("volume", "list", "--json", store=store_dir).stdout == before
    projects = json.loads(snapfs_cli("project", "list", "--json", store=store_dir).stdout)
    assert [p["name"] for p in projects] == ["default"]


def test_every_command_has_help() -> None:
    for args in (["--help"], ["volume", "--help"], ["volume", "add", "--help"],
                 ["volume", "create", "--help"], ["volume", "list", "--help"],
                 ["volume", "rm", "--help"], ["project", "create", "--help"],
                 ["project", "list", "--help"], ["fsck", "--help"]):
        res = snapfs_cli(*args)
        assert res.returncode == 0 and "usage:" in res.stdout, args


def test_store_from_option_env_and_default(tmp_path: Path) -> None:
    opt, env = tmp_path / "opt", tmp_path / "env"
    assert snapfs_cli("project", "create", "p", "--store", str(opt)).returncode == 0
    assert (opt / "metadata.db").exists()
    assert snapfs_cli("project", "create", "p", store=env).returncode == 0
    assert (env / "metadata.db").exists()
    home = tmp_path / "home"
    res = snapfs_cli("project", "create", "p", env={"HOME": str(home), "SNAPFS_STORE": ""})
    assert res.returncode == 0, res.stderr
    default = home / ".local" / "share" / "snapfs"
    assert (default / "metadata.db").exists()
    assert default.stat().st_mode & 0o777 == 0o700


def test_refused_volume_create_leaves_no_file(store_dir: Path) -> None:
    res = snapfs_cli("volume", "create", "x", "--size", "99999999T", store=store_dir)
    assert res.returncode == 1
    assert list((store_dir / "volumes").glob("*")) == []


def test_a_store_that_is_not_a_database_is_one_line(store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / "metadata.db").write_bytes(b"this is not sqlite" * 1000)
    res = snapfs_cli("volume", "list", store=store_dir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "not a usable snapfs store" in res.stderr


def _cli(*args: str | bytes, store: Path) -> subprocess.CompletedProcess[bytes]:
    """As snapfs_cli, in bytes: what the old code printed was not always UTF-8."""
    return subprocess.run([sys.executable, "-m", "snapfs", *args], capture_output=True,
                          timeout=120, env=dict(os.environ, SNAPFS_STORE=str(store)))


def test_volume_list_table_escapes_what_names_and_paths_hold(tmp_path: Path,
                                                            store_dir: Path) -> None:
    # A volume file named with a newline forged a row of the table; escapes and
    # invisible characters went out raw. --json stays exact.
    names = [b"v\nforged  00000000-0000-0000-0000-000000000000  1  fr-par-1  b_ssd  x.raw",
             "rtl\u202eexe.raw".encode(), b"esc\x1b[2J"]
    paths = []
    for i, name in enumerate(names):
        paths.append(write_volume(tmp_path / os.fsdecode(name), 1 << 20, []))
        assert _cli("volume", "add", f"v{i}", bytes(paths[-1]), store=store_dir).returncode == 0
    before = _cli("volume", "list", "--json", store=store_dir)
    table = _cli("volume", "list", store=store_dir)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode("ascii").splitlines()  # all of it escaped to ASCII
    assert len(lines) == 1 + len(names) and lines[0].startswith("NAME")
    assert lines[1].endswith("/v\\nforged  00000000-0000-0000-0000-000000000000  1  "
                             "fr-par-1  b_ssd  x.raw")
    assert lines[2].endswith("/rtl\\u202eexe.raw") and lines[3].endswith("/esc\\x1b[2J")
    vols = json.loads(before.stdout)
    assert sorted(v["path"] for v in vols) == sorted(str(p) for p in paths)
    assert _cli("volume", "list", "--json", store=store_dir).stdout == before.stdout
    # volume repoint prints the new path: one line too.
    res = _cli("volume", "repoint", "v1", bytes(paths[0]), store=store_dir)
    assert res.returncode == 0 and res.stdout.decode("ascii").count("\n") == 1, res


def test_fsck_escapes_the_names_of_stray_files(store_dir: Path) -> None:
    # A stray file under shadows/ is reported by name: one holding a newline forged
    # a report line, undecodable bytes went out raw.
    assert _cli("volume", "create", "v", "--size", "1M", store=store_dir).returncode == 0
    shadows = store_dir / "shadows"
    shadows.mkdir(mode=0o700)
    stray = [b"\xfe", b"x\nproblem: forged"]
    for name in stray:
        (shadows / os.fsdecode(name)).touch()
    res = _cli("fsck", store=store_dir)
    assert res.returncode == 1, res.stderr
    lines = res.stdout.decode("ascii").splitlines()
    assert lines[:2] == [
        "problem: shadows/x\\nproblem: forged: no snapshot of the metadata is its "
        "(fsck --repair moves it to lost+found)",
        "problem: shadows/\\udcfe: no snapshot of the metadata is its "
        "(fsck --repair moves it to lost+found)"]
    assert len(lines) == 3 and lines[2].endswith("checked: 2 problem(s)")
    assert sorted(os.listdir(bytes(shadows))) == sorted(stray)  # fsck changes nothing
    res = _cli("fsck", "--repair", store=store_dir)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode("ascii").splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["repair:"] * 3 + ["0"]
    assert "shadows/x\\nproblem: forged (" in lines[0] and "shadows/\\udcfe (" in lines[1]
    # Moved under their own names: only what is printed is escaped.
    assert sorted(os.listdir(bytes(store_dir / "lost+found"))) == \
        sorted(b"shadow-" + name for name in stray)
