"""The embedded local backend (SQLite metadata + deduplicated pack-file chunk store)."""

from .opening import open_local_service
from .service import LocalService

__all__ = ["LocalService", "open_local_service"]
