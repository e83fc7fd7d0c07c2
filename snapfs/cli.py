"""The ``snapfs`` command line. Each area registers its own sub-commands:
store administration in ``snapfs.admin``, ``mount``/``umount``/``wait`` in ``snapfs.fs.commands``,
``serve`` in ``snapfs.http.commands``; their ``--store`` option is
``snapfs.storeoptions`` (a leaf: no command module imports this one)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from .errors import SnapfsError
from .logtext import EscapingFormatter
from .memory import limit_malloc_arenas


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like argparse but terse
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import admin
    from .fs import commands as fs_commands
    from .http import commands as http_commands

    parser = _Parser(prog="snapfs", description="The snapshot service as a filesystem.")
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    admin.register(sub)
    fs_commands.register(sub)
    http_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("snapfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    except OSError as exc:
        print(f"snapfs: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
