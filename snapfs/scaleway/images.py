"""image.raw for cloud snapshots (export to a staging bucket, read back as QCOW2)."""

from __future__ import annotations

from typing import Any

from ..errors import NotPermitted
from ..objects import ObjectStorage
from ..service import ImageReader


class CloudImages:
    def __init__(self, service: Any, bucket: str | None, objects: ObjectStorage | None) -> None:
        self.service = service
        self.bucket = bucket
        self.objects = objects

    async def open(self, zone: str, snapshot_id: str) -> ImageReader:
        raise NotPermitted("image.raw of a cloud snapshot needs --staging-bucket "
                           "(not implemented yet)")

    async def aclose(self) -> None:
        pass
