"""Names the kernel must stop answering at once. A snapshot renamed (mv, user.name,
snapshot.json) or deleted is listed in several views (snapshots/, volumes/<v>/,
tags/<t>/); the kernel caches each name it looked up for the entry timeout, so
without this the old name would keep resolving in the other views for a while."""

from __future__ import annotations

import pyfuse3

from ..model import Snapshot
from .context import FsContext
from .keys import Key, Kind
from .names import SEPARATOR, label_base, short_id


def forget_names(ctx: FsContext, before: Snapshot, after: Snapshot | None) -> None:
    """Invalidate the names ``before`` had, in every view the kernel was shown,
    that ``after`` (None: deleted) no longer answers to."""
    if not ctx.notify_kernel:
        return
    gone_tags = set(before.tags) - set(after.tags if after is not None else [])
    renamed = after is None or after.name != before.name
    suffix = short_id(before.id)
    names = [before.name, f"{label_base(before.name, suffix)}{SEPARATOR}{suffix}"]
    if after is not None and renamed:
        # Another snapshot in these views may have answered to the new name: it is
        # ambiguous now (both are listed as labels), so the kernel must ask again.
        names.append(after.name)
    for key in ctx.inodes.snapshot_keys(before.id):
        view = key.view
        in_gone_tag = view is not None and view.kind is Kind.TAG and view.arg in gone_tags
        if not (renamed or in_gone_tag):
            continue
        parent = ctx.inodes.known(key.parent())
        if parent is None:
            continue
        for name in names:
            # Queued to pyfuse3's notifier thread (a handler must not wait for the
            # kernel); a name the kernel does not hold is ENOENT there, ignored.
            pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
    # tags/<t> itself: gone when this was its last snapshot. The kernel is made to
    # ask again either way (a lookup that finds the tag still in use costs little).
    tags = ctx.inodes.known(Key(Kind.TAGS, before.zone, before.project))
    if tags is not None:
        for tag in sorted(gone_tags):
            pyfuse3.invalidate_entry_async(tags, tag.encode(), ignore_enoent=True)


def forget_entry(ctx: FsContext, parent: Key, name: str) -> None:
    """Invalidate one name the kernel may hold (an imports/ file now gone)."""
    if not ctx.notify_kernel:
        return
    inode = ctx.inodes.known(parent)
    if inode is not None:
        pyfuse3.invalidate_entry_async(inode, name.encode(), ignore_enoent=True)
