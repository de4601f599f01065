"""HTTP-facing error classes: each maps to one status code, so handlers never guess.

They subclass :class:`irkit.errors.IrkitError` (a user can cause and fix them), which lets the
service register one handler for the whole family and answer ``{"error": "..."}``.
"""
from __future__ import annotations

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


class Busy(IrkitError):
    """The inference queue is full; retry later (503)."""


#: most specific first; the first ``isinstance`` match wins
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413),
    (UnsupportedMedia, 415),
    (Unavailable, 501),
    (Busy, 503),
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
