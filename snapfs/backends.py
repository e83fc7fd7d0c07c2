"""The composition root: the one place that knows the backends. ``open_backend``
opens one (the local store or the Scaleway cloud) with its Object Storage from
one ``BackendSettings`` and closes both; ``snapfs mount``, ``snapfs serve`` and the
store commands all open theirs here, so a new backend is added in this module
only. What sits above (the filesystem, the HTTP API) sees a SnapshotService."""

from __future__ import annotations

import argparse
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import trio

from .errors import InvalidArgument
from .objects import ObjectStorage
from .rlimits import raise_open_files_limit
from .service import SnapshotService
from .storeoptions import add_store_option, store_path

log = logging.getLogger(__name__)

BACKENDS = ("local", "scaleway")


@dataclass(frozen=True)
class BackendSettings:
    """Which backend, and what it needs. ``store``: the local store's directory.
    ``zones``, ``profile``, ``staging_bucket``: the Scaleway backend's (see
    snapfs.scaleway). ``objects``: open Object Storage (export, import, the cloud's
    image.raw), at ``s3_endpoint`` or as the S3 configuration says. ``resume`` and
    ``readonly``: how the local store is opened (open_local_service)."""
    store: Path
    backend: str = "local"
    s3_endpoint: str | None = None
    objects: bool = True
    zones: list[str] | None = None
    profile: str | None = None
    staging_bucket: str | None = None
    resume: bool = True
    readonly: bool = False

    def describe(self) -> str:
        return str(self.store) if self.backend == "local" else f"the {self.backend} backend"


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``BackendSettings`` (``--store`` included), for the commands
    that can open any backend."""
    add_store_option(parser)
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="which service to show (default: the local store)")
    parser.add_argument("--s3-endpoint", metavar="URL", default=None,
                        help="Object Storage endpoint for export and import (default: "
                             "the S3 configuration, if any)")
    parser.add_argument("--zones", default=None, metavar="Z1,Z2",
                        help="scaleway backend: extra zones to show")
    parser.add_argument("--profile", default=None, help="scaleway backend: config profile")
    parser.add_argument("--staging-bucket", default=None, metavar="BUCKET",
                        help="scaleway backend: bucket image.raw exports are staged in")


def settings_from_args(args: argparse.Namespace) -> BackendSettings:
    """What add_backend_options parsed."""
    return BackendSettings(store=store_path(args).resolve(), backend=args.backend,
                           s3_endpoint=args.s3_endpoint,
                           zones=args.zones.split(",") if args.zones else None,
                           profile=args.profile, staging_bucket=args.staging_bucket)


def object_storage(endpoint: str | None) -> ObjectStorage | None:
    """Object Storage for export/import, or None (the service then refuses them
    with a clear reason)."""
    try:
        from .s3.storage import object_storage_from_config
    except ImportError:
        log.warning("Object Storage support is not installed; export/import will fail")
        return None
    return object_storage_from_config(endpoint)


@asynccontextmanager
async def open_backend(settings: BackendSettings) -> AsyncIterator[SnapshotService]:
    """The backend ``settings`` name, open until the block ends; then the service is
    closed (its background work stopped), and its Object Storage after it."""
    if settings.backend not in BACKENDS:
        raise InvalidArgument("backend", f"unknown backend {settings.backend!r} "
                                         f"({', '.join(BACKENDS)})")
    if settings.backend == "local":
        # The cloud's options do nothing here: said, not silently ignored.
        for option, value in (("zones", settings.zones), ("profile", settings.profile),
                              ("staging-bucket", settings.staging_bucket)):
            if value:
                raise InvalidArgument(option, "applies to --backend scaleway only")
    raise_open_files_limit()  # open images hold descriptors (rlimits.py)
    objects = object_storage(settings.s3_endpoint) if settings.objects else None
    try:
        async with _open_service(settings, objects) as svc:
            yield svc
    finally:
        if objects is not None:
            with trio.CancelScope(shield=True):
                await objects.aclose()


@asynccontextmanager
async def _open_service(settings: BackendSettings, objects: ObjectStorage | None
                        ) -> AsyncIterator[SnapshotService]:
    # Imported here: each backend's dependencies load only when it is used.
    if settings.backend == "local":
        from .local import open_local_service
        async with open_local_service(settings.store, objects=objects, resume=settings.resume,
                                      readonly=settings.readonly) as local:
            yield local
    else:  # scaleway
        from .scaleway import open_scaleway_service
        async with open_scaleway_service(settings.zones, staging_bucket=settings.staging_bucket,
                                         profile=settings.profile, objects=objects) as cloud:
            yield cloud
