"""The CLI's manners (issue 18): global options anywhere, --version, usage on a bare
``snapfs``, help for every argument, one clear line for each mistake a new user makes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_mount import snapfs
from snapfs import __version__
from snapfs.cli import _commands, build_parser, normalize_argv
from snapfs.errors import InvalidArgument
from snapfs.fs.mountopts import apply_mount_options


def one_line_error(res: "object", *needles: str) -> str:
    err = res.stderr  # type: ignore[attr-defined]
    assert res.returncode != 0, err  # type: ignore[attr-defined]
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return str(err)


def test_store_option_before_or_after_the_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    made = snapfs("--store", store, "project", "create", "web").stdout.strip()
    for argv in (["--store", str(store), "project", "list", "--json"],
                 ["project", "list", "--json", "--store", str(store)],
                 [f"--store={store}", "project", "list", "--json"]):
        assert made in {p["id"] for p in json.loads(snapfs(*argv).stdout)}, argv
    # After the command wins: the one nearest to what it applies to.
    other = tmp_path / "other"
    snapfs("--store", other, "project", "create", "db", "--store", store)
    names = {p["name"] for p in json.loads(snapfs("project", "list", "--json",
                                                  "--store", store).stdout)}
    assert "db" in names and not other.exists()


def test_version_and_usage_on_a_bare_snapfs() -> None:
    assert snapfs("--version").stdout.strip() == f"snapfs {__version__}"
    res = snapfs(check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("usage: snapfs") and "Traceback" not in res.stderr
    for command in ("volume", "project", "mount", "umount", "wait", "serve", "fsck"):
        assert command in res.stderr


def _parsers(parser: argparse.ArgumentParser, path: str = "snapfs"
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _parsers(sub, f"{path} {name}")
    return out


def test_every_argument_of_every_command_has_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {action.dest}")
    assert missing == []
    # And argparse shows it: the examples.
    out = snapfs("volume", "add", "--help").stdout
    assert "raw image file or block device" in out and "the volume's name" in out
    assert "zone" in snapfs("volume", "rm", "--help").stdout.split("--zone", 2)[-1]
    assert "every zone" in snapfs("project", "create", "--help").stdout


def test_negative_or_malformed_size_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snapfs("--store", store, "project", "create", "p")
    before = sorted(os.listdir(store))
    for size in ("-1G", "-5", "ten"):
        res = snapfs("volume", "create", "x", "--size", size, "--store", store, check=False)
        one_line_error(res, "invalid size", repr(size))
    assert sorted(os.listdir(store)) == before
    assert json.loads(snapfs("volume", "list", "--json", "--store", store).stdout) == []


def test_mount_on_a_missing_mountpoint_says_so_and_the_fix(tmp_path: Path) -> None:
    mnt = tmp_path / "no" / "such"
    res = snapfs("mount", mnt, "--store", tmp_path / "store", check=False)
    one_line_error(res, f"{mnt} does not exist", f"mkdir -p {mnt}")
    assert not (tmp_path / "no").exists() and not (tmp_path / "store").exists()


def test_wait_on_a_missing_snapshot_says_so(tmp_path: Path) -> None:
    res = snapfs("wait", tmp_path / "gone", check=False)
    one_line_error(res, "no such snapshot", str(tmp_path / "gone"))
    # A path that is there but no snapshot: said so, without an errno's text
    # ("No data available" was all a new user got).
    res = snapfs("wait", tmp_path, check=False)
    err = one_line_error(res, f"{tmp_path} is not a snapshot (or an import) in a snapfs mount")
    assert "No data available" not in err and "not supported" not in err


def test_mount_helper_form_becomes_mount() -> None:
    commands = _commands(build_parser())
    assert normalize_argv(["/srv/store", "/mnt/snap", "-o", "rw,page_cache"], commands) == \
        ["mount", "/mnt/snap", "--store", "/srv/store", "-o", "rw,page_cache"]
    # Commands, and words that are not paths, stay what they were (a typo is an error).
    assert normalize_argv(["volume", "list"], commands) == ["volume", "list"]
    assert normalize_argv(["volme", "list"], commands) == ["volme", "list"]
    assert normalize_argv(["volume", "create", "x", "--size", "-1G"], commands) == \
        ["volume", "create", "x", "--size=-1G"]


def _mount_args(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["mount", "/mnt", *[a for o in options
                                                         for a in ("-o", o)]])


def test_every_mount_flag_has_an_o_spelling() -> None:
    args = _mount_args("backend=scaleway,page_cache,allow_other,readahead=8",
                       "s3_endpoint=http://127.0.0.1:1,image_mode=0440,image-owner=1:2",
                       "listen=127.0.0.1:8080,zones=nl-ams-1,profile=p,staging_bucket=b",
                       "debug,foreground,store=/srv/s",
                       "noauto,_netdev,nofail,x-systemd.automount,x-systemd.idle-timeout=60,"
                       "rw,nosuid,nodev,defaults,comment=x")
    apply_mount_options(args)
    assert args.options == ["allow_other"]
    assert (args.backend, args.direct_io, args.readahead) == ("scaleway", False, 8)
    assert (args.s3_endpoint, args.image_mode, args.image_owner) == \
        ("http://127.0.0.1:1", "0440", "1:2")
    assert (args.listen, args.zones, args.profile, args.staging_bucket) == \
        ("127.0.0.1:8080", "nl-ams-1", "p", "b")
    assert args.debug and args.foreground and args.store == "/srv/s"
    # Every long flag of `snapfs mount` is covered by an -o spelling.
    mount = dict(_parsers(build_parser()))["snapfs mount"]
    flags = {o[2:].replace("-", "_") for a in mount._actions for o in a.option_strings
             if o.startswith("--") and o != "--help"}
    from snapfs.fs.mountopts import FLAGS, VALUED
    assert flags <= set(FLAGS) | set(VALUED)
    for bad in ("bogus", "backend=nope", "readahead=x", "backend=", "suid", "dev"):
        with pytest.raises(InvalidArgument):
            apply_mount_options(_mount_args(bad))


def test_unknown_mount_option_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    res = snapfs(tmp_path / "store", tmp_path / "mnt", "-o", "bogus", check=False)
    one_line_error(res, "unsupported mount option 'bogus'")
    # readahead=N maps to the retired --readahead: said so in one line, not listed
    # among the spellings in the README or the help.
    res = snapfs(tmp_path / "store", tmp_path / "mnt", "-o", "readahead=4", check=False)
    one_line_error(res, "--readahead", "retired")
    assert not (tmp_path / "store").exists()
    assert "readahead=" not in snapfs("mount", "--help").stdout
    assert "`readahead=N`" not in (Path(__file__).parent.parent / "README.md").read_text()


def test_a_command_that_makes_a_new_store_says_so(tmp_path: Path) -> None:
    """A mistyped --store is seen at once: the command that made the store says so
    on stderr (stdout stays the answer); a store that was there is not mentioned."""
    store = tmp_path / "typo"
    res = snapfs("project", "create", "web", "--store", store)
    assert res.stderr == f"snapfs: made a new store in {store}\n"
    assert res.stdout.strip() in {p["id"] for p in json.loads(
        snapfs("project", "list", "--json", "--store", store).stdout)}
    assert snapfs("project", "create", "db", "--store", store).stderr == ""
    # A refused command leaves no store behind, in a new directory or an empty one,
    # nor the parents it made for it (as `rmdir -p`, down to what was there).
    (tmp_path / "empty").mkdir()
    (tmp_path / "kept").mkdir()
    for where in (tmp_path / "missing", tmp_path / "empty", tmp_path / "deep" / "er" / "s",
                  tmp_path / "kept" / "new" / "s"):
        res = snapfs("volume", "add", "v", tmp_path / "no-such.raw", "--store", where,
                     check=False)
        assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "made a new store" not in res.stderr
    assert not (tmp_path / "missing").exists() and not (tmp_path / "deep").exists()
    assert list((tmp_path / "empty").iterdir()) == []
    assert list((tmp_path / "kept").iterdir()) == []
    # A store that was there stays, whatever is refused.
    snapfs("volume", "add", "v", tmp_path / "no-such.raw", "--store", store, check=False)
    assert (store / "metadata.db").exists()
    # The mount makes one too, and says so once it is live.
    (tmp_path / "mnt").mkdir()
    other = tmp_path / "other"
    res = snapfs("mount", tmp_path / "mnt", "--store", other)
    try:
        assert res.stderr == f"snapfs: made a new store in {other}\n"
    finally:
        snapfs("umount", tmp_path / "mnt")


def test_a_mount_refused_after_its_fork_leaves_no_new_store(tmp_path: Path) -> None:
    """--listen's port is taken: the daemon finds out after the fork, once the store
    and its mount.log were made. The reason is printed; a store made for this mount
    goes again, log and all, and a store that was there stays as it was."""
    (tmp_path / "mnt").mkdir()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    listen = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        new = tmp_path / "made" / "for" / "it"
        res = snapfs("mount", tmp_path / "mnt", "--store", new, "--listen", listen,
                     "--no-auth", check=False)
        one_line_error(res, "Address already in use")
        assert not (tmp_path / "made").exists()
        old = tmp_path / "old"
        snapfs("project", "create", "web", "--store", old)
        before = sorted(p.name for p in old.iterdir())
        res = snapfs("mount", tmp_path / "mnt", "--store", old, "--listen", listen,
                     "--no-auth", check=False)
        one_line_error(res, "Address already in use")
        assert sorted(p.name for p in old.iterdir()) == sorted({*before, "mount.log"})
        assert "web" in snapfs("project", "list", "--store", old).stdout
    finally:
        taken.close()


#: `python -m snapfs`, saying on stderr ('.') once the interpreter is up and the
#: package found: Ctrl-C during Python's own start (its site module, the venv's
#: .pth files, runpy looking for the package) comes before any code of ours can
#: catch it. -S: no site, its directories given by PYTHONPATH instead.
_MARKED_START = ("import os, runpy, sys, snapfs; os.write(2, b'.'); sys.argv[0] = 'snapfs'; "
                 "runpy.run_module('snapfs', run_name='__main__', alter_sys=True)")


def _files(store: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in store.rglob("*") if p.is_file())


def test_ctrl_c_while_the_cli_loads_is_one_line_and_130(tmp_path: Path) -> None:
    # The command modules were imported (build_parser) outside main's `except
    # KeyboardInterrupt`, the package's version lookup before main at all: an early
    # Ctrl-C printed a traceback.
    store = tmp_path / "store"
    snapfs("volume", "create", "v", "--size", "1M", "--store", store)
    before = _files(store)
    path = os.pathsep.join([str(Path(__file__).parents[1]),
                            *[p for p in sys.path if p.endswith("site-packages")]])
    for delay in (0.005, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5) * 2:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _MARKED_START, "fsck",
                                 "--store", str(store)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=path))
        assert proc.stderr is not None and proc.stderr.read(1) == b"."
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, (delay, err.decode(errors="replace"))
        if proc.returncode == 0:  # it finished first
            assert out.endswith(b"checked: clean\n") and err == b"", (delay, out, err)
        else:
            # -SIGINT: the interpreter ended itself by the signal (what a shell shows
            # as 130 too), after we caught it or once our work was done.
            assert proc.returncode in (130, -signal.SIGINT), (delay, proc.returncode, err)
            assert err in (b"snapfs: interrupted\n", b""), (delay, err)
            assert err or proc.returncode == -signal.SIGINT
        assert _files(store) == before  # fsck changes nothing, interrupted or not
