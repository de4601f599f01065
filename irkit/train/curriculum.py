"""Curriculum schedules: a value that ramps from ``start_value`` to ``end_value`` over training.

CVNet's re-ranker training grows the share of hard negatives and the Hide-and-Seek probability as
training goes on (easy first, then harder); the paper gives no schedule, so the shape is a choice:
"linear", "cosine" (slow start and end) or "step" (``n_steps`` equal jumps). Before
``start_step`` the value is ``start_value``; from ``end_step`` on it is ``end_value``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from irkit.errors import ConfigError

KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """``value(step)`` of a ramp; see the module docstring. ``n_steps`` only matters for "step"."""

    start_value: float
    end_value: float
    start_step: int = 0
    end_step: int = 0
    kind: str = "linear"
    n_steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown schedule kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.end_step < self.start_step:
            raise ConfigError(f"schedule end_step ({self.end_step}) is before start_step ({self.start_step})")
        if self.kind == "step" and self.n_steps < 1:
            raise ConfigError(f"a step schedule needs n_steps >= 1, got {self.n_steps}")

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``, in [0, 1]."""
        if step <= self.start_step:
            return 0.0 if self.end_step > self.start_step else 1.0 if step >= self.end_step else 0.0
        if step >= self.end_step:
            return 1.0
        return (step - self.start_step) / (self.end_step - self.start_step)

    def value(self, step: int) -> float:
        if self.kind == "constant":
            return float(self.start_value)
        t = self.progress(step)
        if self.kind == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        elif self.kind == "step":
            t = math.floor(t * self.n_steps + 1e-9) / self.n_steps
        return float(self.start_value + (self.end_value - self.start_value) * t)

    __call__ = value


def constant(value: float) -> Schedule:
    return Schedule(value, value, kind="constant")


@dataclass(frozen=True)
class RerankCurriculum:
    """The two schedules of re-ranker training; ``at(step)`` gives both values."""

    hard_negative_share: Schedule = field(default_factory=lambda: Schedule(0.0, 1.0, 0, 10_000, "linear"))
    hide_prob: Schedule = field(default_factory=lambda: Schedule(0.0, 0.5, 0, 10_000, "linear"))

    def at(self, step: int) -> dict[str, float]:
        return {"hard_negative_share": self.hard_negative_share.value(step), "hide_prob": self.hide_prob.value(step)}

    @classmethod
    def from_dict(cls, cfg: dict) -> "RerankCurriculum":
        """Build from ``{"hard_negative_share": {...Schedule fields}, "hide_prob": {...}}`` (configs)."""
        try:
            return cls(**{k: Schedule(**v) for k, v in cfg.items()})
        except TypeError as exc:
            raise ConfigError(f"invalid curriculum config {cfg!r}: {exc}") from exc
