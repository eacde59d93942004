"""Draw the pictures of pages 00 to 03: the bottleneck attention removed, the matrices of one
MiniLM head on the seed sentence, the encoder-decoder with cross-attention, and heads splitting
and merging.

The numbers come from qkv itself: the real all-MiniLM-L6-v2 weights run through qkv's Bert and
``reference_attention`` (checked against the weights qkv's capture records), the masks from
``qkv.masks`` and the shapes from a ``MultiHeadAttention`` run as cross-attention. The diagram of
page 00 is a schematic.

Run from the repository root: ``python docs/figures/concepts.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.patches import FancyBboxPatch, Rectangle

import qkv
from qkv import masks
from qkv.viz.capture import capture_attention

SENTENCE = "The animal didn't cross the street because it was tired."
LAYER, HEAD = 5, 11  # a MiniLM head in which "it" looks at "animal" (page 10)
SHOWN_HEADS = (0, 1, 11)  # the heads drawn when splitting and merging
DIVERGING = "RdBu_r"
WEIGHTS = "Blues"
ENCODER, DECODER, ATTEND = "#dbe8f6", "#fbe3cc", "#e3f1de"  # box fills


# ---- small drawing helpers ----------------------------------------------------------------------
def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, fill: str, **kw) -> None:
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=fill, edgecolor="0.3", linewidth=1))  # fmt: skip
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=kw.get("size", 9))


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], **kw) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "-|>", "color": kw.get("color", "0.25"), "lw": kw.get("lw", 1.0),
        "shrinkA": 2, "shrinkB": 2, "alpha": kw.get("alpha", 1.0),
    })  # fmt: skip


def _matrix(ax: Axes, m: np.ndarray, title: str, *, cmap: str = DIVERGING, aspect="equal"):
    """A matrix as a heatmap with no ticks; signed maps get a symmetric colour range, clipped at
    the 99th percentile (MiniLM's stream has a few huge dimensions that would wash out the rest)."""
    bound = float(np.quantile(np.abs(m), 0.99)) or 1.0
    lo, hi = (0.0, 1.0) if cmap == WEIGHTS else (-bound, bound)
    image = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return image


def _outline_row(ax: Axes, row: int, width: int, colour: str = "#d62728") -> None:
    ax.add_patch(Rectangle((-0.5, row - 0.5), width, 1, fill=False, edgecolor=colour, lw=1.6))


# ---- page 00: the bottleneck ---------------------------------------------------------------------
def draw_bottleneck(path: Path) -> Path:
    """An RNN encoder-decoder squeezing the source into one vector, against Bahdanau attention."""
    source = ["the", "animal", "was", "tired"]
    target = ["l'animal", "était", "fatigué"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.0, 6.4))
    for ax in (top, bottom):
        ax.set_xlim(0, 13)
        ax.set_ylim(0, 4.2)
        ax.set_axis_off()
    # Top: the encoder's last state is all the decoder gets.
    top.set_title("RNN encoder-decoder (2014): the whole source squeezed into one vector c",
                  fontsize=10)  # fmt: skip
    for j, word in enumerate(source):
        x = 0.3 + 1.5 * j
        top.text(x + 0.5, 0.35, word, ha="center", fontsize=9)
        _box(top, x, 1.0, 1.0, 0.8, f"$h_{j + 1}$", ENCODER)
        _arrow(top, (x + 0.5, 0.65), (x + 0.5, 1.0))
        if j:
            _arrow(top, (x - 0.5, 1.4), (x, 1.4))
    _box(top, 6.4, 2.4, 0.9, 0.8, "$c$", "#f3d6d6", size=11)
    _arrow(top, (5.3, 1.8), (6.4, 2.6), color="#d62728", lw=1.6)
    for i, word in enumerate(target):
        x = 8.2 + 1.6 * i
        _box(top, x, 1.0, 1.0, 0.8, f"$s_{i + 1}$", DECODER)
        top.text(x + 0.5, 2.3, word, ha="center", fontsize=9)
        _arrow(top, (x + 0.5, 1.8), (x + 0.5, 2.15))
        _arrow(top, (7.3, 2.8), (x + 0.3, 1.8), color="#d62728", alpha=0.6)
        if i:
            _arrow(top, (x - 0.6, 1.4), (x, 1.4))
    top.text(6.85, 3.55, "fixed size, however long the source", ha="center", fontsize=8,
             color="#d62728")  # fmt: skip
    # Bottom: every encoder state is kept, and each decoder step weighs them.
    bottom.set_title("with attention (Bahdanau, Cho and Bengio 2014): every $h_j$ kept, each "
                     "step weighs them", fontsize=10)  # fmt: skip
    alpha = [0.06, 0.08, 0.82, 0.04]  # made up for the picture: "était" looks at "was"
    for j, word in enumerate(source):
        x = 0.3 + 1.5 * j
        bottom.text(x + 0.5, 0.35, word, ha="center", fontsize=9)
        _box(bottom, x, 1.0, 1.0, 0.8, f"$h_{j + 1}$", ENCODER)
        _arrow(bottom, (x + 0.5, 0.65), (x + 0.5, 1.0))
        if j:
            _arrow(bottom, (x - 0.5, 1.4), (x, 1.4))
        bottom.plot([x + 0.5, 6.85], [1.8, 2.85], color="#2ca02c", lw=0.5 + 6 * alpha[j],
                    alpha=0.8)  # fmt: skip
        lx, ly = x + 0.5 + 0.22 * (6.85 - x - 0.5), 1.8 + 0.22 * 1.05
        bottom.text(lx, ly + 0.12, f"{alpha[j]:.2f}", fontsize=8, color="#2ca02c", ha="center")
    _box(bottom, 6.4, 2.85, 0.9, 0.8, "$c_2$", ATTEND, size=11)
    bottom.text(7.5, 3.25, r"$c_2 = \sum_j \alpha_{2j} h_j$", ha="left", fontsize=9)
    for i, word in enumerate(target):
        x = 8.2 + 1.6 * i
        _box(bottom, x, 1.0, 1.0, 0.8, f"$s_{i + 1}$", DECODER)
        bottom.text(x + 0.5, 2.3, word, ha="center", fontsize=9)
        _arrow(bottom, (x + 0.5, 1.8), (x + 0.5, 2.15))
        if i:
            _arrow(bottom, (x - 0.6, 1.4), (x, 1.4))
    _arrow(bottom, (7.3, 3.1), (9.85, 1.8), color="#2ca02c", lw=1.4)
    bottom.text(10.6, 3.9, r"$\alpha_{2j} = \mathrm{softmax}_j\, v^\top\tanh(W s_1 + U h_j)$",
                ha="center", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- MiniLM on the seed sentence -----------------------------------------------------------------
def minilm_layer_inputs(layer: int = LAYER):
    """MiniLM, the tokens of the seed sentence, and what its ``layer``'s self-attention reads.

    Returns:
        (model, tokens, x (1, T, D), captured weights (L, H, T, T)).
    """
    model, tokenizer = qkv.from_pretrained("minilm", return_tokenizer=True)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoding = tokenizer.encode(SENTENCE)
    ids = torch.tensor([encoding.ids])  # (B, T)
    seen: dict[str, torch.Tensor] = {}
    attention = model.layers[layer].self_attn
    hook = attention.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach()))
    try:
        maps = capture_attention(model, input_ids=ids, tokens=encoding.tokens)["self"]
    finally:
        hook.remove()
    return model, list(encoding.tokens), seen["x"], maps.weights


