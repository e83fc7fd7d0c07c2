"""The local store's volumes: registered files and devices (``volume add``), files
the store makes (``volume create``, the Block API's create), their rows, and what
removing one must also drop (its read lease, the reflink shadows it pins, its file
when the store made it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from ..errors import InvalidArgument, NotFound, NotPermitted
from ..model import Volume, check_name, check_size, check_tags, check_volume_type, check_zone, \
    new_id, now
from .leases import VolumeLeases
from .metadata import Metadata
from .shadows import Shadows
from .store import managed_volume_file
from .volumefile import identity_of, inspect_new

log = logging.getLogger(__name__)


class LocalVolumes:
    """Volume operations of the local service (LocalService delegates to these)."""

    def __init__(self, store: Path, md: Metadata, leases: VolumeLeases,
                 shadows: Shadows) -> None:
        self.store, self.md, self._leases, self.shadows = store, md, leases, shadows

    async def add(self, name: str, path: str | os.PathLike[str], zone: str,
                  project: str | None, volume_type: str) -> Volume:
        """Register an existing raw image file or block device (volumefile.py)."""
        check_name(name)  # before the path is even looked at
        found = await trio.to_thread.run_sync(inspect_new, path)
        return self._add_volume(name, found.path, found.size, zone, project, volume_type,
                                managed=False, identity=found.identity)

    async def repoint(self, ref: str, path: str | os.PathLike[str], zone: str | None) -> Volume:
        """Make the volume the file at ``path`` (checked as by add_volume): on purpose,
        after its file was replaced or moved. Its next snapshot reads it all."""
        v = self.md.volume(zone, ref)
        if self.md.volume_managed(v.id):
            raise InvalidArgument("volume", f"{v.name!r} was made by 'volume create' and "
                                            "lives in the store; it cannot be re-pointed")
        found = await trio.to_thread.run_sync(inspect_new, path)
        self.md.set_volume_file(v.id, found.identity, found.path, found.size)
        self._leases.forget(v.id)
        log.info("volume %s (%s) re-pointed from %s to %s (%s)", v.id, v.name, v.path,
                 found.path, found.identity)
        return self.md.volume(v.zone, v.id)

    def create(self, name: str, size: int, zone: str, project: str | None,
               volume_type: str) -> Volume:
        """A new sparse raw file inside the store."""
        check_size(size)
        vid = new_id()
        vdir = self.store / "volumes"
        vdir.mkdir(mode=0o700, exist_ok=True)
        path = Path(os.path.abspath(vdir / f"{vid}.raw"))  # the store may be relative
        self._check_new_volume(name, zone, project, volume_type)
        try:
            # 0600: a snapshot's image.raw takes its volume file's read bits
            # (shared mounts), and this file is the store's alone.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.truncate(size)
                ident = identity_of(os.fstat(f.fileno()))
            return self._add_volume(name, str(path), size, zone, project, volume_type,
                                    managed=True, vid=vid, identity=ident)
        except (OverflowError, OSError) as exc:
            path.unlink(missing_ok=True)
            reason = exc.strerror if isinstance(exc, OSError) else "too large"
            raise InvalidArgument("size", f"cannot make a {size}-byte file: {reason}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _check_new_volume(self, name: str, zone: str, project: str | None,
                          volume_type: str) -> None:
        check_name(name)
        check_zone(zone)
        check_volume_type(volume_type)
        if project is not None:
            self.md.project(project)

    def _add_volume(self, name: str, path: str, size: int, zone: str, project: str | None,
                    volume_type: str, managed: bool, vid: str | None = None,
                    identity: str | None = None) -> Volume:
        self._check_new_volume(name, zone, project, volume_type)
        proj = self.md.project(project) if project else self.md.project("default")
        t = now()
        v = Volume(id=vid or new_id(), name=name, size=size, volume_type=volume_type, zone=zone,
                   project=proj.id, organization=proj.organization, state="available",
                   creation_date=t, modification_date=t, tags=[], path=path)
        self.md.add_volume(v, managed, identity)
        return v

    async def remove(self, ref: str, zone: str | None) -> Volume:
        v = self.md.volume(zone, ref)
        managed = self.md.volume_managed(v.id)
        self.md.remove_volume(v.id)
        self._leases.forget(v.id)
        backing = self.md.needing_shadows()
        await trio.to_thread.run_sync(self.shadows.drop_volume, v.id, backing,
                                      self.md.snapshot_keys())
        if managed and v.path:
            # Only ever a file of <store>/volumes/ (store.py: metadata names no other).
            own = managed_volume_file(self.store, v.path)
            if own is None:
                log.warning("volume %s: its file %s is not in %s, left in place", v.name,
                            v.path, self.store / "volumes")
            else:
                own.unlink(missing_ok=True)
        return v

    def update(self, zone: str, volume_id: str, name: str | None,
               tags: list[str] | None) -> Volume:
        v = self.md.volume(check_zone(zone), volume_id)
        if v.id != volume_id:
            raise NotFound("volume", volume_id)
        self.md.update_volume(v.id, v.zone, None if name is None else check_name(name),
                              None if tags is None else check_tags(tags))
        return self.md.volume(v.zone, v.id)

    async def delete(self, zone: str, volume_id: str) -> None:
        """Only a volume whose file the store made (``volume create``): deleting a
        registered file's volume through an API would leave the file behind."""
        v = self.md.volume(check_zone(zone), volume_id)
        if v.id != volume_id:
            raise NotFound("volume", volume_id)
        if not self.md.volume_managed(v.id):
            raise NotPermitted(f"volume {v.id} ({v.name}) is the file {v.path} registered "
                               "by 'snapfs volume add': remove it with 'snapfs volume "
                               "remove' (its file stays)")
        await self.remove(v.id, v.zone)
