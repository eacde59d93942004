"""Draw the schedule picture of docs/learn/07-training.md.

Run from the repository root: ``python docs/figures/training.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qkv.train.schedule import inverse_sqrt_lr, warmup_cosine_lr


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = list(range(20_000))
    cosine_warmup, total = 500, len(steps)
    cosine = [
        warmup_cosine_lr(
            s,
            peak=7e-4,
            warmup_steps=cosine_warmup,
            progress=(s - cosine_warmup) / (total - cosine_warmup),
            min_lr_ratio=0.1,
        )
        for s in steps
    ]
    paper = [inverse_sqrt_lr(s, d_model=512, warmup_steps=4000) for s in steps]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(steps, cosine, label="warmup 500 steps + cosine to 10% (GPT-style)")
    ax.plot(steps, paper, label="inverse square root, d_model=512, warmup 4000 (2017 paper)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = args.out / "07-schedules.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    for path in main():
        print(path)
