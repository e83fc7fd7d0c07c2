"""The capture queue on a real store: a volume's captures wait their turn holding
nothing (snapshotting, progress 0), reuse the previous map when the volume did
not change, a delete stops a queued one, and a full queue refuses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from fixtures_store import (MiB, ZONE, all_tokens_held, random_bytes, read_all,
                            tasks_waiting, wait_state)
from snapfs.errors import NotFound, Transient
from snapfs.local import LocalService
from snapfs.local.capturequeue import RUNNING, CaptureQueue


async def test_a_volumes_captures_queue_in_order_and_reuse_the_map(
        service: LocalService, volume_file: Callable[..., Path], caplog: Any) -> None:
    data = random_bytes(4 * MiB, seed=3)
    vol = await service.add_volume("v", volume_file("v", len(data), [(0, data)]))
    with caplog.at_level(logging.INFO, logger="snapfs.local.jobs"):
        with all_tokens_held(service.hash_limiter):  # the first capture stops at its read
            snaps = [await service.create_snapshot(ZONE, name=f"s{i}", volume_id=vol.id)
                     for i in range(4)]
            await tasks_waiting(service.hash_limiter)
            assert service.jobs.captures.queued(vol.id) == 4
            for s in snaps[1:]:  # waiting their turn: nothing read, nothing held
                got = await service.get_snapshot(ZONE, s.id)
                assert (got.state, got.progress) == ("snapshotting", 0)
            # A delete stops a queued capture at once.
            with trio.fail_after(5):
                await service.delete_snapshot(ZONE, snaps[2].id)
            with pytest.raises(NotFound):
                await service.get_snapshot(ZONE, snaps[2].id)
            assert service.jobs.captures.queued(vol.id) == 3
        done = [await wait_state(service, s.id) for s in (snaps[0], snaps[1], snaps[3])]
    assert [s.state for s in done] == ["available"] * 3
    for s in done:
        assert await read_all(service, s.id) == data
    text = caplog.text
    assert text.count(f"{len(data)} bytes read from the volume") == 1
    assert text.count("map reused") == 2
    assert service.jobs.captures.queued(vol.id) == 0 and service.jobs.captures.tickets == 0


async def test_at_most_running_captures_read_at_once(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    vols = []
    for i in range(RUNNING + 2):
        data = random_bytes(2 * MiB, seed=10 + i)
        vols.append(await service.add_volume(f"v{i}", volume_file(f"v{i}", len(data),
                                                                  [(0, data)])))
    with all_tokens_held(service.hash_limiter):
        snaps = [await service.create_snapshot(ZONE, name=f"s{i}", volume_id=v.id)
                 for i, v in enumerate(vols)]
        await tasks_waiting(service.hash_limiter, RUNNING)
        await trio.sleep(0.2)  # the others would have reached the limiter by now
        assert service.hash_limiter.statistics().tasks_waiting == RUNNING
    for s in snaps:
        assert (await wait_state(service, s.id)).state == "available"


async def test_a_full_queue_refuses_and_changes_nothing(
        service: LocalService, volume_file: Callable[..., Path]) -> None:
    data = random_bytes(MiB, seed=5)
    vol = await service.add_volume("v", volume_file("v", len(data), [(0, data)]))
    service.jobs.captures = CaptureQueue(limit=2)
    with all_tokens_held(service.hash_limiter):
        first = [await service.create_snapshot(ZONE, name=f"s{i}", volume_id=vol.id)
                 for i in range(2)]
        before = (await service.list_snapshots(ZONE)).items
        with pytest.raises(Transient, match="2 captures are queued already"):
            await service.create_snapshot(ZONE, name="s2", volume_id=vol.id)
        assert (await service.list_snapshots(ZONE)).items == before
    for s in first:
        assert (await wait_state(service, s.id)).state == "available"
    # Room again once they are done.
    s = await service.create_snapshot(ZONE, name="s2", volume_id=vol.id)
    assert (await wait_state(service, s.id)).state == "available"
