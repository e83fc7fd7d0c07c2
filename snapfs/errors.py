"""Domain errors, and the one table that turns each into an errno and an HTTP status.

Everything below the FUSE handlers and the HTTP layer raises these, never
``pyfuse3.FUSEError`` or an HTTP exception: the kinds mirror the Scaleway API's
error types (``invalid_arguments``, ``not_found``, ``precondition_failed``,
``permissions_denied``, transient 5xx/429) so that an HTTP front end maps them
1:1 and the filesystem maps each to exactly one errno, here and nowhere else.
"""

from __future__ import annotations

import errno


class SnapfsError(Exception):
    """Base of every refusal; ``str(exc)`` is the one line a user sees."""

    #: The Scaleway API error ``type`` this kind is reported as over HTTP.
    api_type = "unknown_error"


class InvalidArgument(SnapfsError):
    """A request field is malformed or not allowed; names the field and why."""

    api_type = "invalid_arguments"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class NameTooLong(InvalidArgument):
    """A name of more bytes than any entry of the tree may have (255, NAME_MAX):
    ENAMETOOLONG, as a local filesystem answers, for lookups too."""


class NotFound(SnapfsError):
    """The named resource does not exist (in that zone)."""

    api_type = "not_found"

    def __init__(self, resource: str, ident: str) -> None:
        # Quoted, not repr'd: the log escapes the message (logtext.esc) and would
        # escape repr's backslashes a second time ("\\n" for a newline).
        super().__init__(f"{resource} '{ident}' not found")
        self.resource = resource
        self.ident = ident


class AlreadyExists(SnapfsError):
    """A name is already taken where names must be unique (a directory entry)."""

    api_type = "conflict"


class PreconditionFailed(SnapfsError):
    """The resource's state forbids the operation now (exporting, importing...)."""

    api_type = "precondition_failed"


class PermissionDenied(SnapfsError):
    """The caller may not do this (bad credentials, foreign project)."""

    api_type = "permissions_denied"


class NotPermitted(SnapfsError):
    """The operation has no meaning at this place in the tree (mkdir in a zone,
    a rename across views, setting a read-only attribute)."""

    api_type = "invalid_request_error"


class ReadOnly(SnapfsError):
    """Snapshot data is immutable: opening an image for writing."""

    api_type = "invalid_request_error"


class VolumeChanged(SnapfsError):
    """A volume's path no longer leads to the file registered (another file, a
    symlink): nothing is read from it until ``snapfs volume repoint``. Fails the
    snapshot (state error) rather than the request that made it."""

    api_type = "precondition_failed"


class SnapshotUnusable(SnapfsError):
    """The snapshot ended in ``error``/``invalid_data``: it has no bytes to give."""

    api_type = "precondition_failed"


class CorruptData(SnapfsError):
    """Stored bytes do not match their hash, or a reference points at nothing.
    Reads fail with this rather than returning wrong bytes."""

    api_type = "internal_error"


class InvalidData(SnapfsError):
    """An image to import is not valid QCOW2 (bad magic, truncated, unsupported
    feature, size mismatch); the message says exactly what is wrong."""

    api_type = "invalid_arguments"


class InvalidAnswer(InvalidData):
    """InvalidData said of one answer of the server, not of the object's bytes (a
    range GET with more or fewer bytes than asked, a pinned GET refused because
    the version changed): the same to the user, but not remembered as the
    version's verdict (s3/shared.py's REFUSED), since the next answer may differ."""


class TooLarge(SnapfsError):
    """A write past what the file can hold (a control file's 64 KiB): refused
    before anything is allocated."""

    api_type = "invalid_arguments"


class StoreFull(SnapfsError):
    """The store's filesystem has no room (ENOSPC, EDQUOT) for what a capture or
    import writes; what it wrote is given back."""

    api_type = "insufficient_storage"


class StoreUnusable(SnapfsError):
    """The store directory cannot be trusted or recognised (not ours, writable by
    others, not a store, its metadata.db missing, damaged or another store's):
    every command refuses, changing nothing; the message names the way out. Also
    the store's files failing under a running service (an I/O error, a file made
    immutable): the request fails, and says it was the disk."""


