"""Draw the pictures of pages 05 and 06: post-norm against pre-norm, and each family's stack.

The norm picture measures qkv's own ``EncoderLayer`` stacked 12 deep, once post-norm and once
pre-norm: the size of the residual stream after each layer, and the gradient each layer gets at
initialisation. The stacks are read off qkv's models: each family is built at its ``tiny`` preset
and its first layer says which norm, where it sits, which feed-forward network and which
positions it uses; the sizes are those of the family's best-known preset.

Run from the repository root: ``python docs/figures/architectures.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.patches import FancyBboxPatch
from torch import nn

import qkv
from qkv.blocks import EncoderLayer
from qkv.models import bert, gpt, llama, t5, transformer, vit

ENCODER, DECODER, NORM, OTHER = "#dbe8f6", "#fbe3cc", "#efe3f6", "#eeeeee"
POST, PRE = "#1f77b4", "#ff7f0e"
ACTIVATION_NAMES = {"relu": "ReLU", "gelu": "GELU", "gelu_tanh": "GELU (tanh)", "silu": "SiLU"}


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, fill: str, size=8) -> None:
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=fill, edgecolor="0.3", linewidth=1))  # fmt: skip
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], color="0.25") -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>", "color": color,
                                                      "shrinkA": 1, "shrinkB": 1})  # fmt: skip


# ---- page 05: post-norm and pre-norm -----------------------------------------------------------
def measure_norms(depth: int = 12, d: int = 64) -> dict[bool, tuple[list[float], list[float]]]:
    """For post-norm (False) and pre-norm (True) stacks of ``EncoderLayer``: the RMS of the
    stream after each layer, and the gradient norm of each layer's parameters at initialisation
    (loss: mean squared error against a random target, after a final norm for pre-norm)."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, d)  # (B, T, D)
    target = torch.randn(8, 16, d)  # (B, T, D)
    found = {}
    for norm_first in (False, True):
        torch.manual_seed(1)
        stack = nn.ModuleList(
            EncoderLayer(d, 4, 4 * d, norm_first=norm_first) for _ in range(depth)
        )
        final = qkv.LayerNorm(d) if norm_first else nn.Identity()  # pre-norm models add one
        h, rms = x, []
        for layer in stack:
            h = layer(h)  # (B, T, D)
            rms.append(h.detach().pow(2).mean().sqrt().item())
        (final(h) - target).pow(2).mean().backward()
        grads = [
            torch.sqrt(sum(p.grad.pow(2).sum() for p in layer.parameters())).item()
            for layer in stack
        ]
        found[norm_first] = (rms, grads)
    return found


def _residual_diagram(ax: Axes, x0: float, pre: bool) -> None:
    """One residual sublayer, post-norm or pre-norm, drawn bottom to top."""
    colour = PRE if pre else POST
    ax.text(x0 + 1.0, 6.55, "pre-norm (GPT-2, T5, LLaMA)" if pre else "post-norm (2017, BERT)",
            ha="center", fontsize=9, color=colour, weight="bold")  # fmt: skip
    ax.text(x0 + 1.0, 0.1, "$x_l$", ha="center", fontsize=10)
    ax.plot([x0 + 1.0, x0 + 1.0], [0.45, 1.0], color="0.25")
    ax.plot([x0 + 1.0, x0 + 0.15, x0 + 0.15], [1.0, 1.0, 4.6], color=colour, lw=2)  # identity
    ax.text(x0 + 0.05, 2.8, "identity", rotation=90, ha="right", va="center", fontsize=7,
            color=colour)  # fmt: skip
    if pre:
        _box(ax, x0 + 0.55, 1.4, 1.1, 0.6, "Norm", NORM)
        _box(ax, x0 + 0.55, 2.6, 1.1, 1.0, "attention\nor MLP", OTHER)
        _arrow(ax, (x0 + 1.1, 1.0), (x0 + 1.1, 1.4))
        _arrow(ax, (x0 + 1.1, 2.0), (x0 + 1.1, 2.6))
        _arrow(ax, (x0 + 1.1, 3.6), (x0 + 1.1, 4.45))
        ax.text(x0 + 1.1, 4.6, "+", ha="center", va="center", fontsize=14)
        ax.plot([x0 + 0.15, x0 + 0.95], [4.6, 4.6], color=colour, lw=2)
        _arrow(ax, (x0 + 1.1, 4.75), (x0 + 1.1, 6.2))
        ax.text(x0 + 1.25, 5.4, "$x_{l+1} = x_l + F(\\mathrm{Norm}(x_l))$", fontsize=8)
    else:
        _box(ax, x0 + 0.55, 1.4, 1.1, 1.0, "attention\nor MLP", OTHER)
        _arrow(ax, (x0 + 1.1, 1.0), (x0 + 1.1, 1.4))
        _arrow(ax, (x0 + 1.1, 2.4), (x0 + 1.1, 4.45))
        ax.text(x0 + 1.1, 4.6, "+", ha="center", va="center", fontsize=14)
        ax.plot([x0 + 0.15, x0 + 0.95], [4.6, 4.6], color=colour, lw=2)
        _box(ax, x0 + 0.55, 5.1, 1.1, 0.6, "Norm", NORM)
        _arrow(ax, (x0 + 1.1, 4.75), (x0 + 1.1, 5.1))
        _arrow(ax, (x0 + 1.1, 5.7), (x0 + 1.1, 6.2))
        ax.text(x0 + 1.25, 3.3, "$x_{l+1} = \\mathrm{Norm}(x_l + F(x_l))$", fontsize=8)


