"""Learning-rate schedules: warmup + cosine values and the 2017 inverse square root."""

from __future__ import annotations

import itertools
import math

import pytest

from qkv.train.schedule import LRSchedule, inverse_sqrt_lr, warmup_cosine_lr


def test_warmup_is_linear_then_cosine_reaches_the_floor() -> None:
    s = LRSchedule(kind="cosine", peak=1e-3, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert [s.lr(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-12)
    assert s.lr(9) == pytest.approx(1e-3, rel=1e-12)  # the end of warmup is the peak
    assert s.lr(10) == pytest.approx(1e-3, rel=1e-12)  # p = 0: the cosine starts at the peak
    # Halfway through the cosine (p = 0.5): the mean of peak and floor.
    assert s.lr(60) == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-12)
    assert s.lr(110) == pytest.approx(1e-4, rel=1e-12)
    # Monotone decreasing after warmup.
    values = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_cosine_formula_at_a_quarter() -> None:
    lr = warmup_cosine_lr(35, peak=2.0, warmup_steps=10, progress=0.25, min_lr_ratio=0.0)
    assert lr == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)


def test_time_budget_progress_is_the_fraction_of_time_spent() -> None:
    s = LRSchedule(kind="cosine", peak=1.0, warmup_steps=0, min_lr_ratio=0.0, max_seconds=100.0)
    assert s.progress(step=5, elapsed=25.0) == pytest.approx(0.25)
    assert s.lr(5, elapsed=50.0) == pytest.approx(0.5)
    assert s.lr(5, elapsed=150.0) == pytest.approx(0.0)  # clipped at the end of the budget
    both = LRSchedule(kind="cosine", peak=1.0, warmup_steps=0, max_steps=100, max_seconds=100.0)
    assert both.progress(step=80, elapsed=10.0) == pytest.approx(0.8)  # whichever runs out first


@pytest.mark.parametrize("d_model,warmup", [(512, 4000), (128, 200)])
def test_inverse_sqrt_matches_the_paper(d_model: int, warmup: int) -> None:
    for n in (1, 10, warmup // 2, warmup, warmup + 1, 5 * warmup):
        expected = d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)  # equation 3, step n from 1
        assert inverse_sqrt_lr(n - 1, d_model=d_model, warmup_steps=warmup) == pytest.approx(
            expected, rel=1e-12
        )
    peak = inverse_sqrt_lr(warmup - 1, d_model=d_model, warmup_steps=warmup)
    assert peak == pytest.approx((d_model * warmup) ** -0.5, rel=1e-12)
    assert inverse_sqrt_lr(warmup - 1, d_model=d_model, warmup_steps=warmup, scale=2.0) == (
        pytest.approx(2 * peak, rel=1e-12)
    )
    s = LRSchedule(kind="inverse_sqrt", peak=1.0, warmup_steps=warmup, d_model=d_model, scale=1.0)
    assert s.lr(warmup - 1) == pytest.approx(peak, rel=1e-12)
