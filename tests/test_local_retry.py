"""The storing retry's backoff schedule (README: a failure while storing a
clone-backed snapshot is retried after 30 s, then twice as long each time, up
to an hour), on virtual time: trio's MockClock jumps over the sleeps, the
failures are real (no pack can be made in an immutable packs directory)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from fixtures_store import ZONE, random_bytes, read_all
from snapfs.local import adoption, open_local_service

FAILED = "storing its chunks failed"


def test_storing_retries_after_30_s_then_twice_as_long_up_to_an_hour(
        reflink_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The virtual instants of the failure log lines are 30, 60, 120 ... 1920,
    3600, 3600 s apart; once packs can be made again the next try stores it.
    Checked by breaking it: without the doubling in _store_shadow (jobs.py) the
    gaps stay 30 s; without the min() the eighth gap is 3840 s."""
    volume = reflink_dir / "vol.raw"
    volume.write_bytes(random_bytes(3 << 20, seed=21))
    store = reflink_dir / "store"
    failed_at: list[float] = []
    messages: list[str] = []
    ten = trio.Event()
    # Virtual time: only the retry's sleeps may be jumped to, not the service's
    # sweep for dead processes' work (every 10 s, which would cost a jump each).
    monkeypatch.setattr(adoption, "ORPHAN_SWEEP", 1e7)

    class FailureTimes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if FAILED in record.getMessage():
                failed_at.append(trio.current_time())
                messages.append(record.getMessage())
                if len(failed_at) == 10:
                    ten.set()

    handler = FailureTimes(level=logging.ERROR)
    logger = logging.getLogger("snapfs.local")
    logger.addHandler(handler)

    async def main() -> None:
        async with open_local_service(store) as svc:
            packs = store / "packs"
            subprocess.run(["chattr", "+i", str(packs)], check=True)  # no pack can be made
            try:
                vol = await svc.add_volume("v", volume)
                snap = await svc.create_snapshot(ZONE, name="s", volume_id=vol.id)
                with trio.fail_after(1e9):  # virtual seconds: only a guard against a hang
                    await ten.wait()
                assert svc.storing() and list(packs.iterdir()) == []
            finally:
                subprocess.run(["chattr", "-i", str(packs)], check=True)
            with trio.fail_after(1e9):  # the next try, an hour after the last
                while svc.storing():
                    await trio.sleep(600)
            assert await read_all(svc, snap.id) == volume.read_bytes()
            assert svc.md.shadow_of(snap.id) is None

    try:
        # Jump the clock only once every task has waited 0.3 s of real time, so
        # that the work in threads between two tries takes no virtual time.
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.3))
    finally:
        logger.removeHandler(handler)
    gaps = [b - a for a, b in zip(failed_at, failed_at[1:])]
    expected = [30.0, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    # Each gap is its sleep, plus at most one jump to the service's own 10 s
    # timers should a thread outlast the threshold under load.
    assert all(e <= g < e + 11 for e, g in zip(expected, gaps)), gaps
    assert len(gaps) == len(expected)
    assert [m.rsplit("tried again in ", 1)[1] for m in messages[:9]] == \
        [f"{e:.0f} s" for e in expected]
    assert os.listdir(store / "packs")  # stored at last
