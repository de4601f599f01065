"""HTTP-facing error classes: each maps to one status code, so handlers never guess.

They subclass :class:`irkit.errors.IrkitError` (a user can cause and fix them), which lets the
service register one handler for the whole family and answer ``{"error": "..."}``.
"""
from __future__ import annotations

import errno

from irkit.errors import (CheckpointError, ConfigError, DatasetError, ImageError, IrkitError,
                          RankingError, StoreError)


class BadRequest(IrkitError):
    """A request field is missing, of the wrong type or out of range (400)."""


class Unauthorized(IrkitError):
    """A write request without the right bearer token (401)."""


class NotFound(IrkitError):
    """An id that is well formed but not indexed (404)."""


class Conflict(IrkitError):
    """An add with an id that is already indexed (409)."""


class PayloadTooLarge(IrkitError):
    """A body over the byte limit or an image over the pixel limit (413)."""


class UnsupportedMedia(IrkitError):
    """Uploaded bytes that are not an image of a supported format (415)."""


class Unavailable(IrkitError):
    """A feature the loaded model or store does not provide, e.g. explanation without a re-ranker (501)."""


class Forbidden(IrkitError):
    """A write to a store this server cannot write (read-only directory or file system) (403)."""


class RequestTimeout(IrkitError):
    """The request body did not arrive within the body deadline (408)."""


class InsufficientStorage(IrkitError):
    """The server's disk is full (or over quota): the write was not saved (507)."""


class Busy(IrkitError):
    """No inference slot freed up in time, or the wait queue is full; retry later (503).

    ``retry_after`` is the number of seconds the client should wait (the ``Retry-After`` header)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


#: most specific first; the first ``isinstance`` match wins
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (RequestTimeout, 408),
    (PayloadTooLarge, 413),
    (UnsupportedMedia, 415),
    (Unavailable, 501),
    (Busy, 503),
    (InsufficientStorage, 507),
    (BadRequest, 400),
    (ImageError, 400),
    (ConfigError, 400),
    (RankingError, 400),
    (DatasetError, 400),
    (CheckpointError, 500),   # a server-side setup problem, not the client's
    (StoreError, 409),       # e.g. a concurrent add of the same id
)


def status_of(err: BaseException) -> int:
    """HTTP status for an IrkitError (400 for subclasses this module does not know)."""
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code
    return 400


#: errno of a full disk / exhausted quota, and of a store the server may not write
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def os_cause(err: BaseException | None) -> OSError | None:
    """The first OSError with a disk-full or read-only errno in ``err``'s cause/context chain.

    The engine may re-raise a failed write as its own error; the HTTP status must still say
    "disk full" (507) or "read-only" (403), not a generic 409/500."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS | READ_ONLY_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def storage_error(err: BaseException) -> IrkitError | None:
    """Translate a disk-full or read-only OSError (anywhere in the chain) into the HTTP error to answer."""
    os_err = os_cause(err)
    if os_err is None:
        return None
    if os_err.errno in DISK_FULL_ERRNOS:
        return InsufficientStorage("the server's disk is full: this change was not saved (nothing changed); "
                                   "free disk space on the server and retry")
    return Forbidden(f"the server cannot write its store ({os_err.strerror}): adds and removals are disabled")