def head_tensors(attention: qkv.MultiHeadAttention, x: torch.Tensor):
    """q, k, v (B, H, T, E) of a self-attention module on x (B, T, D), split into heads."""
    q = split_heads(attention.q_proj(x), attention.n_heads)  # (B, H, T, E)
    k = split_heads(attention.k_proj(x), attention.n_heads)  # (B, H, T, E)
    v = split_heads(attention.v_proj(x), attention.n_heads)  # (B, H, T, E)
    return q, k, v


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H * E) -> (B, H, T, E): column block h of the projection is head h."""
    b, t, width = x.shape
    return x.view(b, t, n_heads, width // n_heads).transpose(1, 2)  # (B, H, T, E)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, E) -> (B, T, H * E): the heads' outputs side by side again."""
    b, h, t, e = x.shape
    return x.transpose(1, 2).reshape(b, t, h * e)  # (B, T, H * E)


def draw_it_shapes(path: Path, model, tokens: list[str], x, captured) -> Path:
    """Q, K^T, the scores, the weights, V and the output of one MiniLM head, with their shapes."""
    attention = model.layers[LAYER].self_attn
    with torch.no_grad():
        q, k, v = head_tensors(attention, x)  # (1, H, T, E) each
        out, weights = qkv.reference_attention(q, k, v)  # (1, H, T, E), (1, H, T, T)
    # The same weights as those the model's own forward pass recorded.
    assert torch.allclose(weights[0], captured[LAYER], atol=1e-5)
    t, e = q.shape[-2], q.shape[-1]
    qh, kh, vh, oh = (m[0, HEAD].numpy() for m in (q, k, v, out))  # (T, E) each
    scores = qh @ kh.T / np.sqrt(e)  # (T, T)
    wh = weights[0, HEAD].numpy()  # (T, T)
    it, animal = tokens.index("it"), tokens.index("animal")
    fig, grid = plt.subplots(2, 3, figsize=(12.0, 8.6), layout="constrained")
    axes = list(grid.flat)
    auto = {"aspect": "auto"}
    _matrix(axes[0], qh, f"1. Q = X W_Q   (T, E) = ({t}, {e})", **auto)
    _matrix(axes[1], kh.T, f"2. K transposed   (E, T) = ({e}, {t})", **auto)
    _matrix(axes[2], scores, f"3. scores Q K^T / sqrt(E)   (T, T) = ({t}, {t})", **auto)
    image = _matrix(axes[3], wh, "4. weights = softmax of each row   (T, T)", cmap=WEIGHTS, **auto)
    _matrix(axes[4], vh, f"5. V = X W_V   (T, E) = ({t}, {e})", **auto)
    _matrix(axes[5], oh, f"6. output = weights V   (T, E) = ({t}, {e})", **auto)
    for ax in (axes[0], axes[2], axes[3], axes[4], axes[5]):
        ax.set_yticks(range(t), tokens, fontsize=8)
    for ax in (axes[1], axes[2], axes[3]):
        ax.set_xticks(range(t), tokens, rotation=90, fontsize=8)
    axes[0].set_xlabel(f"E = {e} columns", fontsize=8)
    for ax, width in ((axes[0], e), (axes[2], t), (axes[3], t), (axes[5], e)):
        _outline_row(ax, it, width)
    axes[3].add_patch(Rectangle((animal - 0.5, it - 0.5), 1, 1, fill=False, edgecolor="#ff7f0e",
                                lw=2.0))  # fmt: skip
    fig.colorbar(image, ax=axes[3], shrink=0.8, label="weight")
    fig.suptitle(
        f"MiniLM layer {LAYER}, head {HEAD} on the seed sentence: the row of 'it' outlined; "
        f"its weight on 'animal' is {wh[it, animal]:.2f}",
        fontsize=11,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- page 02: encoder, decoder and cross-attention ---------------------------------------------
def draw_cross_attention(path: Path) -> Path:
    """The data flow of an encoder-decoder and the three masks its attentions use."""
    source = ["the", "animal", "was", "tired", "</s>"]
    target = ["<s>", "l'animal", "était"]
    s, t, d = len(source), len(target), 16
    torch.manual_seed(0)
    cross = qkv.MultiHeadAttention(d_model=d, n_heads=2)
    cross.capture_weights = True
    with torch.no_grad():
        out = cross(torch.randn(1, t, d), context=torch.randn(1, s, d))  # (B, T, D)
    weights_shape = tuple(cross.last_weights.shape)  # (B, H, T, S)
    assert out.shape == (1, t, d) and weights_shape == (1, 2, t, s)

    fig = plt.figure(figsize=(12.0, 5.0))
    grid = fig.add_gridspec(3, 2, width_ratios=[3.2, 1.0], hspace=0.9, wspace=0.15)
    ax = fig.add_subplot(grid[:, 0])
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 7.2)
    ax.set_axis_off()
    ax.text(0.2, 0.3, "source: " + " ".join(source), fontsize=9)
    _box(ax, 0.3, 1.0, 4.4, 0.8, "embeddings + positions   (S, D)", ENCODER)
    _box(ax, 0.3, 2.4, 4.4, 1.6, "N x encoder layer\nself-attention (every key)\n+ feed-forward",
         ENCODER)  # fmt: skip
    _box(ax, 0.3, 4.6, 4.4, 0.8, "memory: the source encoded   (S, D)", ENCODER)
    for y0, y1 in ((0.6, 1.0), (1.8, 2.4), (4.0, 4.6)):
        _arrow(ax, (2.5, y0), (2.5, y1))
    ax.text(7.0, 0.3, "target so far: " + " ".join(target), fontsize=9)
    _box(ax, 6.8, 1.0, 4.8, 0.8, "embeddings + positions   (T, D)", DECODER)
    _box(ax, 6.8, 2.2, 4.8, 0.8, "masked self-attention (causal)", DECODER)
    _box(ax, 6.8, 3.4, 4.8, 1.2, "cross-attention\nqueries: decoder (T, D)\nkeys, values: memory "
         "(S, D)", ATTEND, size=8.5)  # fmt: skip
    _box(ax, 6.8, 5.0, 4.8, 0.8, "feed-forward       (N x this layer)", DECODER)
    _box(ax, 6.8, 6.2, 4.8, 0.7, "linear + softmax: the next token", DECODER)
    for y0, y1 in ((0.6, 1.0), (1.8, 2.2), (3.0, 3.4), (4.6, 5.0), (5.8, 6.2)):
        _arrow(ax, (9.2, y0), (9.2, y1))
    _arrow(ax, (4.7, 5.0), (6.8, 4.0), color="#2ca02c", lw=2.0)
    ax.text(5.75, 4.95, "K, V", color="#2ca02c", fontsize=9, ha="center")
    ax.set_title(
        f"an encoder-decoder: cross-attention weights are (B, H, T, S) = {weights_shape}",
        fontsize=10,
    )
    panels = [
        ("encoder self-attention (S, S)", torch.ones(s, s, dtype=torch.bool), source, source),
        ("decoder self-attention (T, T): causal", masks.causal(t), target, target),
        ("cross-attention (T, S): every source key", torch.ones(t, s, dtype=torch.bool), target,
         source),
    ]  # fmt: skip
    for row, (title, mask, rows, cols) in enumerate(panels):
        m = fig.add_subplot(grid[row, 1])
        m.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1.6)
        m.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
        m.set_yticks(range(len(rows)), rows, fontsize=6)
        m.set_title(title, fontsize=8)
    fig.text(0.86, 0.01, "grey: may attend (True)", fontsize=8, ha="center")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- page 03: splitting and merging heads ------------------------------------------------------
