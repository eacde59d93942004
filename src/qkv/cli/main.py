"""The ``qkv`` command: thin subcommands over the library (the only place that parses or prints)."""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence

import torch

import qkv

SEED_SENTENCE = "The animal didn't cross the street because it was tired"


def _spelling_embedding(word: str, dim: int) -> torch.Tensor:
    """A fixed vector per word from its character trigrams (no training: words that share
    letters get similar vectors, so attention between them is visible)."""
    padded = f"<{word.lower()}>"
    vec = torch.zeros(dim)
    for i in range(len(padded) - 2):
        digest = hashlib.sha256(padded[i : i + 3].encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        vec += torch.randn(dim, generator=g)
    return vec / vec.norm()


def _format_weights(tokens: list[str], weights: torch.Tensor) -> str:
    width = max(6, *(len(t) for t in tokens)) + 1
    cell = 6
    header = " " * width + "".join(t[: cell - 1].rjust(cell) for t in tokens)
    rows = [header]
    for tok, row in zip(tokens, weights.tolist(), strict=True):
        rows.append(tok.rjust(width) + "".join(f"{w:{cell}.2f}" for w in row))
    return "\n".join(rows)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run scaled dot-product attention on a sentence and print the weights."""
    tokens = re.findall(r"[\w']+|[^\w\s]", args.sentence)
    if not tokens:
        print("qkv demo: the sentence has no words; pass one with --sentence", file=sys.stderr)
        return 2
    x = torch.stack([_spelling_embedding(t, args.dim) for t in tokens])  # (T, D)
    mask = qkv.masks.causal(len(tokens)) if args.causal else None
    # Self-attention with Q = K = V = X: each word's scores are its similarity to every word.
    out, weights = qkv.scaled_dot_product_attention(
        x, x, x, mask, scale=args.scale, return_weights=True
    )
    fast = qkv.scaled_dot_product_attention(x, x, x, mask, scale=args.scale, impl="sdpa")
    print(f"qkv {qkv.__version__}: scaled dot-product attention on {len(tokens)} tokens")
    print(
        "Embeddings are fixed spelling features (character trigrams), not meaning: words that"
        " share letters attend to each other."
    )
    print(f"mask: {'causal' if args.causal else 'none'}, scale: {args.scale}\n")
    print("weights (row = query, column = key; each row sums to 1):")
    print(_format_weights(tokens, weights))
    print(
        f"\nreference vs fused (sdpa) output: max |difference| = "
        f"{(out - fast).abs().max().item():.2e}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv", description="Attention and the Transformer: readable, fast, proven correct."
    )
    parser.add_argument("--version", action="version", version=f"qkv {qkv.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run attention on a sentence and print the weights")
    demo.add_argument("--sentence", default=SEED_SENTENCE, help="text to attend over")
    demo.add_argument("--causal", action="store_true", help="apply a causal mask")
    demo.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    demo.add_argument(
        "--scale", type=float, default=4.0, help="score scale; higher is sharper (default 4.0)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
