"""Store administration commands of the local backend: volume, project, fsck,
compression."""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from .backends import BackendSettings, open_backend
from .storeoptions import add_store_option, store_path
from .errors import InvalidArgument, SnapfsError
from .logtext import esc, escape_controls
from .model import DEFAULT_ZONE, VOLUME_TYPES, ZONES

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4096', '512M', '2G', '1TiB', '10GB' -> bytes (binary units, like truncate -s)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidArgument("size", f"{text!r} is not a size like 4096, 512M or 2G")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _run(args: argparse.Namespace, fn: Callable[[Any], Awaitable[int | None]],
         readonly: bool = False) -> int:
    """``readonly``: a command that only reads opens the store without changing
    any file in it (no recovery, no migration, nothing created)."""
    # The local store (the commands are its administration), without Object Storage.
    settings = BackendSettings(store=store_path(args), objects=False, resume=False,
                               readonly=readonly)

    async def main() -> int | None:
        async with open_backend(settings) as svc:
            return await fn(svc)
    store = store_path(args)
    existed, found = is_store(store), existing_part(store)
    code = 1
    try:
        code = int(trio.run(main) or 0)
        if code == 0:
            say_if_new(store, existed)
        return code
    except sqlite3.DatabaseError as exc:  # the store changed under a reader, a bad disk
        raise SnapfsError(f"{store / 'metadata.db'}: {exc}") from None
    finally:
        if code != 0 and not existed:
            discard_new_store(store, found)


#: What a new store holds before anything is put in it (local/store.py).
_SKELETON = {"lock", "metadata.db", "metadata.db-wal", "metadata.db-shm", "snapfs-store",
             "packs", "shadows", "volumes"}


def existing_part(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest ancestor that does: what a
    command found before it made any directory (see discard_new_store)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def discard_new_store(store: Path, found: Path, also: tuple[str, ...] = ()) -> None:
    """Undo the store a refused command made (a mistyped --store then leaves
    nothing behind) -- only while it holds nothing but its empty skeleton (and
    the files named in ``also``), with no volume or snapshot row; its directory
    too if the command made it, and the parents it made (``found``: what
    existed of the path before, from existing_part), each only while empty."""
    if not is_store(store):
        return
    try:
        conn = sqlite3.connect(f"file:{store / 'metadata.db'}?mode=ro", uri=True)
        try:
            rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                       for t in ("volumes", "snapshots"))
        finally:
            conn.close()  # before the listing: reading a WAL database makes its -shm
        names = set(os.listdir(store))
        if rows or not names <= _SKELETON | set(also) or any(
                os.listdir(store / d) for d in ("packs", "shadows", "volumes") if d in names):
            return
        for name in names:
            path = store / name
            os.rmdir(path) if path.is_dir() else os.unlink(path)
        if found == store:
            return
        os.rmdir(store)
        for parent in store.parents:  # as `rmdir -p`, down to what was there
            if parent == found or found not in parent.parents:
                break
            os.rmdir(parent)
    except (OSError, sqlite3.Error):
        return  # left as it is: never more than a refused command's empty store


def is_store(store: Path) -> bool:
    """Whether ``store`` holds a store already (its marker; see local/store.py)."""
    from .local.store import MARKER
    return os.path.lexists(store / MARKER)


