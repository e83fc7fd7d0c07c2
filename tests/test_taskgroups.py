"""first_error: the one failure a pipeline's callers see, not its consequences."""

from __future__ import annotations

import errno

import pytest
import trio

from snapfs.errors import StoreFull
from snapfs.taskgroups import first_error


async def test_a_stage_failing_is_the_error_not_the_broken_channel_it_leaves() -> None:
    """The consumer fails (an OSError of the store), its receive channel closes,
    and the producer's send raises BrokenResourceError: a capture on a full disk
    ended as "internal error: BrokenResourceError()" when that came first."""
    send, recv = trio.open_memory_channel[int](0)

    async def produce() -> None:
        async with send:
            for i in range(10):
                await send.send(i)

    async def consume() -> None:
        await recv.receive()
        recv.close()  # as the stage's `async with` does on its way out
        # The producer's BrokenResourceError reaches the nursery first (the order
        # of the failures is the scheduler's, not the causes').
        with trio.CancelScope(shield=True):
            await trio.sleep(0.01)
        raise OSError(errno.EPERM, "Operation not permitted")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(consume)
    leaves = caught.value.exceptions
    assert isinstance(leaves[0], trio.BrokenResourceError), leaves
    err = first_error(caught.value)
    assert isinstance(err, OSError) and err.errno == errno.EPERM


def test_domain_errors_first_then_causes_then_anything_but_cancelled() -> None:
    full = StoreFull("full")
    broken = trio.BrokenResourceError()
    io = OSError(errno.EIO, "Input/output error")
    assert first_error(BaseExceptionGroup("g", [broken, io, full])) is full
    assert first_error(BaseExceptionGroup("g", [broken, io])) is io
    assert first_error(BaseExceptionGroup("g", [broken])) is broken
