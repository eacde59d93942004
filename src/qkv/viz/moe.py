"""Expert utilisation of a mixture of experts: each layer's share of tokens per expert (PNG).

A router that balances its load sends each of the X experts 1 / X of the token choices; one
that collapsed sends most of them to a few. ``plot_expert_load`` draws the shares as a
layers x experts heatmap, from the counts each ``qkv.blocks.moe.MixtureOfExperts`` keeps
(``last_stats.tokens_per_expert``; ``Mixtral.router_stats()`` lists them per layer).

Shape legend: L layers · X experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from torch import Tensor

from qkv.viz.plots import DPI, PathLike, save_figure

__all__ = ["expert_load_share", "plot_expert_load"]


def expert_load_share(counts: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Each layer's counts (L, X) as shares of that layer's total, (L, X) float, rows sum to 1.

    Raises:
        ValueError: not (L, X); a count negative or not finite; a layer with no tokens.
    """
    if isinstance(counts, Tensor):
        counts = counts.detach().to(device="cpu", dtype=torch.float64).numpy()
    c = np.asarray(counts, dtype=np.float64)  # (L, X)
    if c.ndim != 2 or 0 in c.shape:
        raise ValueError(
            f"counts must be (L, X), tokens per expert for each layer, got shape {c.shape}; "
            "stack one layer's tokens_per_expert per row"
        )
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and >= 0 (numbers of tokens)")
    totals = c.sum(axis=1, keepdims=True)  # (L, 1)
    if (totals == 0).any():
        empty = np.flatnonzero(totals[:, 0] == 0).tolist()
        raise ValueError(f"layer(s) {empty} routed no tokens: their shares are undefined")
    return c / totals  # (L, X)


def plot_expert_load(
    counts: Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    title: str | None = None,
    annotate: bool | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Each layer's share of routed tokens per expert, as a heatmap with a colour bar.

    The colour scale is centred on the even share 1 / X (white): experts above it red, below
    it blue, so an unbalanced router stands out.

    Args:
        counts: (L, X) tokens per expert for each layer, e.g.
            ``torch.stack([s.tokens_per_expert for s in model.router_stats()])``.
        title: above the heatmap.
        annotate: write each share in its cell; None: when there are at most 16 x 16 cells.
        path: also write the figure there as a PNG (atomically).

    Example:
        >>> fig = plot_expert_load([[5, 5, 5, 5], [14, 2, 2, 2]])
        >>> fig.axes[0].get_xlabel()
        'expert'
    """
    share = expert_load_share(counts)  # (L, X)
    n_layers, n_experts = share.shape
    even = 1.0 / n_experts
    spread = max(float(np.abs(share - even).max()), 1e-9)  # the farthest share from 1 / X
    # White at 1 / X, the same distance either way, but no share is below 0: the colour bar
    # stops there (each side of the centre has its own scale).
    norm = TwoSlopeNorm(vcenter=even, vmin=max(even - spread, 0.0), vmax=even + spread)
    fig = Figure(
        figsize=(0.5 * n_experts + 2.5, 0.4 * n_layers + 1.4), dpi=DPI, layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="RdBu_r", norm=norm, aspect="auto")
    if annotate if annotate is not None else n_layers <= 16 and n_experts <= 16:
        for i, e in np.ndindex(*share.shape):
            ax.text(e, i, f"{share[i, e]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)], fontsize=8)
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)], fontsize=8)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label=f"share of routed tokens (even: 1/{n_experts})")
    if title:
        ax.set_title(title, fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig
