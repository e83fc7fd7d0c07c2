"""The ``snapfs`` command line. Each area registers its own sub-commands:
store administration in ``snapfs.admin``, ``mount``/``umount``/``wait`` in ``snapfs.fs.commands``,
``serve`` in ``snapfs.http.commands``; their ``--store`` option is
``snapfs.storeoptions`` (a leaf: no command module imports this one)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .errors import SnapfsError
from .logtext import EscapingFormatter
from .memory import limit_malloc_arenas


#: Options whose value may look like a negative number (argparse would take it for an
#: option and say "expected one argument"): glued as --opt=VALUE so the value is judged.
_VALUE_OPTIONS = ("--size", "--readahead", "--timeout")


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def normalize_argv(argv: list[str], commands: set[str]) -> list[str]:
    """The mount helper's form ``snapfs STORE MOUNTPOINT [-o OPTS]`` (what mount.fuse3
    runs for ``mount -t fuse.snapfs`` and /etc/fstab) becomes ``snapfs mount``; values
    starting with '-' are glued to their option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    positional = [a for a in out if not a.startswith("-")]
    # Only a path names a store there: a mistyped command stays an error.
    if (len(positional) >= 2 and out[0] == positional[0] and out[0] not in commands
            and ("/" in out[0] or os.path.isdir(out[0]))):
        store, mountpoint = positional[0], positional[1]
        rest = list(out[1:])
        rest.remove(mountpoint)
        return ["mount", mountpoint, "--store", store, *_helper_options(rest)]
    return out


#: What mount.fuse3, run by root, adds to the options of every mount it starts unless
#: the fstab line says nodev/nosuid. A snapfs mount is always nosuid,nodev (libfuse's
#: default, which only these would lift), so the helper's defaults are dropped here;
#: `snapfs mount -o suid` asked for by a person stays refused (mountopts.py).
_HELPER_DEFAULTS = ("dev", "suid")


def _helper_options(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg == "-o":
            out[i + 1] = ",".join(o for o in out[i + 1].split(",")
                                  if o not in _HELPER_DEFAULTS)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like argparse but terse
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import admin
    from .fs import commands as fs_commands
    from .http import commands as http_commands

    from . import __version__

    parser = _Parser(prog="snapfs", description="The snapshot service as a filesystem.",
                     epilog="Also run as `snapfs STORE MOUNTPOINT -o OPTIONS` (the form "
                     "mount -t fuse.snapfs and /etc/fstab use): see `snapfs mount --help`.")
    parser.add_argument("--version", action="version", version=f"snapfs {__version__}")
    parser.add_argument("--store", dest="global_store", type=Path, default=None,
                        metavar="DIR", help="store directory, before or after the command "
                        "(default: $SNAPFS_STORE, else ~/.local/share/snapfs)")
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    admin.register(sub)
    fs_commands.register(sub)
    http_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # from the first import of a command module on
        print("snapfs: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    limit_malloc_arenas()
    parser = build_parser()  # imports every command module: most of a start's time
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a bare `snapfs`: what it can do, not just what is missing
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(normalize_argv(argv, _commands(parser)))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="snapfs: %(message)s")
        for handler in logging.getLogger().handlers:  # what clients send, escaped
            handler.setFormatter(EscapingFormatter("snapfs: %(message)s"))
    try:
        try:
            return int(args.func(args) or 0)
        except BaseExceptionGroup as group:  # one failure inside a trio nursery
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    except SnapfsError as exc:
        print(f"snapfs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except OSError as exc:
        print(f"snapfs: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
