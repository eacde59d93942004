"""The ``qkv`` command: thin subcommands over the library (the only place that parses or prints)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

import qkv

# Larger subcommands live in their own modules; each has ``register(subparsers)`` that adds its
# parsers and sets ``func`` (a function of the parsed arguments returning the exit code).
COMMAND_MODULES: tuple[str, ...] = (
    "qkv.cli.env",
    "qkv.cli.exercises",
    "qkv.cli.explain",
    "qkv.cli.quantize",
    "qkv.cli.rag",
    "qkv.cli.tokenizer",
    "qkv.cli.train",
)

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


def _load_for_generation(name: str) -> tuple[Any, Any]:
    """The model and tokenizer of a checkpoint, or a one-line error for the user."""
    try:
        model, tokenizer = qkv.from_pretrained(name, return_tokenizer=True)
    except (qkv.CheckpointError, ValueError) as e:
        raise SystemExit(f"qkv: {e}") from None
    if not (hasattr(model, "new_cache") or hasattr(model, "new_caches")):
        raise SystemExit(
            f"qkv: {type(model).__name__} does not generate text; use a decoder "
            "(GPT, LLaMA, prefix-LM) or an encoder-decoder (T5, BART, Marian, Transformer)"
        )
    return model, tokenizer


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "num_beams": args.num_beams,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt (decoders) or transform a source text (encoder-decoders)."""
    from qkv.generate import generate, stream

    text = args.prompt if args.command == "generate" else args.source
    if not text:
        print(f"qkv {args.command}: the input text is empty", file=sys.stderr)
        return 2
    model, tokenizer = _load_for_generation(args.model)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoding = tokenizer.encode(text)
    input_ids = torch.tensor([encoding.ids])
    kwargs = _generation_kwargs(args)
    is_decoder_only = hasattr(model, "new_cache")
    try:
        if args.stream:
            if args.num_beams > 1:
                raise ValueError("--stream works with greedy decoding or sampling, not beams")
            if is_decoder_only:
                print(text, end="", flush=True)
            for piece in stream(model, input_ids, tokenizer=tokenizer, **kwargs):
                print(piece, end="", flush=True)
            print()
            return 0
        out = generate(model, input_ids, **kwargs)
    except ValueError as e:
        print(f"qkv {args.command}: {e}", file=sys.stderr)
        return 2
    new = out[0, input_ids.shape[1] :] if is_decoder_only else out[0, 1:]
    generated = tokenizer.decode(new.tolist(), skip_special_tokens=True)
    print(text + generated if is_decoder_only else generated)
    return 0


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or name")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")


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
    gen = sub.add_parser("generate", help="continue a prompt with a decoder model")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    _add_generation_flags(gen)
    gen.set_defaults(func=cmd_generate)
    translate = sub.add_parser("translate", help="transform a text with an encoder-decoder")
    translate.add_argument("--source", required=True, help="the source text")
    _add_generation_flags(translate)
    translate.set_defaults(func=cmd_generate)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
