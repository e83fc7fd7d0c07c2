"""Who may read what in a mount shared with ``-o allow_other``.

The kernel checks the modes and owners the mount reports (``default_permissions``
is always on with ``allow_other``, daemon.py). So that a shared mount gives no
one more than the volume files did:

- ``image.raw`` has the owner, group and read bits of its volume file when the
  snapshot was taken (the local store records them with each snapshot); a
  snapshot without them (an import, one taken before they were recorded, the
  cloud backend) is the mount owner's, mode 0400. ``--image-mode`` and
  ``--image-owner`` set them for every image of the mount instead.
- ``map.json`` and ``changes/<other>`` say where the image's data lies and
  what changed in it: they take image.raw's owner and mode.
- control files (``snapshot.json``, ``export``, ``imports/<name>``) and the
  directories a mkdir/rename/rmdir changes are writable by the mount's owner only
  (0644 / 0755); every directory stays traversable.
"""

from __future__ import annotations

import grp
import pwd
import stat
from typing import Any, Callable

from ..errors import InvalidArgument
from ..model import Snapshot

#: image.raw of a snapshot that records no access of its own.
DEFAULT_IMAGE_MODE = 0o400
#: Only read bits: image.raw is never writable, and never executable.
READ_BITS = 0o444
#: uid_t/gid_t are 32 bits and (uid_t)-1 means "no change" to chown(2): an id the
#: kernel cannot be given would make every stat of the mount fail (EIO).
ID_LIMIT = 2**32 - 1


def parse_image_mode(text: str) -> int:
    """'0440' / '440' (octal read bits only) -> the mode."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise InvalidArgument("--image-mode", f"{text!r} is not an octal mode like "
                                              "0440") from None
    if mode & ~READ_BITS or mode < 0:
        raise InvalidArgument("--image-mode", f"{text!r}: image.raw takes read bits only "
                                              "(a combination of 0444)")
    return mode


def parse_image_owner(text: str) -> tuple[int, int]:
    """'UID:GID' (numbers or names) -> (uid, gid)."""
    user, sep, group = text.partition(":")
    if not sep or not user or not group:
        raise InvalidArgument("--image-owner", f"{text!r} is not UID:GID")
    return _ident(user, pwd.getpwnam, "user"), _ident(group, grp.getgrnam, "group")


def _ident(text: str, by_name: Callable[[str], Any], what: str) -> int:
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        # (length first: int() refuses strings of over 4300 digits with a ValueError)
        if len(digits) > len(str(ID_LIMIT)) or int(digits) >= ID_LIMIT:
            raise InvalidArgument("--image-owner", f"{what} id {text} is out of range "
                                                   f"(0 to {ID_LIMIT - 1})")
        return int(digits)
    try:
        return int(by_name(text)[2])  # pw_uid / gr_gid
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise InvalidArgument("--image-owner", f"no {what} named {text!r}") from None


def image_access(snap: Snapshot, mount_uid: int, mount_gid: int,
                 mode: int | None, owner: tuple[int, int] | None) -> tuple[int, int, int]:
    """(uid, gid, st_mode) of a snapshot's image.raw; ``mode``/``owner``: the
    mount's overrides (None: the snapshot's own)."""
    acc = snap.access
    if owner is None:
        owner = (acc.uid, acc.gid) if acc is not None else (mount_uid, mount_gid)
    if mode is None:
        mode = acc.mode & READ_BITS if acc is not None else DEFAULT_IMAGE_MODE
    return owner[0], owner[1], stat.S_IFREG | mode
