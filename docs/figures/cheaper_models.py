"""Draw the pictures of docs/learn/13-cheaper-models.md.

    13-routing.png        one token through a mixture of experts: the router's logits, its top 2
                          of 8 experts, their gates and the weighted sum (a seeded
                          ``MixtureOfExperts``, numbers from ``route``)
    13-expert-load.png    tokens per expert of a small ``MixtureOfExperts`` on a toy regression
                          task: at the start, and after 300 steps without and with the
                          load-balancing loss (``plot_expert_load``; a few seconds on one core)
    13-quant-errors.png   the quantisation errors of a real weight matrix (all-MiniLM-L6-v2's
                          first up-projection, 1536 x 384) in int8 per channel and int4 per group

The fourth picture of the page, ``13-expert-load-gpt-char.png``, is a real training run's
``experts.png``, copied there by ``benchmarks/moe.py --figure``.

Run from the repository root: ``python docs/figures/cheaper_models.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.patches import Circle, FancyBboxPatch
from matplotlib.ticker import MaxNLocator
from torch import Tensor

import qkv
from qkv.blocks.moe import MixtureOfExperts, route
from qkv.blocks.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from qkv.viz.moe import plot_expert_load

# The toy mixture of experts of 13-expert-load: D = 16, 8 experts of width 32, top 2.
D, N_EXPERTS, TOP_K, D_FF = 16, 8, 2, 32
STEPS, BATCH, LR = 300, 256, 3e-3
AUX_COEFS = (0.0, 0.01, 0.1)  # Switch uses 0.01
MATRIX = "layers.0.mlp.up_proj"  # the MiniLM matrix of 13-quant-errors, (1536, 384)
CHOSEN, OTHER, ROUTER = "#fbe3cc", "#eeeeee", "#dbe8f6"  # box fills


# ---- small drawing helpers ----------------------------------------------------------------------
def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, fill: str, **kw) -> None:
    """A rounded box with centred text; (x, y) is the lower-left corner."""
    edge = kw.get("edge", "0.3")
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=fill, edgecolor=edge, linewidth=1))  # fmt: skip
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=kw.get("size", 9),
            color=kw.get("color", "black"))  # fmt: skip


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], **kw) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "-|>", "color": kw.get("color", "0.25"), "lw": kw.get("lw", 1.0),
        "shrinkA": 2, "shrinkB": 2,
    })  # fmt: skip


# ---- 13-routing: one token, its router, its two experts -----------------------------------------
def draw_routing(path: Path) -> Path:
    torch.manual_seed(0)
    moe = MixtureOfExperts(D, D_FF, N_EXPERTS, top_k=TOP_K)
    x = torch.randn(1, D)  # (N, D): one token
    with torch.no_grad():
        logits = moe.router(x)  # (N, X)
        gates, chosen = route(logits, TOP_K)  # (N, k) each
    logits_1, gates_1 = logits[0].tolist(), gates[0].tolist()
    picked = chosen[0].tolist()

    fig, ax = plt.subplots(figsize=(11.5, 4.6))
    ax.set_xlim(0, 14)
    ax.set_ylim(0, 8.4)
    ax.set_axis_off()
    _box(ax, 0.1, 3.6, 1.6, 1.0, "token x\n(D)", ROUTER)
    _box(ax, 2.2, 3.6, 1.9, 1.0, "router\n" + r"logits = $x\,W_r$", ROUTER)
    _arrow(ax, (1.7, 4.1), (2.2, 4.1))
    # The router's X logits as bars, the k largest coloured.
    bars = ax.inset_axes((5.2, 2.9, 2.4, 2.6), transform=ax.transData)
    colors = ["tab:orange" if e in picked else "0.7" for e in range(N_EXPERTS)]
    bars.bar(range(N_EXPERTS), logits_1, color=colors)
    bars.axhline(0, color="0.3", lw=0.6)
    bars.set_xticks(range(N_EXPERTS))
    bars.tick_params(labelsize=7)
    bars.set_xlabel("expert", fontsize=8)
    bars.set_title(f"X = {N_EXPERTS} logits, top {TOP_K} kept", fontsize=8)
    _arrow(ax, (4.1, 4.1), (4.55, 4.1))
    ax.text(6.4, 1.6, "gates: softmax over the k kept logits\n" + "   ".join(
        f"$g_{e}$ = {g:.2f}" for e, g in zip(picked, gates_1, strict=True)), ha="center",
        va="center", fontsize=8.5)  # fmt: skip
    # The experts: the chosen ones work, the others skip this token.
    ys = [7.6 - 0.95 * e for e in range(N_EXPERTS)]  # top to bottom
    for e, y in enumerate(ys):
        on = e in picked
        _box(ax, 8.5, y - 0.35, 1.6, 0.7, f"FFN {e}", CHOSEN if on else OTHER,
             color="black" if on else "0.55", edge="0.3" if on else "0.7", size=8.5)  # fmt: skip
        if on:
            _arrow(ax, (7.5, 4.1), (8.5, y), color="tab:orange", lw=1.6)
    plus = (11.4, 4.1)
    ax.add_patch(Circle(plus, 0.3, facecolor="white", edgecolor="0.3"))
    ax.text(*plus, "+", ha="center", va="center", fontsize=13)
    for e in picked:
        y = ys[e]
        _arrow(ax, (10.1, y), (plus[0] - 0.3, plus[1]), color="tab:orange", lw=1.6)
        above = y >= plus[1] + 0.5
        ax.text(10.2, y + (0.25 if above else -0.55), f"times $g_{e}$", fontsize=8.5,
                color="tab:orange")  # fmt: skip
    _box(ax, 12.0, 3.4, 1.95, 1.4, "output (D)\n" + r"$\sum_j g_j\, \mathrm{FFN}_{i_j}(x)$",
         ROUTER, size=8.5)  # fmt: skip
    _arrow(ax, (plus[0] + 0.3, plus[1]), (12.0, 4.1))
    ax.text(9.3, 0.1, f"{N_EXPERTS - TOP_K} of {N_EXPERTS} experts do no work for this token",
            ha="center", fontsize=8.5, color="0.4")  # fmt: skip
    ax.set_title(
        f"one token through a mixture of experts: top-{TOP_K} of {N_EXPERTS} (Mixtral's routing)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- 13-expert-load: a router before and after training, with and without balancing ------------
def toy_batch(g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """n tokens (n, D) from 8 clusters that share one offset, and targets (n, D): a different
    linear map of the token for each cluster, so that experts have something to specialise in."""
    centres = torch.randn(8, D, generator=torch.Generator().manual_seed(1))  # (8, D)
    maps = torch.randn(8, D, D, generator=torch.Generator().manual_seed(2)) / D**0.5  # (8, D, D)
    cluster = torch.randint(0, 8, (n,), generator=g)  # (n,)
    # The common offset (+2) makes the tokens alike, as the hidden states of a fresh model are:
    # a random router then sends most of them to the same few experts.
    x = centres[cluster] + 0.3 * torch.randn(n, D, generator=g) + 2.0  # (n, D)
    y = torch.einsum("nij,nj->ni", maps[cluster], x)  # (n, D)
    return x, y


def train_toy(aux_coef: float) -> tuple[Tensor, Tensor, float]:
    """Tokens per expert on 4096 held-out tokens before and after training (X,) each, and the
    held-out mean squared error after; the same start for every ``aux_coef``."""
    torch.manual_seed(0)
    moe = MixtureOfExperts(D, D_FF, N_EXPERTS, top_k=TOP_K)
    x_held, y_held = toy_batch(torch.Generator().manual_seed(9), 4096)
    with torch.no_grad():
        before = moe.forward_with_losses(x_held[None]).stats.tokens_per_expert  # (X,)
    optimizer = torch.optim.Adam(moe.parameters(), lr=LR)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x, y = toy_batch(g, BATCH)
        out = moe.forward_with_losses(x[None])
        loss = (out.output[0] - y).square().mean() + aux_coef * out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = moe.forward_with_losses(x_held[None])
        mse = float((out.output[0] - y_held).square().mean())
    return before, out.stats.tokens_per_expert, mse


def draw_expert_load(path: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and the same everywhere
    try:
        runs = {coef: train_toy(coef) for coef in AUX_COEFS}
    finally:
        torch.set_num_threads(threads)
    start = runs[AUX_COEFS[0]][0]
    rows, labels = [start], ["at the start"]
    for coef, (_, after, mse) in runs.items():
        rows.append(after)
        labels.append(f"{STEPS} steps, c_aux = {coef:g}\n(held-out MSE {mse:.3f})")
    fig = plot_expert_load(
        torch.stack(rows),
        title=f"share of the top-{TOP_K} choices of 4096 tokens per expert "
        f"(max 1/{TOP_K}: picked by every token)",
    )
    fig.set_size_inches(8.2, 3.6)
    fig.axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    fig.savefig(path, dpi=110)
    return path


# ---- 13-quant-errors: int8 and int4 on a real matrix --------------------------------------------
def draw_quant_errors(path: Path) -> Path:
    model = qkv.from_pretrained("minilm")
    weight = model.get_submodule(MATRIX).weight.detach().float()  # (N, K) = (1536, 384)
    q8, s8 = quantize_int8(weight)
    errors = {"int8, one scale per row": dequantize_int8(q8, s8) - weight}
    for group in (128, 32):
        q4, s4, m4 = quantize_int4(weight, group)
        errors[f"int4, groups of {group}"] = dequantize_int4(q4, s4, m4) - weight
    fig, (w_ax, e8_ax, e4_ax) = plt.subplots(1, 3, figsize=(13, 3.9))
    w_ax.hist(weight.flatten().numpy(), bins=120, color="0.5")
    w_ax.set_title(f"the weights W ({weight.shape[0]} x {weight.shape[1]})\n"
                   f"std {weight.std():.3f}, largest |w| {weight.abs().max():.2f}",
                   fontsize=9)  # fmt: skip
    w_ax.set_xlabel("w")
    for ax, names in ((e8_ax, list(errors)[:1]), (e4_ax, list(errors)[1:])):
        for name, color in zip(names, ("tab:blue", "tab:orange"), strict=False):
            e = errors[name]
            relative = float(e.norm() / weight.norm())
            ax.hist(e.flatten().numpy(), bins=120, histtype="step", color=color, lw=1.3,
                    label=f"{name}\nmean |error| {e.abs().mean():.4f}\n"
                    f"||error|| / ||W|| = {relative:.1%}")  # fmt: skip
        ax.set_xlabel("quantised w minus w")
        ax.set_ylim(0.5, 1e7)  # room above the histograms for the legend
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.legend(fontsize=7, loc="upper left", frameon=False, ncols=len(names))
    e8_ax.set_title("int8: error within half a step, 1/254 of the row's largest |w|", fontsize=9)
    e4_ax.set_title("int4: 16 levels per group, smaller groups finer", fontsize=9)
    for ax in (w_ax, e8_ax, e4_ax):
        ax.set_yscale("log", nonpositive="clip")
        ax.set_ylabel("count")
        ax.grid(alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2, {MATRIX}.weight: round-to-nearest, no calibration",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    return [
        draw_routing(out / "13-routing.png"),
        draw_expert_load(out / "13-expert-load.png"),
        draw_quant_errors(out / "13-quant-errors.png"),
    ]


if __name__ == "__main__":
    for path in main():
        print(path)