def draw_norms(path: Path) -> Path:
    found = measure_norms()
    fig = plt.figure(figsize=(13.0, 4.4), layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[1.5, 1, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.set_xlim(-0.3, 6.3)
    ax.set_ylim(0, 6.9)
    ax.set_axis_off()
    _residual_diagram(ax, 0.0, pre=False)
    _residual_diagram(ax, 3.3, pre=True)
    layers = range(1, len(found[False][0]) + 1)
    rms_ax, grad_ax = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2])
    for pre, colour, label in ((False, POST, "post-norm"), (True, PRE, "pre-norm")):
        rms, grads = found[pre]
        rms_ax.plot(layers, rms, "o-", color=colour, label=label, ms=4)
        grad_ax.plot(layers, grads, "o-", color=colour, label=label, ms=4)
    rms_ax.set_title("size of the stream after each layer\n(RMS; the input's is 1)", fontsize=9)
    grad_ax.set_title("gradient of each layer's weights\nat initialisation", fontsize=9)
    for a in (rms_ax, grad_ax):
        a.set_xlabel("layer (12 random EncoderLayers, D = 64)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
        a.set_ylim(bottom=0)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- page 06: each family's stack --------------------------------------------------------------
class Stack(NamedTuple):
    """What one family's diagram shows, read from a model built by qkv."""

    name: str
    inputs: str
    embedding: str
    positions: str
    embed_norm: bool
    layers: list[tuple[str, list[str], str]]  # (title, lines, fill) per stack, left to right
    final_norm: str
    head: str


def _positions(model: nn.Module) -> str:
    kinds = {type(m).__name__ for m in model.modules()}
    if "RotaryEmbedding" in kinds:
        return "no position vectors;\nRoPE turns q and k"
    if "T5RelativeBias" in kinds:
        return "no position vectors;\nrelative bias on scores"
    if "SinusoidalPositionalEncoding" in kinds:
        return "+ sinusoidal positions"
    if "LearnedPositionalEmbedding" in kinds:
        return "+ learned positions"
    return "no positions"


def _layer_lines(layer: nn.Module, causal: bool) -> list[str]:
    spec = layer.spec
    attn = "masked self-attention" if causal else "self-attention (both ways)"
    lines = [attn]
    if getattr(layer, "cross_attn", None) is not None:
        lines.append("cross-attention")
    if spec.gated:
        lines.append(f"gated MLP ({'SwiGLU' if spec.activation == 'silu' else spec.activation})")
    else:
        lines.append(f"MLP, {ACTIVATION_NAMES.get(spec.activation, spec.activation)}")
    norm = type(layer.attn_norm).__name__
    lines.append(f"{norm}, {'pre' if spec.norm_first else 'post'}-norm")
    return lines


def _sizes(config, layers: str) -> str:
    return f"{getattr(config, layers)} layers\nD = {config.d_model}, H = {config.n_heads}"


def read_stacks() -> list[Stack]:
    """Build every family at its tiny preset and read its stack off the modules."""
    torch.manual_seed(0)
    gpt_m, bert_m = qkv.GPT(gpt.PRESETS["tiny"]), qkv.Bert(bert.PRESETS["tiny"])
    t5_m, llama_m = qkv.T5(t5.PRESETS["tiny"]), qkv.Llama(llama.PRESETS["tiny"])
    vit_m, tr_m = qkv.ViT(vit.PRESETS["tiny"]), qkv.Transformer(transformer.PRESETS["tiny"])
    big = {
        "tr": transformer.PRESETS["transformer-base"], "bert": bert.PRESETS["bert-base"],
        "gpt": gpt.PRESETS["gpt2"], "t5": t5.PRESETS["t5-small"],
        "llama": llama.PRESETS["llama2-7b"], "vit": vit.PRESETS["vit-base-patch16-224"],
    }  # fmt: skip

    def final(model: nn.Module) -> str:
        names = [n for n, m in model.named_children() if n.endswith("norm") and n != "emb_norm"]
        return type(getattr(model, names[0])).__name__ if names else ""

    def head(model: nn.Module, embedding: str) -> str:
        tied = model.lm_head.weight is getattr(model, embedding).weight
        return "linear to V" + (" (tied to the embedding)" if tied else "") + "\nnext token"

    return [
        Stack("Transformer (2017)", "source | target tokens", "token embedding",
              _positions(tr_m), False,
              [(f"encoder: {_sizes(big['tr'], 'n_encoder_layers')}",
                _layer_lines(tr_m.encoder[0], causal=False), ENCODER),
               (f"decoder: {big['tr'].n_decoder_layers} layers",
                _layer_lines(tr_m.decoder[0], causal=True), DECODER)],
              final(tr_m), head(tr_m, "src_emb")),
        Stack("BERT", "tokens + segments", "token + segment embedding", _positions(bert_m), True,
              [(f"encoder: {_sizes(big['bert'], 'n_layers')}",
                _layer_lines(bert_m.layers[0], causal=False), ENCODER)],
              final(bert_m), "masked-LM head, or a\nclassifier on [CLS]"),
        Stack("GPT-2", "tokens", "token embedding", _positions(gpt_m), False,
              [(f"decoder: {_sizes(big['gpt'], 'n_layers')}",
                _layer_lines(gpt_m.layers[0], causal=True), DECODER)],
              final(gpt_m), head(gpt_m, "tok_emb")),
        Stack("T5", "source | target tokens", "token embedding", _positions(t5_m), False,
              [(f"encoder: {_sizes(big['t5'], 'n_layers')}",
                _layer_lines(t5_m.encoder_layers[0], causal=False), ENCODER),
               (f"decoder: {big['t5'].n_layers} layers",
                _layer_lines(t5_m.decoder_layers[0], causal=True), DECODER)],
              final(t5_m), head(t5_m, "tok_emb")),
        Stack("LLaMA 2", "tokens", "token embedding", _positions(llama_m), False,
              [(f"decoder: {_sizes(big['llama'], 'n_layers')}",
                _layer_lines(llama_m.layers[0], causal=True), DECODER)],
              final(llama_m), head(llama_m, "tok_emb")),
        Stack("ViT", "16 x 16 patches + [CLS]", "linear map of each patch",
              _positions(vit_m), False,
              [(f"encoder: {_sizes(big['vit'], 'n_layers')}",
                _layer_lines(vit_m.layers[0], causal=False), ENCODER)],
              final(vit_m), "classifier on [CLS]"),
    ]  # fmt: skip


def draw_stacks(path: Path) -> Path:
    stacks = read_stacks()
    widths = [2.0 * len(s.layers) + 0.4 for s in stacks]
    fig = plt.figure(figsize=(0.95 * sum(widths), 6.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, sum(widths))
    ax.set_ylim(-0.3, 9.4)
    ax.set_axis_off()
    x0 = 0.0
    for stack, width in zip(stacks, widths, strict=True):
        n = len(stack.layers)
        inner = width - 0.4
        left, mid = x0 + 0.2, x0 + width / 2
        ax.text(mid, 9.0, stack.name, ha="center", fontsize=11, weight="bold")
        ax.text(mid, 0.0, stack.inputs, ha="center", fontsize=8)
        embed = f"{stack.embedding}\n{stack.positions}" + (
            "\nthen LayerNorm" if stack.embed_norm else ""
        )
        _box(ax, left, 0.6, inner, 1.0, embed, OTHER, size=7.5)
        for i, (title, lines, fill) in enumerate(stack.layers):
            bx = left + i * 2.0
            _box(ax, bx + 0.05, 2.2, 1.8, 3.8, "\n".join(lines), fill, size=7.5)
            ax.text(bx + 0.95, 5.85, title, ha="center", va="top", fontsize=7, weight="bold")
            _arrow(ax, (bx + 0.95, 1.6), (bx + 0.95, 2.2))
        if n == 2:  # the encoder's output feeds the decoder's cross-attention
            _arrow(ax, (left + 1.9, 5.2), (left + 2.05, 4.4), color="#2ca02c")
        top = left + (n - 1) * 2.0  # the stack the head sits on
        y = 6.6
        if stack.final_norm and n == 2:  # an encoder-decoder normalises both stacks' outputs
            _box(ax, left + 0.25, y, 1.4, 0.55, f"final {stack.final_norm}", NORM, size=7.5)
            _arrow(ax, (left + 0.95, 6.0), (left + 0.95, y))
        if stack.final_norm:
            _box(ax, top + 0.25, y, 1.4, 0.55, f"final {stack.final_norm}", NORM, size=7.5)
            _arrow(ax, (top + 0.95, 6.0), (top + 0.95, y))
            y += 0.55
        _box(ax, top + 0.05, 7.55, 1.8, 1.0, stack.head, OTHER, size=7)
        _arrow(ax, (top + 0.95, y), (top + 0.95, 7.55))
        x0 += width
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    return [draw_norms(out / "05-post-pre-norm.png"), draw_stacks(out / "06-stacks.png")]


if __name__ == "__main__":
    for path in main():
        print(path)