class Transient(SnapfsError):
    """A backend failed in a way worth retrying (timeouts, 429, 5xx)."""

    api_type = "transient_error"


class TooManyOpen(Transient):
    """An open that would leave the process too few descriptors for the files it
    already serves (rlimits.py): refused at open, so that no read of a file
    already open fails for want of one."""


class Interrupted(SnapfsError):
    """A wait (for a snapshot to become available) was interrupted by the caller."""

    api_type = "internal_error"


class NoSuchAttribute(SnapfsError):
    """An extended attribute that the node does not carry."""

    api_type = "not_found"


class NoMoreData(SnapfsError):
    """A SEEK_DATA that finds only holes after its offset, or a SEEK_DATA or
    SEEK_HOLE at or past the end: lseek(2)'s own answer, not a fault."""

    api_type = "invalid_request_error"


class NotSupported(SnapfsError):
    """A whole kind of request this place does not support (extended attributes
    outside ``user.*``): tools cache this answer instead of asking per file."""

    api_type = "invalid_request_error"


class NotConfigured(SnapfsError):
    """A request that needs something this daemon was not given (export or import
    without any Object Storage configured): refused when asked, not later."""

    api_type = "precondition_failed"


# The one table: every refusal is decided here. Order matters only through
# the class hierarchy (most specific class first in ``errno_for``'s MRO walk).
ERRNO: dict[type[SnapfsError], int] = {
    InvalidArgument: errno.EINVAL,
    NameTooLong: errno.ENAMETOOLONG,
    NotFound: errno.ENOENT,
    AlreadyExists: errno.EEXIST,
    PreconditionFailed: errno.EBUSY,
    PermissionDenied: errno.EACCES,
    NotPermitted: errno.EPERM,
    ReadOnly: errno.EROFS,
    SnapshotUnusable: errno.EIO,
    VolumeChanged: errno.ESTALE,
    CorruptData: errno.EIO,
    InvalidData: errno.EINVAL,
    InvalidAnswer: errno.EINVAL,
    TooLarge: errno.EFBIG,
    StoreFull: errno.ENOSPC,
    StoreUnusable: errno.EIO,
    Transient: errno.EAGAIN,
    TooManyOpen: errno.EMFILE,
    Interrupted: errno.EINTR,
    NoSuchAttribute: errno.ENODATA,
    NoMoreData: errno.ENXIO,  # lseek(2): "no data (or hole) from this offset on"
    NotSupported: errno.EOPNOTSUPP,
    NotConfigured: errno.ENXIO,  # "no such device or address": no endpoint to reach
    SnapfsError: errno.EIO,
}

HTTP_STATUS: dict[type[SnapfsError], int] = {
    InvalidArgument: 400,
    NameTooLong: 400,
    NotFound: 404,
    AlreadyExists: 409,
    PreconditionFailed: 412,
    PermissionDenied: 403,
    NotPermitted: 400,
    ReadOnly: 400,
    SnapshotUnusable: 412,
    VolumeChanged: 412,
    CorruptData: 500,
    InvalidData: 400,
    InvalidAnswer: 400,
    TooLarge: 413,
    StoreFull: 507,
    StoreUnusable: 500,
    Transient: 503,
    TooManyOpen: 503,
    Interrupted: 500,
    NoSuchAttribute: 404,
    NoMoreData: 416,
    NotSupported: 501,
    NotConfigured: 501,
    SnapfsError: 500,
}


def _lookup(table: dict[type[SnapfsError], int], exc: SnapfsError) -> int:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]  # type: ignore[index]
    return table[SnapfsError]


def errno_for(exc: SnapfsError) -> int:
    """The errno a filesystem handler answers with for this refusal."""
    return _lookup(ERRNO, exc)


def http_status_for(exc: SnapfsError) -> int:
    """The HTTP status an API front end answers with for this refusal."""
    return _lookup(HTTP_STATUS, exc)
