"""Pictures of attention and of position encodings, as matplotlib figures and PNG files.

Every function draws on a fresh ``matplotlib.figure.Figure`` (no pyplot, no global state, the
Agg renderer), returns it, and with ``path=`` also writes it as a PNG:

* ``plot_head``: one head's weights (T, S) as a heatmap, query tokens down, key tokens across;
* ``plot_heads``: every head of one layer side by side (H, T, S);
* ``plot_model_view``: every layer x head as a thumbnail (L, H, T, S);
* ``plot_head_stats``: one number per head, e.g. its entropy, as a layer x head table (L, H);
* ``plot_query``: where one query token looks, in every layer and head (L, H, S);
* ``plot_image_attention``: attention over a ViT's patches laid over the image;
* ``plot_sinusoidal``, ``plot_learned``, ``plot_rope``, ``plot_alibi``: the position encodings
  of page 4, computed by ``qkv.positional``.

Shape legend (the same in every file):
    B batch · T query positions · S key/value positions · D model width · H query heads ·
    K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from qkv._io import atomic_write
from qkv.positional import alibi_bias, alibi_slopes, rope_frequencies, sinusoidal_table

__all__ = [
    "plot_alibi",
    "plot_head",
    "plot_head_stats",
    "plot_heads",
    "plot_image_attention",
    "plot_learned",
    "plot_model_view",
    "plot_query",
    "plot_rope",
    "plot_sinusoidal",
    "save_figure",
]

WEIGHTS_CMAP = "Blues"  # 0 is white: what a head ignores disappears
DIVERGING_CMAP = "RdBu_r"  # signed values (encodings): blue < 0 < red
DPI = 100
PathLike = str | os.PathLike[str]


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as a PNG (atomically: a reader never sees half a file)."""
    target = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))
    target.chmod(0o644)  # an ordinary picture, readable by all (the temporary file was not)
    return target


def _finish(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _label(token: str) -> str:
    """A token as a tick label: matplotlib would read ``$...$`` as mathematics."""
    return token.replace("$", r"\$")


def _heatmap(
    ax: Axes,
    w: np.ndarray,
    query_tokens: Sequence[str] | None,
    key_tokens: Sequence[str] | None,
    *,
    vmax: float | None = None,
    annotate: bool = False,
    fontsize: float = 8,
) -> None:
    """Draw (T, S) weights on ``ax``: rows = queries, columns = keys."""
    ax.imshow(w, cmap=WEIGHTS_CMAP, vmin=0.0, vmax=vmax or max(float(w.max()), 1e-9))
    ax.set_xticks(range(w.shape[1]) if key_tokens is not None else [])
    ax.set_yticks(range(w.shape[0]) if query_tokens is not None else [])
    if key_tokens is not None:
        ax.set_xticklabels([_label(t) for t in key_tokens], rotation=90, fontsize=fontsize)
    if query_tokens is not None:
        ax.set_yticklabels([_label(t) for t in query_tokens], fontsize=fontsize)
    if annotate:
        top = vmax or float(w.max())
        for i, j in np.ndindex(*w.shape):
            if w[i, j] >= 0.005:
                colour = "white" if w[i, j] > 0.6 * top else "black"
                text = f"{w[i, j]:.2f}".lstrip("0") if w[i, j] < 1 else "1"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize - 2, color=colour)


