"""Learning-rate schedules: how big each optimizer step is over the course of a run.

Warmup + cosine (the GPT-style default): a linear ramp from ~0 to the peak over ``w`` steps,
then half a cosine from the peak down to ``min_lr_ratio * peak`` at the end of the budget::

    lr(s) = peak * (s + 1) / w                                         s < w
    lr(s) = peak * (r + (1 - r) * (1 + cos(pi * p)) / 2)               afterwards, p in [0, 1]

where p is the fraction of the budget spent after warmup. With a step budget
p = (s - w) / (max_steps - w), exactly. With a wall-clock budget only (``max_time``) there is
no step count to end on, so p is the fraction of the time spent, elapsed / max_time: the
cosine reaches its floor when the time runs out however fast the machine is. (Warmup stays in
steps; the few seconds it takes shift the cosine negligibly.) With both budgets, p follows
whichever runs out first. Time-based p makes the schedule depend on wall time, so only step
budgets give bit-exact resumption.

Inverse square root (Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762,
section 5.3, equation 3), with steps counted from 1::

    lr(n) = scale * d_model^-0.5 * min(n^-0.5, n * w^-1.5)

It rises linearly for w steps, peaks at d_model^-0.5 * w^-0.5, then decays as 1 / sqrt(n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LRSchedule", "inverse_sqrt_lr", "warmup_cosine_lr"]


# --8<-- [start:schedules]
def warmup_cosine_lr(
    step: int, *, peak: float, warmup_steps: int, progress: float, min_lr_ratio: float
) -> float:
    """Warmup + cosine: the learning rate of optimizer step ``step`` (counted from 0).

    Args:
        step: optimizer steps already taken.
        peak: the learning rate at the end of warmup.
        warmup_steps: w, the length of the linear ramp.
        progress: p, the fraction of the budget spent after warmup (clipped to [0, 1]).
        min_lr_ratio: r, the final learning rate as a fraction of ``peak``.

    Example:
        >>> warmup_cosine_lr(0, peak=1.0, warmup_steps=10, progress=0.0, min_lr_ratio=0.1)
        0.1
        >>> warmup_cosine_lr(50, peak=1.0, warmup_steps=10, progress=1.0, min_lr_ratio=0.1)
        0.1
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps  # linear ramp; never exactly 0
    p = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * p))  # 1 -> 0
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def inverse_sqrt_lr(step: int, *, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """The 2017 Transformer's schedule: ``scale * d_model^-0.5 * min(n^-0.5, n * w^-1.5)``.

    Args:
        step: optimizer steps already taken; the formula's n is ``step + 1``.
        d_model: the model width D.
        warmup_steps: w (the paper: 4000).
        scale: a factor on the whole formula (the paper: 1).

    Example:
        >>> round(inverse_sqrt_lr(3999, d_model=512, warmup_steps=4000), 8)  # the peak
        0.00069877
    """
    n = step + 1
    return scale * d_model**-0.5 * min(n**-0.5, n * warmup_steps**-1.5)


# --8<-- [end:schedules]


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """The learning rate of every step of a run (what ``qkv.train.loop`` calls).

    Args:
        kind: "cosine", "inverse_sqrt" or "constant".
        peak: optim.lr (cosine, constant).
        warmup_steps, min_lr_ratio, scale: see the functions above.
        d_model: the model width (inverse_sqrt).
        max_steps: the step budget, or 0.
        max_seconds: the wall-clock budget, or None.
    """

    kind: str
    peak: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    scale: float = 1.0
    d_model: int = 512
    max_steps: int = 0
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float) -> float:
        """p: the fraction of the budget spent after warmup (see the module docstring)."""
        fractions = []
        if self.max_steps:
            span = max(self.max_steps - self.warmup_steps, 1)
            fractions.append((step - self.warmup_steps) / span)
        if self.max_seconds:
            fractions.append(elapsed / self.max_seconds)
        return min(max(max(fractions, default=0.0), 0.0), 1.0)

    def lr(self, step: int, elapsed: float = 0.0) -> float:
        """The learning rate for optimizer step ``step`` after ``elapsed`` training seconds."""
        if self.kind == "inverse_sqrt":
            return inverse_sqrt_lr(
                step, d_model=self.d_model, warmup_steps=self.warmup_steps, scale=self.scale
            )
        if self.kind == "constant":
            if step < self.warmup_steps:
                return self.peak * (step + 1) / self.warmup_steps
            return self.peak
        return warmup_cosine_lr(
            step, peak=self.peak, warmup_steps=self.warmup_steps,
            progress=self.progress(step, elapsed), min_lr_ratio=self.min_lr_ratio,
        )  # fmt: skip
