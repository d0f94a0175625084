"""The learning-rate schedule: warmup, cosine over steps or over a time budget, plateau, state round trip."""

import math

import pytest

from sashimi.training.schedule import LRSchedule


def test_warmup_then_cosine_over_steps():
    s = LRSchedule("cosine", warmup_steps=4, decay_steps=14, min_ratio=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0 and s.factor(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(14) == pytest.approx(0.1) and s.factor(100) == pytest.approx(0.1)


def test_cosine_over_a_time_budget_reaches_the_floor_at_the_deadline():
    s = LRSchedule("cosine", warmup_steps=2, decay_steps=10**9, min_ratio=0.01, budget_seconds=100.0)
    assert s.factor(0, 0.0) == 0.5 and s.factor(1, 1.0) == 1.0  # warmup is in steps
    assert s.factor(2, 20.0) == 1.0  # warmup ended at 20 s: the decay runs from there to 100 s
    assert s.factor(3, 60.0) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(4, 100.0) == pytest.approx(0.01) and s.factor(5, 150.0) == pytest.approx(0.01)
    resumed = LRSchedule("cosine", warmup_steps=2, decay_steps=10**9, min_ratio=0.01, budget_seconds=100.0)
    resumed.load_state_dict(s.state_dict())
    assert resumed.factor(3, 60.0) == s.factor(3, 60.0)


def test_plateau_and_bad_kind():
    s = LRSchedule("plateau", warmup_steps=0, plateau_factor=0.5, plateau_patience=1)
    for value in (3.0, 3.0, 3.0):
        s.observe(value)
    assert s.factor(10) == 0.5
    with pytest.raises(ValueError, match="schedule must be one of"):
        LRSchedule("linear")
