"""Pictures of a next-token distribution and of what the sampling filters keep of it.

One bar per candidate token, its height the probability; next to it, one column per filter
(top-k, top-p, min-p) marking the tokens that the filter lets through. The cuts are computed by
the same functions that ``qkv.generate`` samples with, so the picture cannot drift from the code.

Shapes: ``V`` candidate tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from qkv.generate.sampling import min_p_filter, top_k_filter, top_p_filter

__all__ = ["filter_masks", "plot_filters"]


def filter_masks(
    probs: Sequence[float], *, top_k: int, top_p: float, min_p: float
) -> dict[str, list[bool]]:
    """Which tokens each filter keeps.

    Args:
        probs: the next-token probabilities (V,), summing to 1.
        top_k, top_p, min_p: the settings of the three filters.

    Returns:
        ``{"top-k K": [kept?] * V, "top-p P": ..., "min-p M": ...}``.

    Example:
        >>> kept = filter_masks([0.7, 0.2, 0.1], top_k=1, top_p=0.85, min_p=0.2)
        >>> for name, keep in kept.items():
        ...     print(name, keep)
        top-k 1 [True, False, False]
        top-p 0.85 [True, True, False]
        min-p 0.2 [True, True, False]
    """
    if not probs:
        raise ValueError("probs is empty: pass the probability of at least one token")
    total = float(sum(probs))
    if any(p < 0 for p in probs) or abs(total - 1.0) > 1e-3:
        raise ValueError(f"probs must be non-negative and sum to 1 (they sum to {total:.4f})")
    logits = torch.tensor([list(probs)], dtype=torch.float64).log()  # (1, V)
    return {
        f"top-k {top_k}": top_k_filter(logits, top_k).isfinite()[0].tolist(),
        f"top-p {top_p}": top_p_filter(logits, top_p).isfinite()[0].tolist(),
        f"min-p {min_p}": min_p_filter(logits, min_p).isfinite()[0].tolist(),
    }


def plot_filters(
    words: Sequence[str],
    probs: Sequence[float],
    *,
    top_k: int,
    top_p: float,
    min_p: float,
    title: str = "",
    path: str | Path | None = None,
):  # -> matplotlib.figure.Figure (untyped: matplotlib is imported lazily)
    """Bar chart of ``probs`` with the tokens kept by top-k, top-p and min-p marked.

    Args:
        words: the candidate tokens (V,), in the order of ``probs``.
        probs: their probabilities (V,).
        top_k, top_p, min_p: the filter settings.
        title: shown above the chart (e.g. the prompt).
        path: when given, the figure is also written there as a PNG.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(words) != len(probs):
        raise ValueError(f"{len(words)} words but {len(probs)} probabilities: pass one per word")
    kept = filter_masks(probs, top_k=top_k, top_p=top_p, min_p=min_p)
    n = len(words)
    fig, (ax, grid) = plt.subplots(
        1, 2, figsize=(8.0, 0.35 * n + 1.4), width_ratios=[3, 2], sharey=True
    )
    ys = list(range(n))
    ax.barh(ys, probs, color="#4c72b0")
    ax.set_yticks(ys, labels=list(words))
    ax.invert_yaxis()  # the most likely token on top
    ax.set_xlabel("probability")
    for y, p in zip(ys, probs, strict=True):
        ax.text(p, y, f" {p:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, max(probs) * 1.25)
    colors = ["#dd8452", "#55a868", "#8172b2"]
    for col, (keep, color) in enumerate(zip(kept.values(), colors, strict=True)):
        for y, k in zip(ys, keep, strict=True):
            grid.scatter(col, y, s=120, marker="s", color=color if k else "white", edgecolors=color)
        grid.text(col, n - 0.2, f"{sum(keep)} kept", ha="center", va="top", fontsize=8)
    grid.set_xticks(range(len(kept)), labels=list(kept))
    grid.xaxis.tick_top()
    grid.set_xlim(-0.6, len(kept) - 0.4)
    grid.tick_params(left=False)
    for side in ("right", "bottom", "left"):
        grid.spines[side].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
