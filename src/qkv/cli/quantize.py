"""``qkv quantize``: store a trained model's linear layers in 8 or 4 bits (weight-only).

    qkv quantize runs/gpt-char --bits 8 --out runs/gpt-char-int8        a run in, a run out
    qkv eval runs/gpt-char-int8            validation metrics of the quantised model
    qkv sample runs/gpt-char-int8 --prompt "The "
    qkv quantize path/to/model --bits 4 --group-size 64 --out model-int4    a model directory
    qkv generate --model model-int4 --prompt "The "

The output has the shape of the input: from a training run (a directory with ``config.yaml``
and ``final/``), a run directory holding the run's config (and ``run.json``) and the quantised
model and tokenizer in ``final/``, so ``qkv eval`` and ``qkv sample`` take it; from a model
directory (``config.json`` and weights), a model directory, for ``qkv generate --model`` and
``qkv.from_pretrained``. See ``qkv.blocks.quant`` for what is stored.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

__all__ = ["register"]

_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)
_RUN_FILES = ("config.yaml", "run.json")  # what eval and sample read from a run directory


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _quantize(args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """Quantise; returns the model directories read and written and the layers quantised."""
    import qkv
    from qkv.blocks.quant import QuantConfig, quantize_model
    from qkv.interop.files import read_config
    from qkv.interop.quantized import QUANTIZATION_KEY
    from qkv.train.evaluate import FINAL

    source, out = Path(args.source), Path(args.out)
    is_run = (source / _RUN_FILES[0]).is_file()
    model_dir = source / FINAL if is_run else source
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} is neither a finished training run (config.yaml and final/) nor a model "
            "directory (config.json and weights)"
        )
    entry = read_config(model_dir).get(QUANTIZATION_KEY)
    if entry is not None:
        raise ValueError(
            f"{model_dir} is already quantised ({entry}); quantise the floating-point model it "
            "came from instead"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass a new --out directory")
    config = QuantConfig(bits=args.bits, group_size=args.group_size)
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        model, tokenizer = qkv.from_pretrained(model_dir, return_tokenizer=True)
    else:
        model = qkv.from_pretrained(model_dir)
    names = quantize_model(model, config)
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer to quantise")
    target = out / FINAL if is_run else out
    qkv.save_pretrained(model, target, tokenizer=tokenizer)
    for name in _RUN_FILES if is_run else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return model_dir, target, names


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantise a run's or a directory's model and save it."""
    try:
        model_dir, target, names = _quantize(args)
    except _ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qkv quantize: {message}", file=sys.stderr)
        return 2
    kind = f"int{args.bits}" + (
        f", groups of {args.group_size or 128} columns" if args.bits == 4 else ", per channel"
    )
    before, after = _weights_bytes(model_dir), _weights_bytes(target)
    print(f"quantised {len(names)} linear layers to {kind} (tied heads and embeddings stay float)")
    print(f"weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
    out = Path(args.out)
    print(f"written to {out}")
    if target != out:
        print(f"next: qkv eval {out}\n      qkv sample {out} --prompt ...")
    else:
        print(f"next: qkv generate --model {out} --prompt ...")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``quantize`` to the ``qkv`` command."""
    p = sub.add_parser(
        "quantize", help="store a model's linear layers in 8 or 4 bits (weight-only)",
        description="Quantise the linear layers of a training run's model (or of a model "
        "directory) to int8 (one scale per output channel) or int4 (a scale and an offset per "
        "group of input columns) and save the result through safetensors.",
    )  # fmt: skip
    p.add_argument("source", metavar="RUN_OR_DIR", help="a run directory or a model directory")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument(
        "--group-size", type=int, default=None,
        help="int4: input columns per scale (default 128; must divide every layer's width)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.set_defaults(func=cmd_quantize)
