"""``-o`` mount options: every ``snapfs mount`` flag has an ``-o`` spelling, so that
``mount -t fuse.snapfs STORE MOUNTPOINT -o OPTIONS`` and an /etc/fstab line can say
everything the command line can."""

from __future__ import annotations

import argparse

from ..backends import BACKENDS  # the composition root knows them
from ..errors import InvalidArgument

#: Passed on to the kernel / libfuse as they are.
FUSE_OPTIONS = frozenset({"allow_other", "ro", "default_permissions"})

#: For mount(8), fstab and systemd, not for the filesystem: accepted and dropped.
#: (``suid`` and ``dev`` stay refused: a snapfs mount never honours them.)
IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "_netdev", "nofail", "user",
                     "users", "owner", "group", "nodev", "nosuid", "exec",
                     "noexec", "atime", "noatime", "relatime", "async", "sync"})
IGNORED_PREFIXES = ("x-", "comment=")

#: -o key[=value] -> the ``snapfs mount`` attribute it sets.
VALUED = {"backend": "backend", "s3_endpoint": "s3_endpoint", "readahead": "readahead",
          "image_mode": "image_mode", "image_owner": "image_owner", "listen": "listen",
          "zones": "zones", "profile": "profile", "staging_bucket": "staging_bucket",
          "store": "store"}
FLAGS = {"foreground": ("foreground", True), "debug": ("debug", True),
         "direct_io": ("direct_io", True), "page_cache": ("direct_io", False),
         "no_auth": ("no_auth", True)}


def apply_mount_options(args: argparse.Namespace) -> None:
    """Fold ``args.options`` (each a comma-separated -o list) into ``args``; what
    remains in ``args.options`` goes to FUSE. Unknown options are EINVAL."""
    fuse: list[str] = []
    for opt in args.options:
        for part in opt.split(","):
            part = part.strip()
            key, eq, value = part.partition("=")
            key_ = key.replace("-", "_")
            if not part or part in IGNORED or part.startswith(IGNORED_PREFIXES):
                continue
            if part in FUSE_OPTIONS:
                fuse.append(part)
            elif key_ in FLAGS and not eq:
                attr, flag = FLAGS[key_]
                setattr(args, attr, flag)
            elif key_ in VALUED and eq and value:
                if key_ == "backend" and value not in BACKENDS:
                    raise InvalidArgument("-o backend", f"{value!r} is not one of "
                                          f"{', '.join(BACKENDS)}")
                if key_ == "readahead":
                    try:
                        setattr(args, "readahead", int(value))
                    except ValueError:
                        raise InvalidArgument("-o readahead",
                                              f"{value!r} is not a number") from None
                    continue
                setattr(args, VALUED[key_], value)
            else:
                known = sorted(FUSE_OPTIONS | set(FLAGS) | {f"{k}=" for k in VALUED})
                raise InvalidArgument("-o", f"unsupported mount option {part!r} "
                                      f"(known: {', '.join(known)})")
    args.options = fuse
