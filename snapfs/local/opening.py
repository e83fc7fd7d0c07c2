"""Opening a local store: ``open_local_service`` makes (or recognises) the store,
recovers what stopped processes left half done when it is the store's only
opener, and runs the service's background jobs while it is open."""

from __future__ import annotations

import fcntl
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from ..objects import ObjectStorage
from .recovery import recover
from .service import LocalService
from .store import open_lock, open_store
from .storelocks import OPEN, StoreLock

__all__ = ["open_local_service"]


@asynccontextmanager
async def open_local_service(store: Path | str, objects: ObjectStorage | None = None,
                             resume: bool = True, readonly: bool = False
                             ) -> AsyncIterator[LocalService]:
    """Open (creating, mode 0700) the store at ``store``. When no other process has
    it open, interrupted work of an earlier process is recovered first.
    ``resume=False``, for short-lived commands (the CLI's volume, project and fsck):
    the background halves of deletes and the storing of clone-backed snapshots are
    left to the next long-lived open, instead of being started only to be stopped
    at exit (storing starts by releasing what an earlier attempt stored).
    ``readonly``: read without changing any file (no recovery, no migration)."""
    store = Path(store)
    # Trusted, recognised (made if new), or refused: store.py.
    await trio.to_thread.run_sync(open_store, store, not readonly)
    if readonly:
        svc = LocalService(store, objects, readonly=True)
        try:
            yield svc
        finally:
            svc.packs.close()
            svc.md.close()
        return
    lock_fd = open_lock(store)
    try:
        svc = LocalService(store, objects)
        try:
            # One open at a time: another must not find the store to itself while
            # the whole-file lock turns from exclusive to shared (not atomic in
            # flock). Recovery changes the index as a delete would: under its lock.
            opening = StoreLock(store / "lock", OPEN)
            try:
                async with opening:
                    try:
                        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        exclusive = True
                    except BlockingIOError:
                        exclusive = False
                    if exclusive or svc.adoption.dead_jobs():
                        async with svc.index_lock:
                            await recover(svc.md, svc.index, svc.packs, svc.objects,
                                          exclusive=exclusive)
                    if exclusive:  # before another process may be making a clone
                        backing = svc.md.needing_shadows()
                        await trio.to_thread.run_sync(svc.shadows.tidy,
                                                      svc.md.usable_maps(), backing,
                                                      svc.md.snapshot_keys())
                    work = svc.adoption.claim(exclusive) if resume else []
                    fcntl.flock(lock_fd, fcntl.LOCK_SH)  # others may open it beside us now
            finally:
                opening.close()
            if resume:  # a mount or serve: the room a delete needs on a full disk
                await trio.to_thread.run_sync(svc.reserve.ensure)
            async with svc.jobs.open():  # an error of the body is raised as it is
                svc.adoption.resume(work)
                if resume:
                    svc.jobs.daemon(svc.adoption.sweep)
                    svc.jobs.daemon(svc.reserve.keep)
                    svc.jobs.daemon(svc.left_uploads.run)
                try:
                    yield svc
                finally:
                    with trio.CancelScope(shield=True):
                        await svc.aclose()
        finally:
            svc.pool.close()
            svc.packs.close()
            svc.md.close()
            svc.index_lock.close()
    finally:
        os.close(lock_fd)
