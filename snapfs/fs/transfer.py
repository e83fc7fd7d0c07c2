"""The text written to ``export`` and ``imports/<name>`` files, and the JSON read back.

Writing ``BUCKET/KEY`` (or ``s3://BUCKET/KEY``) starts the transfer; reading
gives its status with the API Task's status names. Parsing is pure so that the
rules are tested without a mount.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..model import Snapshot, Task
from ..objects import check_object_target

MAX_TEXT = 4096


@dataclass(frozen=True)
class Target:
    bucket: str
    key: str


def parse_target(data: bytes) -> Target:
    """``b"BUCKET/KEY\\n"`` -> Target; anything else is an invalid argument."""
    if len(data) > MAX_TEXT:
        raise InvalidArgument("target", f"longer than {MAX_TEXT} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("target", "not UTF-8 text") from None
    # A line's end, as written on Linux or (a file made elsewhere) on Windows: a
    # key ending in "\r" was exported to, and reported as a success.
    text = text.removesuffix("\n").removesuffix("\r")
    # The key is taken as written: S3 keys may end in spaces, and stripping them
    # exported to another key than the one written (and reported success). Spaces
    # before the bucket go: no bucket name has any.
    text = text.lstrip()
    if not text.strip():
        raise InvalidArgument("target", "empty; write BUCKET/KEY or s3://BUCKET/KEY")
    if "\n" in text or "\r" in text or "\0" in text:
        raise InvalidArgument("target", "must be one line: BUCKET/KEY or s3://BUCKET/KEY")
    if text.startswith("s3://"):
        text = text[len("s3://"):]
    elif "://" in text:
        raise InvalidArgument("target", f"{text!r}: only s3:// URLs or BUCKET/KEY")
    bucket, sep, key = text.partition("/")
    if not sep or not key:
        raise InvalidArgument("key", f"{text!r} has no object key; write BUCKET/KEY")
    return Target(*check_object_target(bucket, key))  # S3's rules, as the API's


def line_complete(data: bytes) -> bool:
    """A written target is complete (and can be acted on before close) once it
    ends with a newline, as ``echo`` writes it."""
    return data.endswith(b"\n")


def status_json(status: dict[str, object]) -> bytes:
    return (json.dumps(status, indent=2) + "\n").encode()


def no_export_status() -> dict[str, object]:
    return {"state": None, "bucket": None, "key": None, "progress": 0, "bytes": 0,
            "error": None, "task_id": None}


def task_status(task: Task) -> dict[str, object]:
    """The status of an export, from its API Task."""
    return {"state": task.status, "bucket": task.bucket or None, "key": task.key or None,
            "progress": task.progress, "bytes": task.bytes, "error": task.error,
            "task_id": task.id}


_IMPORT_STATE = {"importing": "started", "available": "success",
                 "error": "failure", "invalid_data": "failure"}


def import_status(target: Target | None, snapshot: Snapshot | None,
                  error: str | None = None) -> dict[str, object]:
    """The status of an import, from the snapshot it creates (the API has no task
    for Create-from-QCOW2; the snapshot's state is the import's progress)."""
    if snapshot is None:
        return {"state": "failure" if error else "pending",
                "bucket": target.bucket if target else None,
                "key": target.key if target else None,
                "progress": 0, "bytes": 0, "error": error, "task_id": None}
    state = _IMPORT_STATE.get(snapshot.state, "started")
    progress = 100 if state == "success" else snapshot.progress
    return {"state": state, "bucket": target.bucket if target else None,
            "key": target.key if target else None, "progress": progress,
            "bytes": snapshot.size * progress // 100 if state != "failure" else 0,
            "error": snapshot.error_reason if state == "failure" else None,
            "task_id": None, "snapshot_id": snapshot.id}
