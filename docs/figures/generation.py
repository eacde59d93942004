"""Draw the pictures of docs/learn/08-generation.md, and write its interactive sampling view.

The view (``08-sampling.html``, next to the pictures) is one self-contained HTML file with no
network access: sliders for temperature, top-k and top-p over the page's two distributions. Every
filtered distribution it can show is computed here by ``qkv.generate.process_logits`` and stored
in the file, so the page shows qkv's numbers, not a re-implementation in JavaScript.

Run from the repository root: ``python docs/figures/generation.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qkv.generate.sampling import process_logits
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


TAUS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
TOP_KS = tuple(range(1, 11))  # 10 of 10 tokens: no cut
TOP_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

TEMPLATE = Path(__file__).with_name("08-sampling-template.html")  # __DATA__ is filled in


def write_sampling_view(path: Path) -> Path:
    """The interactive view of page 08: every (temperature, top-k, top-p) setting precomputed."""
    prompts = []
    for title, words, probs in (CAT, CAPITAL):
        logits = torch.tensor([probs]).log()  # (B, V) = (1, 10)
        filtered = []  # per setting, per token: per-mille probability, or -1 where cut
        for tau in TAUS:
            for k in TOP_KS:
                for p in TOP_PS:
                    out = process_logits(logits, tau=tau, top_k=k, top_p=p)  # (1, V)
                    after = torch.softmax(out, dim=-1)[0]  # (V,): what sampling draws from
                    finite = out[0].isfinite().tolist()
                    filtered.append(
                        [
                            round(1000 * x) if f else -1
                            for x, f in zip(after.tolist(), finite, strict=True)
                        ]
                    )
        probs_permille = [round(1000 * x) for x in probs]
        prompts.append({"title": title, "words": words, "filtered": filtered,
                        "probs": probs_permille})  # fmt: skip
    data = {"taus": TAUS, "top_ks": TOP_KS, "top_ps": TOP_PS, "prompts": prompts}
    page = TEMPLATE.read_text("utf-8").replace("__DATA__", json.dumps(data, separators=(",", ":")))
    path.write_text(page, "utf-8")
    return path


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
    write_sampling_view(args.out / "08-sampling.html")  # not a picture: not in the list
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
