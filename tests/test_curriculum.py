"""Curriculum schedules give the intended values at given steps."""
from __future__ import annotations

import pytest

from irkit.errors import ConfigError
from irkit.train.curriculum import RerankCurriculum, Schedule, constant


def test_linear():
    s = Schedule(0.0, 0.8, start_step=100, end_step=500, kind="linear")
    assert [s.value(t) for t in (0, 100, 300, 500, 10_000)] == pytest.approx([0, 0, 0.4, 0.8, 0.8])
    assert s(200) == pytest.approx(0.2)


def test_cosine():
    s = Schedule(0.1, 0.5, 0, 100, kind="cosine")
    assert s.value(0) == pytest.approx(0.1)
    assert s.value(50) == pytest.approx(0.3)
    assert s.value(25) == pytest.approx(0.1 + 0.4 * (0.5 - 0.5 * 2 ** -0.5))
    assert s.value(100) == pytest.approx(0.5) and s.value(150) == pytest.approx(0.5)


def test_step():
    s = Schedule(0.0, 1.0, 0, 100, kind="step", n_steps=4)
    assert [s.value(t) for t in (0, 24, 25, 49, 50, 99, 100)] == pytest.approx([0, 0, 0.25, 0.25, 0.5, 0.75, 1])


def test_decreasing_and_instant_and_constant():
    s = Schedule(1.0, 0.0, 10, 20)
    assert s.value(15) == pytest.approx(0.5)
    jump = Schedule(0.0, 1.0, 50, 50)
    assert jump.value(49) == 0.0 and jump.value(50) == 1.0
    assert constant(0.3).value(123) == 0.3


def test_curriculum_and_errors():
    c = RerankCurriculum.from_dict({"hard_negative_share": {"start_value": 0.2, "end_value": 1.0, "end_step": 10},
                                    "hide_prob": {"start_value": 0.0, "end_value": 0.4, "end_step": 10,
                                                  "kind": "step", "n_steps": 2}})
    assert c.at(5) == pytest.approx({"hard_negative_share": 0.6, "hide_prob": 0.2})
    with pytest.raises(ConfigError):
        Schedule(0, 1, 10, 5)
    with pytest.raises(ConfigError):
        Schedule(0, 1, 0, 5, kind="exp")
    with pytest.raises(ConfigError):
        RerankCurriculum.from_dict({"hide_prob": {"start": 0}})