def draw_split_merge(path: Path, model, tokens: list[str], x) -> Path:
    """One MiniLM layer: x W_Q cut into H slices, each head attends, the outputs side by side
    again, then W_O."""
    attention = model.layers[LAYER].self_attn
    h, e = attention.n_heads, attention.head_dim
    with torch.no_grad():
        q, k, v = head_tensors(attention, x)  # (1, H, T, E)
        out, weights = qkv.reference_attention(q, k, v)  # (1, H, T, E), (1, H, T, T)
        merged = merge_heads(out)  # (1, T, H * E)
        projected = attention.out_proj(merged)  # (1, T, D)
        assert torch.allclose(projected, attention(x), atol=1e-4)  # the module does just this
    t, d = x.shape[1], x.shape[2]
    qflat = merge_heads(q)[0].numpy()  # (T, H * E)
    fig = plt.figure(figsize=(13.0, 6.2))
    grid = fig.add_gridspec(2, 5, width_ratios=[3, 3, 1, 1, 1], hspace=0.45, wspace=0.25)
    wide = {"aspect": "auto"}
    _matrix(fig.add_subplot(grid[0, 0]), x[0].numpy(), f"x   (T, D) = ({t}, {d})", **wide)
    ax = fig.add_subplot(grid[0, 1])
    _matrix(ax, qflat, f"q = x W_Q   (T, H E) = ({t}, {h} x {e})", **wide)
    for cut in range(1, h):
        ax.axvline(cut * e - 0.5, color="black", lw=0.8)
    ax.set_xlabel("split: one slice of E columns per head", fontsize=8)
    for i, head in enumerate(SHOWN_HEADS):
        a = fig.add_subplot(grid[0, 2 + i])
        _matrix(a, q[0, head].numpy(), f"q, head {head}\n(T, E) = ({t}, {e})", **wide)
        w = fig.add_subplot(grid[1, 2 + i])
        _matrix(w, weights[0, head].numpy(), f"weights, head {head}\n(T, T)", cmap=WEIGHTS)
    ax = fig.add_subplot(grid[1, 1])
    _matrix(ax, merged[0].numpy(), "merged: heads side by side   (T, H E)", **wide)
    for cut in range(1, h):
        ax.axvline(cut * e - 0.5, color="black", lw=0.8)
    ax.set_xlabel("each slice: one head's weights times its values", fontsize=8)
    _matrix(fig.add_subplot(grid[1, 0]), projected[0].numpy(),
            f"output = merged W_O   (T, D) = ({t}, {d})", **wide)  # fmt: skip
    fig.suptitle(
        f"MiniLM layer {LAYER} on the seed sentence: {h} heads of E = {e} (heads "
        f"{', '.join(map(str, SHOWN_HEADS))} shown); read the top row left to right, the "
        "bottom row right to left",
        fontsize=10,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    model, tokens, x, captured = minilm_layer_inputs()
    return [
        draw_bottleneck(out / "00-bottleneck.png"),
        draw_it_shapes(out / "01-it-shapes.png", model, tokens, x, captured),
        draw_cross_attention(out / "02-cross-attention.png"),
        draw_split_merge(out / "03-split-merge.png", model, tokens, x),
    ]


if __name__ == "__main__":
    for path in main():
        print(path)
