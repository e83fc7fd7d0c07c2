"""The Scaleway cloud backend: ``open_scaleway_service`` is what ``--backend scaleway``
opens (see ``snapfs.scaleway.service`` for the design)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from ..objects import ObjectStorage
from .config import load_client, zones_for
from .service import ScalewayService

__all__ = ["ScalewayService", "open_scaleway_service"]


@asynccontextmanager
async def open_scaleway_service(zones: list[str] | None = None, *,
                                staging_bucket: str | None = None,
                                profile: str | None = None,
                                objects: ObjectStorage | None = None,
                                ) -> AsyncIterator[ScalewayService]:
    """The cloud backend for the profile (config file + SCW_* environment).

    ``zones``: extra zones (``--zones a,b``) shown after the default zone.
    ``staging_bucket`` and ``objects``: where image.raw exports go and how they are
    read back (ranged GETs); without them image.raw is refused with a clear reason.
    """
    client = await trio.to_thread.run_sync(load_client, profile)
    async with trio.open_nursery() as nursery:  # the image readers' read-ahead
        service = ScalewayService(client, zones_for(client, zones),
                                  staging_bucket=staging_bucket, objects=objects,
                                  nursery=nursery)
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await service.aclose()
