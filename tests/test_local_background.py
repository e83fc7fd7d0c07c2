"""BackgroundJobs (snapfs/local/background.py): the object that owns the local
service's nursery and queues. Fast tests on the object itself; the service's
behaviours built on it (a delete stopping a capture, bounded captures, the orphan
sweep, storing retries) have their own tests."""

from __future__ import annotations

import pytest
import trio

from snapfs.local.background import BackgroundJobs


async def test_stop_cancels_a_job_and_returns_once_it_cleaned_up() -> None:
    events: list[str] = []

    async def job() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.05)  # cleaning up takes a while
            events.append("cleaned")
    async with BackgroundJobs().open() as jobs:
        jobs.start("s1", job)
        await trio.sleep(0)
        assert "s1" in jobs and len(jobs) == 1
        await jobs.stop("s1")
        assert events == ["cleaned"] and "s1" not in jobs and len(jobs) == 0
        await jobs.stop("s1")  # none left: nothing to do


async def test_close_cancels_daemons_first_then_every_job() -> None:
    events: list[str] = []

    async def forever(name: str) -> None:
        try:
            await trio.sleep_forever()
        finally:
            events.append(name)

    async def job() -> None:
        try:
            await trio.sleep_forever()
        finally:
            events.append("job")
            jobs.start("late", forever, "late")  # started on its way out: stopped too
    async with BackgroundJobs().open() as jobs:
        jobs.start("s1", job)
        jobs.daemon(lambda: forever("daemon"))
        await trio.sleep(0.01)
    assert events == ["daemon", "job", "late"]
    assert len(jobs) == 0


async def test_a_failing_job_is_logged_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    done = trio.Event()

    async def bad() -> None:
        raise ValueError("a bug")

    async def good() -> None:
        await trio.sleep(0.05)
        done.set()
    async with BackgroundJobs().open() as jobs:
        jobs.start("bad", bad)
        jobs.start("good", good)
        with trio.fail_after(5):
            await jobs.idle()
        assert done.is_set() and len(jobs) == 0
    assert "background job for snapshot bad failed" in caplog.text


async def test_an_error_of_the_block_is_raised_as_itself() -> None:
    with pytest.raises(KeyError):
        async with BackgroundJobs().open() as jobs:
            jobs.start("s1", trio.sleep_forever)
            raise KeyError("body")


async def test_jobs_need_the_open_nursery() -> None:
    jobs = BackgroundJobs()
    with pytest.raises(RuntimeError, match="outside"):
        jobs.start("s1", trio.sleep_forever)
    with pytest.raises(RuntimeError, match="outside"):
        jobs.nursery  # readers are made only while the service is open
    assert len(jobs) == 0
