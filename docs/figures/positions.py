"""Draw the pictures of docs/learn/04-positions.md: the four position encodings of qkv.positional.

Run from the repository root: ``python docs/figures/positions.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import qkv
from qkv.viz import plots


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    out = parser.parse_args(argv).out
    minilm = qkv.from_pretrained("minilm")  # a trained learned-position table, 512 x 384
    table = minilm.pos_emb.emb.weight[:64].detach()  # (N, D): the first 64 positions
    drawings = {
        "04-sinusoidal": lambda p: plots.plot_sinusoidal(64, 64, path=p),
        "04-learned-minilm": lambda p: plots.plot_learned(
            table, title="MiniLM's learned positions (first 64 of 512)", path=p
        ),
        "04-rope": lambda p: plots.plot_rope(64, 16, path=p),
        "04-alibi": lambda p: plots.plot_alibi(4, 12, path=p),
    }
    written = []
    for name, draw in drawings.items():
        path = out / f"{name}.png"
        draw(path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
