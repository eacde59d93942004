"""Draw the pictures of docs/learn/08-generation.md.

Run from the repository root: ``python docs/figures/generation.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.viz.distribution import plot_filters

# The two made-up distributions of the page: one right answer, and many reasonable ones.
CAPITAL = (
    "The capital of France is ___",
    ["Paris", "a", "the", "not", "in", "one", "Lyon", "located", "big", "now"],
    [0.92, 0.03, 0.02, 0.01, 0.005, 0.005, 0.004, 0.003, 0.002, 0.001],
)
CAT = (
    "The cat sat on the ___",
    ["mat", "rug", "sofa", "floor", "bed", "roof", "table", "moon", "idea", "seven"],
    [0.20, 0.16, 0.14, 0.12, 0.10, 0.09, 0.07, 0.05, 0.04, 0.03],
)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    charts = {"08-filters-capital": CAPITAL, "08-filters-cat": CAT}
    for name, (title, words, probs) in charts.items():
        path = args.out / f"{name}.png"
        plot_filters(words, probs, top_k=3, top_p=0.9, min_p=0.3, title=title, path=path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
