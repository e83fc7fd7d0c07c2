"""The embedded local backend (SQLite metadata + deduplicated pack-file chunk store)."""

from .service import LocalService, open_local_service

__all__ = ["LocalService", "open_local_service"]
