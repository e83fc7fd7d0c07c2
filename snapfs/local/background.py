"""The local service's background work, owned here: the nursery it runs in,
opened and closed by ``open()``, and the bounded queues captures and imports wait
in (capturequeue.py).

- a *job* is keyed by its snapshot: at most one per snapshot, stopped by a delete
  (``stop``: cancelled, then awaited until it has cleaned up after itself);
- a *daemon* runs while the service is open (the orphan sweep, the retry of left
  uploads) and is cancelled first at close, before any job is;
- ``nursery`` is where readers run their read-ahead (readahead.py), tasks that
  end with their reader.

A job's end is signalled by an event (what ``stop`` and ``idle`` wait on): nothing
polls. Closing stops the daemons (the sweep may be starting jobs), then cancels every
job (one may start another on its way out: that one too) and waits for each.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import trio

from .capturequeue import CaptureQueue

log = logging.getLogger(__name__)


class BackgroundJobs:
    def __init__(self) -> None:
        #: Captures (and the storing of clones): bounded, one volume's in order.
        self.captures = CaptureQueue()
        #: Imports: bounded on their own, so that they and captures never wait on each other.
        self.imports = CaptureQueue()
        self._nursery: trio.Nursery | None = None
        self._jobs: dict[str, trio.CancelScope] = {}
        #: Set when a snapshot's job has ended (what a delete stopping it waits for).
        self._done: dict[str, trio.Event] = {}
        self._daemons: list[tuple[trio.CancelScope, trio.Event]] = []
        self._idle = trio.Event()
        self._idle.set()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[BackgroundJobs]:
        """The nursery, for the block; on the way out everything is stopped (aclose).
        An exception of the block is raised as it is, not in an ExceptionGroup."""
        assert self._nursery is None, "background jobs opened twice"
        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            except Exception as exc:
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await self.aclose()
        self._nursery = None
        if body_error is not None:
            raise body_error

    @property
    def nursery(self) -> trio.Nursery:
        """Where readers run their read-ahead (readahead.py): tasks that end with
        their reader, which its owner closes before the service closes."""
        return self._started()

    def _started(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("background jobs used outside BackgroundJobs.open()")
        return self._nursery

    def start(self, job_id: str, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run ``fn(*args)`` as the job of ``job_id`` (a snapshot). Its failure is
        logged: a bug in one job must not take the whole service down."""
        nursery = self._started()
        scope = trio.CancelScope()
        done = trio.Event()
        self._jobs[job_id] = scope
        self._done[job_id] = done
        if self._idle.is_set():
            self._idle = trio.Event()

        async def job() -> None:
            try:
                with scope:
                    await fn(*args)
            except Exception:
                log.exception("background job for snapshot %s failed", job_id)
            finally:
                if self._jobs.get(job_id) is scope:
                    del self._jobs[job_id]
                    del self._done[job_id]
                done.set()
                if not self._jobs:
                    self._idle.set()
        nursery.start_soon(job)

    def __contains__(self, job_id: object) -> bool:
        """Whether ``job_id`` has a job queued or running in this process."""
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    async def stop(self, job_id: str) -> None:
        """Cancel the job of ``job_id`` (queued or running) and return once it has
        cleaned up after itself; nothing to do when it has none."""
        scope, done = self._jobs.get(job_id), self._done.get(job_id)
        if scope is not None and done is not None:
            scope.cancel()
            await done.wait()

    async def idle(self) -> None:
        """Return once no job is left (those started meanwhile included)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def daemon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` until the service closes."""
        nursery = self._started()
        scope, ended = trio.CancelScope(), trio.Event()
        self._daemons.append((scope, ended))

        async def run() -> None:
            try:
                with scope:
                    await fn()
            finally:
                ended.set()
        nursery.start_soon(run)

    async def aclose(self) -> None:
        daemons, self._daemons = self._daemons, []
        for scope, _ in daemons:
            scope.cancel()
        for _, ended in daemons:  # ended before any job is stopped: none starts another
            await ended.wait()
        while self._jobs:  # (a job may start another on its way out: cancel that too)
            for scope in list(self._jobs.values()):
                scope.cancel()
            await next(iter(self._done.values())).wait()
