"""Draw the pictures of docs/learn/09-efficient-attention.md.

    09-kv-cache.png    KV-cache bytes per token and for a 4096-token context, for real models
                       (``kv_cache_bytes_per_token``): multi-head, grouped-query, multi-query
    09-patterns.png    causal, sliding-window, Longformer and BigBird masks at T=64
    09-scaling.png     time and memory against T, from ``benchmarks/attention.py --out FILE``
                       (skipped, with a message, when FILE is missing)
    09-performer.png   Performer's error against its number of random features (drawn only when
                       ``qkv.attention.variants.performer`` has ``performer_error_curve``)

Run from the repository root:
``python docs/figures/efficient_attention.py [--out docs/learn/img] [--bench FILE.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from qkv.attention import masks
from qkv.attention.kv_cache import kv_cache_bytes_per_token
from qkv.models import gpt, llama

CONTEXT = 4096  # tokens of context for the right-hand panel of 09-kv-cache
CACHE_DTYPE = torch.bfloat16  # how these models are usually served: 2 bytes a number
COLORS = {"MHA": "tab:red", "GQA": "tab:blue", "MQA": "tab:green"}


def kv_configs() -> list[tuple[str, str, int, int, int]]:
    """(name, attention kind, L, K, E) of real models, from qkv's presets where they exist."""
    gpt2, llama2 = gpt.PRESETS["gpt2"], llama.PRESETS["llama2-7b"]
    mistral = llama.PRESETS["mistral-7b"]
    # Llama 3 8B: Grattafiori et al. 2024 (arXiv:2407.21783), Table 3: 32 layers, width 4096,
    # 32 query heads, 8 key/value heads (so E = 128); the cache needs only L, K and E.
    llama3 = dataclasses.replace(llama2, n_kv_heads=8)
    rows = [
        ("GPT-2 small", "MHA", gpt2.n_layers, gpt2.n_heads, gpt2.d_model // gpt2.n_heads),
        ("LLaMA-2-7B", "MHA", llama2.n_layers, llama2.n_kv_heads, llama2.head_dim),
        ("Llama-3-8B", "GQA", llama3.n_layers, llama3.n_kv_heads, llama3.head_dim),
        ("Mistral 7B", "GQA", mistral.n_layers, mistral.n_kv_heads, mistral.head_dim),
        ("LLaMA-2-7B as MQA\n(hypothetical)", "MQA", llama2.n_layers, 1, llama2.head_dim),
    ]
    return rows


def draw_kv_cache(path: Path) -> None:
    configs = kv_configs()
    per_token = [kv_cache_bytes_per_token(*lke, CACHE_DTYPE) for _, _, *lke in configs]
    names = [f"{name}\nL={n_layers} K={k} E={e}" for name, _, n_layers, k, e in configs]
    colors = [COLORS[kind] for _, kind, *_ in configs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    y = range(len(configs))[::-1]
    for ax, values, unit, scale in (
        (left, per_token, "KiB per token", 2**10),
        (right, [b * CONTEXT for b in per_token], f"GiB for {CONTEXT} tokens", 2**30),
    ):
        shown = [v / scale for v in values]
        ax.barh(list(y), shown, color=colors)
        for yi, v in zip(y, shown, strict=True):
            ax.text(v, yi, f" {v:,.3g}", va="center", fontsize=8)
        ax.set_xlabel(unit)
        ax.set_xlim(0, max(shown) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    left.set_yticks(list(y), names, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    right.legend(handles, list(COLORS), loc="lower right", fontsize=8)
    fig.suptitle(
        "KV cache = 2 (k and v) x L x K x E x 2 bytes (bfloat16) per token, batch 1", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_patterns(path: Path, t: int = 64) -> None:
    patterns = {
        "causal": masks.causal(t),
        "sliding window (16, causal)": masks.sliding_window(t, 16),
        "Longformer (window 16,\nglobal tokens 0 and 32)": masks.longformer(t, 16, [0, 32]),
        "BigBird (blocks of 8: 3 window,\n1 global, 1 random)": masks.bigbird(t, 8, 3, 1, 1, 0),
    }
    fig, axes = plt.subplots(1, len(patterns), figsize=(12, 3.9))
    for ax, (title, mask) in zip(axes, patterns.items(), strict=True):
        ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        kept = mask.float().mean().item()
        ax.set_title(f"{title}\n{kept:.0%} of the {t} x {t} scores", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_xticks([0, t - 1])
        ax.set_yticks([0, t - 1])
    axes[0].set_ylabel("query position", fontsize=8)
    fig.suptitle("black: the query may attend to the key (True in qkv.masks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_scaling(path: Path, bench: dict) -> None:
    results = [r for r in bench["results"] if r["status"] == "ok"]
    dtype = "float32" if any(r["dtype"] == "float32" for r in results) else results[0]["dtype"]
    impls = list(dict.fromkeys(r["impl"] for r in bench["results"]))
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, impl in enumerate(impls):
        for pass_, style in (("fwd+bwd", "-"), ("forward", ":")):
            rows = sorted(
                (r for r in results if (r["impl"], r["dtype"], r["pass"]) == (impl, dtype, pass_)),
                key=lambda r: r["t"],
            )
            if not rows:
                continue
            ts = [r["t"] for r in rows]
            label = impl if pass_ == "fwd+bwd" else None
            color = f"C{i}"
            time_ax.plot(ts, [r["ms"] for r in rows], style, marker="o", ms=3, color=color,
                         label=label)  # fmt: skip
            mib = [(r["t"], max(r["peak_mib"], 1.0)) for r in rows if r["peak_mib"] is not None]
            if mib:
                memory_ax.plot(*zip(*mib, strict=True), style, marker="o", ms=3, color=color,
                               label=label)  # fmt: skip
    for ax, label in ((time_ax, "ms per call"), (memory_ax, "peak memory of one call (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    time_ax.legend(
        fontsize=8, title="solid: fwd+bwd, dotted: forward", title_fontsize=8, loc="upper left"
    )
    load = " to ".join(bench.get("load_average", ["?"]))
    fig.suptitle(
        f"causal attention, B={bench['B']} H={bench['H']} E={bench['E']}, {dtype}, "
        f"{bench['device']} ({bench['date']}, load average {load}); missing points: skipped "
        "(memory or time)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_performer(path: Path, error_curve) -> None:
    gen = torch.Generator().manual_seed(0)
    # Short queries and keys (|q| about 2): the variance of the estimate grows like
    # exp(|q' + k'|^2), so long ones need far more features than this picture shows.
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))  # (B, H, T, E)
    q, k = q / 2, k / 2
    features = (8, 16, 32, 64, 128, 256, 512, 1024)
    curve = error_curve(q, k, v, masks.causal(64), n_features=features, seeds=range(4))
    ms, errors = zip(*curve, strict=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(ms, errors, "o-", label="Performer (orthogonal features), mean of 4 seeds")
    ax.plot(ms, [errors[0] * (ms[0] / m) ** 0.5 for m in ms], "--", color="gray",
            label="1 / sqrt(M)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("random features M")
    ax.set_ylabel("mean |Performer - softmax attention|")
    ax.set_title("Performer against exact softmax attention (causal, T=64, E=16)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    parser.add_argument(
        "--bench",
        type=Path,
        default=Path("build/attention-bench.json"),
        help="results of benchmarks/attention.py --out",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("09-kv-cache", draw_kv_cache), ("09-patterns", draw_patterns)):
        draw(args.out / f"{name}.png")
        written.append(args.out / f"{name}.png")
    if args.bench.is_file():
        draw_scaling(args.out / "09-scaling.png", json.loads(args.bench.read_text()))
        written.append(args.out / "09-scaling.png")
    else:
        print(f"09-scaling.png skipped: no {args.bench} (run benchmarks/attention.py --out it)")
    performer = importlib.import_module("qkv.attention.variants.performer")
    if error_curve := getattr(performer, "performer_error_curve", None):
        draw_performer(args.out / "09-performer.png", error_curve)
        written.append(args.out / "09-performer.png")
    else:
        print("09-performer.png skipped: qkv.attention.variants.performer has no error curve")
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
