"""Draw the temperature picture of the distillation section of docs/learn/12-fine-tuning.md.

One set of next-character logits (illustrative numbers, the shape a character model gives after
"the valu"), turned into probabilities at temperatures τ = 1, 2 and 4: the higher τ, the more
of the small probabilities a student gets to see.

Run from the repository root: ``python docs/figures/distillation.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

# The next character after "the valu": "e" by far, then what a model half believes.
TOKENS = ["e", "a", "i", "'", "s", "o", " ", "t", "x", "q"]
LOGITS = [6.0, 2.5, 2.0, 1.2, 0.8, 0.5, 0.0, -0.5, -1.5, -2.5]
TEMPERATURES = (1.0, 2.0, 4.0)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logits = torch.tensor(LOGITS)  # (V,)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(TEMPERATURES)
    for i, tau in enumerate(TEMPERATURES):
        p = torch.softmax(logits / tau, dim=-1)  # (V,) the softened distribution
        entropy = float(-(p * p.log()).sum())
        x = [j + (i - (len(TEMPERATURES) - 1) / 2) * width for j in range(len(TOKENS))]
        ax.bar(x, p.tolist(), width=width, label=f"τ = {tau:g}  (entropy {entropy:.2f} nats)")
    ax.set_xticks(range(len(TOKENS)), [repr(t) for t in TOKENS])
    ax.set_xlabel('the next character after "the valu"')
    ax.set_ylabel("softmax(z / τ)")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.5)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = args.out / "12-temperature.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    for path in main():
        print(path)
