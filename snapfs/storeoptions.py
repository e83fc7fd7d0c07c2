"""The ``--store`` option every command that opens a local store takes, and the
default store. A leaf: the command modules import it, it imports none of them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_store() -> Path:
    env = os.environ.get("SNAPFS_STORE")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "snapfs"


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None, metavar="DIR",
                        help="store directory (default: $SNAPFS_STORE, else ~/.local/share/snapfs)")


def store_path(args: argparse.Namespace) -> Path:
    # --store after the sub-command wins over one given before it (cli.py).
    for name in ("store", "global_store"):
        if getattr(args, name, None):
            return Path(getattr(args, name))
    return default_store()
