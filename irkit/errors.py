"""User-facing errors. Every failure caused by input (files, configs, requests) is one of these.

The CLI prints ``str(err)`` without a traceback and exits non-zero; the HTTP service maps them to
4xx responses. Messages say what is wrong and what to do about it.
"""
from __future__ import annotations


class IrkitError(Exception):
    """Base class of every error a user can cause and fix."""


class ImageError(IrkitError):
    """An image file is missing, unreadable, corrupt, too large or of an unsupported kind."""


class DatasetError(IrkitError):
    """A dataset (ground truth, lists, layout) is missing or malformed."""


class CheckpointError(IrkitError):
    """A checkpoint is missing, of the wrong layout, or does not match the model."""


class ConfigError(IrkitError):
    """A configuration value, override or command-line argument is invalid."""


class StoreError(IrkitError):
    """A feature store or index on disk is missing, inconsistent or incompatible."""


class RankingError(IrkitError):
    """A ranking or score matrix handed to evaluation is malformed."""