# --8<-- [start:plot_head]
def plot_head(
    weights: Tensor | np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    *,
    title: str | None = None,
    annotate: bool | None = None,
    path: PathLike | None = None,
) -> Figure:
    """One head's attention as a heatmap: row i is how query i splits its weight over the keys.

    Args:
        weights: (T, S), rows summing to 1.
        query_tokens: T labels for the rows.
        key_tokens: S labels for the columns.
        title: drawn above the map.
        annotate: write each weight in its cell; default when the map has at most 24 x 24 cells.
        path: also write the figure there as a PNG.

    Returns:
        The figure.
    """
    w = _np(weights)  # (T, S)
    if w.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(
            f"weights {w.shape} do not match {len(query_tokens)} query and {len(key_tokens)} "
            "key tokens; pass one label per row and per column"
        )
    if annotate is None:
        annotate = max(w.shape) <= 24
    side = 1.2 + 0.32 * max(w.shape)
    fig = Figure(figsize=(side + 0.6, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _heatmap(ax, w, query_tokens, key_tokens, annotate=annotate, fontsize=9)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)


# --8<-- [end:plot_head]


def _grid(n: int, ncols: int | None) -> tuple[int, int]:
    cols = ncols or min(n, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def plot_heads(
    weights: Tensor | np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    *,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
    ncols: int | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Every head of one layer side by side, each with its token labels.

    Args:
        weights: (H, T, S).
        query_tokens, key_tokens: T and S labels.
        head_labels: H titles; default "head 0", "head 1", ...
        title: for the whole figure, e.g. "layer 3".
        ncols: heads per row; default about sqrt(H).
        path: also write the figure there as a PNG.
    """
    w = _np(weights)  # (H, T, S)
    n_heads = w.shape[0]
    labels = list(head_labels) if head_labels is not None else [f"head {h}" for h in range(n_heads)]
    rows, cols = _grid(n_heads, ncols)
    cell = 0.6 + 0.16 * max(w.shape[1:])
    fig = Figure(figsize=(cols * cell + 0.8, rows * cell + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    small = max(4.0, min(7.0, 110 / max(w.shape[1:])))
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.set_axis_off()
            continue
        first_col, last_row = h % cols == 0, h // cols == rows - 1 or h + cols >= n_heads
        _heatmap(
            ax,
            w[h],
            query_tokens if first_col else None,
            key_tokens if last_row else None,
            vmax=1.0,
            fontsize=small,
        )
        ax.set_title(labels[h], fontsize=8)
    # Every head is drawn on the same scale, 0 to 1, so one bar serves them all.
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=WEIGHTS_CMAP)
    fig.colorbar(scale, ax=axes, label="weight", shrink=0.6)
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, path)


def plot_model_view(
    weights: Tensor | np.ndarray,
    *,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
    path: PathLike | None = None,
) -> Figure:
    """The model view: every layer (rows) x head (columns) as a small heatmap, no labels.

    Args:
        weights: (L, H, T, S).
        layer_labels: L row titles; default "layer 0", ...
        head_labels: H column titles; default "head 0", ...
        title: above the grid.
        path: also write the figure there as a PNG.
    """
    w = _np(weights)  # (L, H, T, S)
    n_layers, n_heads = w.shape[:2]
    layers = (
        list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(n_layers)]
    )
    heads = list(head_labels) if head_labels is not None else [f"head {h}" for h in range(n_heads)]
    fig = Figure(figsize=(0.9 * n_heads + 1.0, 0.9 * n_layers + 0.7), dpi=DPI)
    axes = fig.subplots(
        n_layers, n_heads, squeeze=False, gridspec_kw={"wspace": 0.08, "hspace": 0.08}
    )
    for (i, h), ax in np.ndenumerate(axes):
        ax.imshow(w[i, h], cmap=WEIGHTS_CMAP, vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(heads[h], fontsize=7)
        if h == 0:
            ax.set_ylabel(layers[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, path)


def plot_head_stats(
    values: Tensor | np.ndarray,
    *,
    label: str,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    fmt: str = "{:.2f}",
    path: PathLike | None = None,
) -> Figure:
    """One number per head as a layer x head table, coloured and written in each cell.

    Args:
        values: (L, H), e.g. ``qkv.viz.stats.entropy(weights)``.
        label: what the numbers are, for the colour bar (e.g. "entropy (nats)").
        layer_labels, head_labels: L and H labels.
        title: above the table.
        cmap: a matplotlib colour map name.
        fmt: how each number is written.
        path: also write the figure there as a PNG.
    """
    v = _np(values)  # (L, H)
    n_layers, n_heads = v.shape
    layers = (
        list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(n_layers)]
    )
    heads = list(head_labels) if head_labels is not None else [str(h) for h in range(n_heads)]
    fig = Figure(
        figsize=(0.55 * n_heads + 2.2, 0.42 * n_layers + 1.2), dpi=DPI, layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(v, cmap=cmap, aspect="auto")
    lo, hi = float(v.min()), float(v.max())
    for i, h in np.ndindex(*v.shape):
        bright = (v[i, h] - lo) / (hi - lo) > 0.6 if hi > lo else False
        ax.text(h, i, fmt.format(v[i, h]), ha="center", va="center", fontsize=7,
                color="black" if bright else "white")  # fmt: skip
    ax.set_xticks(range(n_heads), heads, fontsize=8)
    ax.set_yticks(range(n_layers), layers, fontsize=8)
    ax.set_xlabel("head")
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)


def plot_query(
    weights: Tensor | np.ndarray,
    key_tokens: Sequence[str],
    *,
    query: str,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Where one query token looks: one panel per layer, one row per head, one column per key.

    Args:
        weights: (L, H, S), the query's row in every layer and head.
        key_tokens: S labels.
        query: the query token, for the title.
        layer_labels, head_labels: L and H labels.
        path: also write the figure there as a PNG.
    """
    w = _np(weights)  # (L, H, S)
    n_layers, n_heads, s = w.shape
    layers = (
        list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(n_layers)]
    )
    heads = list(head_labels) if head_labels is not None else [str(h) for h in range(n_heads)]
    height = n_layers * (0.2 * n_heads + 0.35) + 1.2
    fig = Figure(figsize=(0.34 * s + 1.8, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(n_layers, 1, squeeze=False, sharex=True)[:, 0]
    for i, ax in enumerate(axes):
        image = ax.imshow(w[i], cmap=WEIGHTS_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_yticks(range(n_heads), heads, fontsize=8)
        ax.set_ylabel(layers[i], fontsize=8)
        ax.set_xticks(range(s), [_label(t) for t in key_tokens], rotation=90, fontsize=8)
    fig.colorbar(image, ax=list(axes), label="weight", shrink=min(0.6, 2.5 / n_layers))
    fig.suptitle(f"where {query!r} looks (each panel a layer, each row a head)", fontsize=11)
    return _finish(fig, path)


def _overlay(
    ax: Axes, image: np.ndarray, attention: np.ndarray, grid: tuple[int, int], title: str
) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0))
    heat = attention.reshape(grid)  # (rows, cols): one cell per patch
    ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_image_attention(
    image: np.ndarray,
    attention: Sequence[Tensor | np.ndarray] | Tensor | np.ndarray,
    grid: tuple[int, int],
    *,
    titles: Sequence[str] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Attention over a ViT's patches, laid over the image (one panel per map).

    Args:
        image: (h, w) grey or (h, w, 3) RGB, floats in [0, 1].
        attention: one map or several, each (N,) = (rows * cols,) weights over the patches in
            row-major order (e.g. the [CLS] row without its [CLS] column, or a rollout row).
        grid: patch rows x cols.
        titles: one per map.
        path: also write the figure there as a PNG.
    """
    maps = (
        [attention]
        if isinstance(attention, (Tensor, np.ndarray)) and _np(attention).ndim == 1
        else attention
    )
    arrays = [_np(a) for a in maps]  # each (N,)
    rows, cols = grid
    for a in arrays:
        if a.shape != (rows * cols,):
            raise ValueError(
                f"an attention map has shape {a.shape}, expected ({rows * cols},) for a "
                f"{rows}x{cols} patch grid; drop the [CLS] column first"
            )
    labels = list(titles) if titles is not None else [f"map {i}" for i in range(len(arrays))]
    pic = np.asarray(image, dtype=np.float32)
    fig = Figure(figsize=(2.2 * len(arrays) + 0.3, 2.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(arrays), squeeze=False)[0]
    for ax, a, label in zip(axes, arrays, labels, strict=True):
        _overlay(ax, pic, a, grid, label)
    return _finish(fig, path)


# --8<-- [start:plot_positions]
def plot_sinusoidal(
    n_positions: int = 64, d_model: int = 64, *, path: PathLike | None = None
) -> Figure:
    """The sinusoidal table (N, D): one row per position, one column per dimension."""
    table = sinusoidal_table(n_positions, d_model)  # (N, D)
    fig = Figure(figsize=(6.0, 4.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(_np(table), cmap=DIVERGING_CMAP, vmin=-1, vmax=1, aspect="auto")
    ax.set_xlabel("dimension (pairs: sin, cos; frequency falls to the right)")
    ax.set_ylabel("position")
    ax.set_title(f"sinusoidal encodings, D = {d_model}", fontsize=10)
    fig.colorbar(image, ax=ax)
    return _finish(fig, path)


def plot_learned(
    table: Tensor | np.ndarray,
    *,
    title: str | None = None,
    max_dims: int = 96,
    path: PathLike | None = None,
) -> Figure:
    """A learned position table (N, D) and the cosine similarity of its rows (N, N).

    The table shows its first ``max_dims`` dimensions; the similarity uses all of them.
    """
    t = torch.as_tensor(_np(table))  # (N, D)
    unit = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, D)
    similarity = unit @ unit.T  # (N, N): cos(P_i, P_j)
    fig = Figure(figsize=(9.0, 4.0), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    bound = float(t.abs().flatten().quantile(0.99))  # a few outliers would wash out the rest
    shown = t[:, :max_dims].numpy()  # (N, <= max_dims): enough columns to see the pattern
    left.imshow(shown, cmap=DIVERGING_CMAP, vmin=-bound, vmax=bound, aspect="auto")
    left.set_xlabel(f"dimension (first {shown.shape[1]} of {t.shape[1]})")
    left.set_ylabel("position")
    left.set_title("the table P", fontsize=10)
    image = right.imshow(similarity.numpy(), cmap=DIVERGING_CMAP, vmin=-1, vmax=1)
    right.set_xlabel("position j")
    right.set_ylabel("position i")
    right.set_title("cos(P_i, P_j)", fontsize=10)
    fig.colorbar(image, ax=right)
    if title:
        fig.suptitle(title, fontsize=11)
    return _finish(fig, path)


def plot_rope(
    head_dim: int = 64,
    n_positions: int = 16,
    *,
    pairs: Sequence[int] = (0, 4, 12),
    base: float = 10_000.0,
    path: PathLike | None = None,
) -> Figure:
    """RoPE turning one 2-D pair of a query across positions: pair i turns by theta_i per step.

    Each panel starts from the same point (1, 0) and marks its rotation at positions
    0 .. n_positions - 1; the fast pair 0 goes around the circle, slower pairs barely move.
    Where the steps are wide enough to tell apart, every point carries its position.
    """
    theta = rope_frequencies(head_dim, base=base)  # (E/2,)
    fig = Figure(figsize=(3.0 * len(pairs), 3.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    positions = torch.arange(n_positions, dtype=torch.float64)  # (N,)
    circle = torch.linspace(0, 2 * math.pi, 200)
    for ax, i in zip(axes, pairs, strict=True):
        angles = positions * float(theta[i])  # (N,): p * theta_i
        x, y = torch.cos(angles).numpy(), torch.sin(angles).numpy()
        ax.plot(torch.cos(circle), torch.sin(circle), color="0.85", linewidth=1)
        points = ax.scatter(x, y, c=positions.numpy(), cmap="viridis", s=28, zorder=3)
        # Steps of 0.2 rad or more sit apart on the circle: number every point just outside it.
        # (Joining the points with lines would draw chords across the circle, not the turn.)
        labelled = range(n_positions) if float(theta[i]) >= 0.2 else (0, n_positions - 1)
        for p in labelled:
            ax.text(1.17 * x[p], 1.17 * y[p], str(p), ha="center", va="center", fontsize=7)
        ax.set_aspect("equal")
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"pair {i}: theta = {float(theta[i]):.3g} rad / position", fontsize=9)
    fig.colorbar(points, ax=list(axes), label="position", shrink=0.8)
    return _finish(fig, path)


def plot_alibi(n_heads: int = 4, n_positions: int = 12, *, path: PathLike | None = None) -> Figure:
    """ALiBi's bias (T, T) for each head, under a causal mask (the future left blank).

    Each head has its own colour scale: the slopes differ by a factor of 4 from head to head, so
    on one shared scale every head but the steepest would look flat.
    """
    bias = alibi_bias(n_heads, n_positions, n_positions)  # (H, T, S)
    future = torch.triu(torch.ones(n_positions, n_positions, dtype=torch.bool), 1)  # (T, S)
    shown = bias.masked_fill(future, float("nan"))  # (H, T, S)
    slopes = alibi_slopes(n_heads).tolist()
    fig = Figure(figsize=(3.0 * n_heads + 0.4, 3.1), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n_heads, squeeze=False)[0]
    for h, ax in enumerate(axes):
        low = float(bias[h].min())  # this head's largest penalty, the oldest key of the last row
        image = ax.imshow(_np(shown[h]), cmap="magma", vmin=low, vmax=0.0)
        ax.set_title(f"head {h}: slope 1/{round(1 / slopes[h])}", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        if h == 0:
            ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(image, ax=ax, shrink=0.8, format="%.2g")
        bar.ax.tick_params(labelsize=7)
    fig.suptitle("bias -m (i - j), each head on its own colour scale", fontsize=10)
    return _finish(fig, path)


# --8<-- [end:plot_positions]