def say_if_new(store: Path, existed: bool) -> None:
    """A command that made a new store says so on stderr once it succeeded (as
    `git init` does): a mistyped --store shows at once, not as an empty list later.
    (A refusal stays its one line: this is not reached.)"""
    if not existed and is_store(store):
        print(f"snapfs: made a new store in {esc(str(store), limit=None)}", file=sys.stderr)


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    # Cells escaped whole: a name or path holding a newline would forge rows, and
    # undecodable bytes (lone surrogates) could not be printed at all.
    cells = [[esc(str(c), limit=None) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _volume_add(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        v = await svc.add_volume(args.name, args.path, zone=args.zone, project=args.project,
                                 volume_type=args.type)
        print(v.id)
    return _run(args, go)


def _volume_repoint(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        v = await svc.repoint_volume(args.name, args.path, zone=args.zone)
        print(esc(v.path, limit=None))  # one line, whatever the file's name holds
    return _run(args, go)


def _volume_create(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        v = await svc.create_volume(args.name, parse_size(args.size), zone=args.zone,
                                    project=args.project, volume_type=args.type)
        print(v.id)
    return _run(args, go)


def _volume_list(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        vols = await svc.list_all_volumes()
        if args.json:
            json.dump([v.to_api() for v in vols], sys.stdout, indent=2)
            print()
        else:
            _print_table([[v.name, v.id, str(v.size), v.zone, v.volume_type, v.path or ""]
                          for v in vols], ["NAME", "ID", "SIZE", "ZONE", "TYPE", "PATH"])
    return _run(args, go, readonly=True)


def _volume_rm(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        await svc.remove_volume(args.name, zone=args.zone)
    return _run(args, go)


def _project_create(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        print((await svc.create_project(args.name)).id)
    return _run(args, go)


def _project_list(args: argparse.Namespace) -> int:
    async def go(svc: Any) -> None:
        projects = await svc.list_projects()
        if args.json:
            json.dump([p.to_api() for p in projects], sys.stdout, indent=2)
            print()
        else:
            _print_table([[p.name, p.id] for p in projects], ["NAME", "ID"])
    return _run(args, go, readonly=True)


def _fsck(args: argparse.Namespace) -> int:
    from .local.fsck import fsck, print_report

    def say(line: str) -> None:
        # (names are escaped where the lines are made; this is the last defence)
        print(escape_controls(line), flush=True)
    if args.repair:
        from .local.fsck import run_repair
        return int(trio.run(run_repair, store_path(args), say))

    async def go(svc: Any) -> int:
        return print_report(await fsck(svc), say)
    return _run(args, go, readonly=True)


def _compression(args: argparse.Namespace) -> int:
    from .local.compression import DEFAULT_LEVEL, MAX_LEVEL, set_store_level, store_level

    if args.level is not None and not 0 <= args.level <= MAX_LEVEL:
        raise InvalidArgument("level", f"{args.level} is not a zstd level from 0 (off) "
                              f"to {MAX_LEVEL}")

    async def go(svc: Any) -> None:
        if args.level is not None:
            set_store_level(svc.md, args.level)
        level = store_level(svc.md.conn)
        print(f"zstd level {level}" + (" (off: new chunks are stored raw)" if level == 0
                                       else " (the default)" if level == DEFAULT_LEVEL
                                       else ""))
    return _run(args, go, readonly=args.level is None)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    vol = sub.add_parser("volume", help="manage local volumes")
    vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="COMMAND")

    def placement(p: argparse.ArgumentParser) -> None:
        add_store_option(p)
        p.add_argument("--zone", default=DEFAULT_ZONE, choices=ZONES, metavar="ZONE",
                       help=f"zone (default {DEFAULT_ZONE})")
        p.add_argument("--project", default=None, help="project name or ID (default: default)")
        p.add_argument("--type", default="b_ssd", choices=VOLUME_TYPES, help="volume type")

    p = vsub.add_parser("add", help="register an existing raw image file or block device")
    p.add_argument("name", help="the volume's name")
    p.add_argument("path", help="the raw image file or block device it is")
    placement(p)
    p.set_defaults(func=_volume_add)

    p = vsub.add_parser("repoint", help="make a volume another file or device, on purpose "
                                        "(after its file was replaced or moved)")
    p.add_argument("name", help="volume name or ID")
    p.add_argument("path", help="the file or block device it is from now on")
    p.add_argument("--zone", default=None, choices=ZONES, metavar="ZONE",
                   help="the volume's zone (default: wherever the name is)")
    add_store_option(p)
    p.set_defaults(func=_volume_repoint)

    p = vsub.add_parser("create", help="make a new sparse raw volume file inside the store")
    p.add_argument("name", help="the volume's name")
    p.add_argument("--size", required=True, help="size, e.g. 10G")
    placement(p)
    p.set_defaults(func=_volume_create)

    p = vsub.add_parser("list", help="list volumes")
    p.add_argument("--json", action="store_true", help="print a JSON list of volume objects")
    add_store_option(p)
    p.set_defaults(func=_volume_list)

    p = vsub.add_parser("rm", help="forget a volume (a file made by 'create' is deleted)")
    p.add_argument("name", help="volume name or ID")
    p.add_argument("--zone", default=None, choices=ZONES, metavar="ZONE",
                   help="the volume's zone (default: wherever the name is)")
    add_store_option(p)
    p.set_defaults(func=_volume_rm)

    proj = sub.add_parser("project", help="manage projects")
    psub = proj.add_subparsers(dest="project_command", required=True, metavar="COMMAND")
    p = psub.add_parser("create", help="create a project (in every zone)",
                        description="Create a project. As in Scaleway, a project belongs "
                        "to the organization, not to a zone: it appears under every zone "
                        "of the mount.")
    p.add_argument("name", help="the project's name")
    add_store_option(p)
    p.set_defaults(func=_project_create)
    p = psub.add_parser("list", help="list projects")
    p.add_argument("--json", action="store_true", help="print a JSON list of project objects")
    add_store_option(p)
    p.set_defaults(func=_project_list)

    p = sub.add_parser("fsck", help="verify every chunk and reference of the store",
                       description="Verify every chunk and reference; changes nothing. "
                       "With --repair (no mount or serve may have the store open): print "
                       "what it will do, then do what is safe -- truncate uncommitted pack "
                       "tails, punch queued extents, drop empty packs, release the maps of "
                       "deleted snapshots, move files no metadata knows into lost+found/.")
    p.add_argument("--repair", action="store_true",
                   help="do the safe repairs, after printing them")
    add_store_option(p)
    p.set_defaults(func=_fsck)

    p = sub.add_parser("compression", help="show or set the store's zstd level",
                       description="Chunks stored from now on are compressed with zstd at "
                       "this level where that shrinks them to 7/8 or less, else stored "
                       "raw; 0 stores every new chunk raw. Chunks already stored keep "
                       "their form. Without LEVEL: print the level.")
    p.add_argument("level", type=int, nargs="?", default=None, metavar="LEVEL",
                   help="0 (off) to 19")
    add_store_option(p)
    p.set_defaults(func=_compression)
