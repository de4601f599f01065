"""Parsing of request fields (from multipart/urlencoded forms or JSON objects) into typed values.

Forms deliver every field as a string and JSON delivers typed values; both go through the same
strict converters so that ``k=abc``, ``k=1e9``, ``rerank=maybe`` or a box with three numbers are
refused with a message naming the field, never coerced or left to crash deeper in the stack.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.datastructures import UploadFile

from irkit.serve.errors import BadRequest

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_INT = re.compile(r"^[+-]?\d{1,12}$")


def as_int(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.match(value.strip()):
        return int(value.strip())
    raise BadRequest(f"{name} must be an integer, got {_show(value)}")


def as_bool(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise BadRequest(f"{name} must be true or false, got {_show(value)}")


def as_method(value: Any, name: str, choices: tuple[str, ...], true_means: str) -> str:
    """A method name from ``choices``; booleans (and their spellings) mean ``true_means`` / ``"none"``."""
    if value is None:
        return "none"
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    try:
        return true_means if as_bool(value, name, False) else "none"
    except BadRequest:
        raise BadRequest(f"{name} must be one of {', '.join(choices)} (or true/false), got {_show(value)}") from None


def as_box(value: Any, name: str = "box") -> tuple[float, float, float, float] | None:
    """``[x1, y1, x2, y2]`` in pixels of the query image: a JSON list, or a string "x1,y1,x2,y2" / "[...]"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except ValueError:
            raise BadRequest(f"{name} must be 4 numbers x1,y1,x2,y2, got {_show(text)}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BadRequest(f"{name} must be 4 numbers [x1, y1, x2, y2], got {_show(value)}")
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        raise BadRequest(f"{name} must be finite numbers, got {_show(value)}")
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise BadRequest(f"{name} must satisfy 0 <= x1 < x2 and 0 <= y1 < y2 (pixels), got {list(box)}")
    return box  # type: ignore[return-value]


def as_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise BadRequest(f"{name} must be a text field, not a file")
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {type(value).__name__}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
