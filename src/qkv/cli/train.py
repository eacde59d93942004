"""``qkv train``, ``qkv eval`` and ``qkv sample``: train a model, score it, write with it.

    qkv train --preset gpt-char                           the 3-minute character GPT
    qkv train --preset gpt-char --model.n_layers 2 --train.max_steps 10 --out runs/toy
    qkv train --config my.yaml --max-time 90s               a YAML file of the same shape
    qkv train --resume runs/toy --train.max_steps 20       continue from the last checkpoint
    qkv train --preset gpt-char --model.d_model 64 --distill.teacher runs/big   learn from runs/big
    qkv train --preset minilm-classify --lora.rank 8       fine-tune MiniLM through LoRA
    qkv eval runs/toy                                      validation metrics of final/
    qkv sample runs/toy --prompt "The " --temperature 0.8  sample from a trained LM

Any ``--SECTION.KEY VALUE`` sets one field of the run config (``qkv.train.config``); values
are read as YAML (``2``, ``true``, ``3m``, ``1e-3``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["register"]

_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


class _OverridesParser(argparse.ArgumentParser):
    """An argument parser that collects ``--section.key value`` pairs into ``overrides``."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        overrides: list[tuple[str, str]] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
            if "." in key:
                if "=" in arg:
                    overrides.append((key, arg.split("=", 1)[1]))
                elif i + 1 < len(args):
                    overrides.append((key, args[i + 1]))
                    i += 1
                else:
                    self.error(f"{arg} needs a value, e.g. {arg} 2")
            else:
                rest.append(arg)
            i += 1
        parsed, extras = super().parse_known_args(rest, namespace)
        assert parsed is not None
        parsed.overrides = overrides
        return parsed, extras


def _fail(command: str, error: BaseException) -> int:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"qkv {command}: {message}", file=sys.stderr)
    return 2


# -- the progress bar ---------------------------------------------------------------------------


def _make_progress_callback(quiet: bool) -> Any:
    """A ``TrainCallback`` drawing a rich progress bar (loss, tokens/s, ETA) and eval lines."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from qkv.train import StepMetrics, TrainCallback

    console = Console(stderr=True, quiet=quiet)

    class RichProgress(TrainCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task: Any = None
            self.data_task: Any = None
            self.max_steps = 0
            self.max_time: float | None = None

        def _bar(self) -> Progress:
            if self.progress is None:
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console,
                )  # fmt: skip
                self.progress.start()
            return self.progress

        def on_data_progress(self, done: int, total: int) -> None:
            bar = self._bar()
            if self.data_task is None:
                self.data_task = bar.add_task("tokenizing", total=total, info="")
            bar.update(self.data_task, completed=done, total=total)

        def on_start(self, *, run_dir: Path, start_step: int, max_steps: int,
                     max_time: float | None, num_parameters: int) -> None:  # fmt: skip
            self.max_steps, self.max_time = max_steps, max_time
            budget = [f"{max_steps} steps"] if max_steps else []
            budget += [f"{max_time:g} s"] if max_time else []
            console.print(
                f"training {num_parameters:,} parameters into {run_dir} "
                f"({' or '.join(budget)}{f', from step {start_step}' if start_step else ''})"
            )
            self.task = self._bar().add_task("train", total=1000, info="")

        def on_run_info(self, info: dict[str, Any]) -> None:
            console.print(_describe_run(info), markup=False, highlight=False, soft_wrap=True)
            for note in info["notes"]:
                console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)

        def on_step(self, m: StepMetrics) -> None:
            fractions = [m.step / self.max_steps] if self.max_steps else []
            fractions += [m.time / self.max_time] if self.max_time else []
            info = f"step {m.step} loss {m.loss:.4f} {m.tokens_per_s:,.0f} tok/s"
            self._bar().update(self.task, completed=1000 * min(max(fractions), 1.0), info=info)
            if m.eval:
                shown = "  ".join(f"{k} {v:.4g}" for k, v in m.eval.items())
                console.print(f"step {m.step}: {shown}")

        def on_sample(self, step: int, text: str) -> None:
            console.print(f"sample at step {step}:\n{text}", markup=False, highlight=False)

        def on_end(self, summary: dict[str, Any]) -> None:
            if self.progress is not None:
                self.progress.stop()

    return RichProgress()


def _describe_run(info: dict[str, Any]) -> str:
    """Two lines: what the run trains on (corpus, counts, SHA-256, vocabulary), and under what
    (Python, torch, device, precision): what ``run.json`` records."""
    data, env = info["data"], info["environment"]
    parts = [f"data: {data.get('corpus', '?')}"]
    if "characters" in data:
        parts.append(f"{data['characters']:,} characters ({data['distinct_characters']} distinct)")
    if "sha256" in data:
        parts.append(f"sha256 {data['sha256'][:12]}")
    if "vocab_size" in data:
        parts.append(f"vocabulary {data['vocab_size']}")
    return ", ".join(parts) + (
        f"\nmachine: Python {env['python']}, torch {env['torch']}, {env['device']}, "
        f"precision {info['precision']}"
    )


# -- commands -----------------------------------------------------------------------------------


def _load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections (model:, data:, train:, ...)")
    return data


_BUDGETS = {"train.max_steps": ("--max-steps", 0), "train.max_time": ("--max-time", "")}


def _one_budget_kind(base: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """A budget given on the command line replaces the base's budget of the other kind.

    ``--max-steps 80`` on a preset with ``max_time: 3m`` means "80 steps", a repeatable run,
    not "80 steps or 3 minutes, the learning rate following the clock". Giving both on the
    command line keeps both. Returns a note for each budget taken away.
    """
    notes = []
    for given, other in (("train.max_steps", "train.max_time"),
                         ("train.max_time", "train.max_steps")):  # fmt: skip
        current = (base.get("train") or {}).get(other.split(".")[1])
        if given in overrides and other not in overrides and current:
            overrides[other] = _BUDGETS[other][1]
            notes.append(
                f"{_BUDGETS[given][0]} replaces the {other}={current} of the config (give "
                f"{_BUDGETS[other][0]} too to keep both)"
            )
    return notes


def _build_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from qkv.train import config_from_dict, load_preset, load_run_config, merge_overrides
    from qkv.train.config import config_to_dict, parse_value

    overrides = {key: parse_value(value) for key, value in args.overrides}
    # The two budgets have short spellings too: --max-time 3m, --max-steps 500.
    if args.max_time is not None:
        overrides["train.max_time"] = args.max_time
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    if args.init_from is not None:  # --init-from minilm: model.init_from
        overrides["model.init_from"] = args.init_from
    if args.device is not None:  # --device cpu: train.device
        overrides["train.device"] = args.device
    if args.resume:
        if args.preset or args.config:
            raise ValueError("--resume continues a run with its own config; drop --preset/--config")
        base = config_to_dict(load_run_config(Path(args.resume)))
    elif args.preset or args.config:
        base = load_preset(args.preset) if args.preset else {}
        if args.config:
            base = merge_overrides(base, _load_yaml(args.config))
    else:
        from qkv.train import list_presets

        raise ValueError(
            f"pass --preset NAME (one of {', '.join(list_presets())}) or --config FILE.yaml"
        )
    notes = _one_budget_kind(base, overrides)
    return config_from_dict(merge_overrides(base, overrides)), notes


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a preset / config file with overrides, or resume a run."""
    try:
        from qkv.train import train

        config, notes = _build_config(args)
        if args.resume:
            run_dir = Path(args.resume)
        elif args.out:
            run_dir = Path(args.out)
        else:
            run_dir = Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports
        for note in notes if main_rank else []:
            print(f"note: {note}", file=sys.stderr)
        callback = _make_progress_callback(args.quiet or not main_rank)
        try:
            result = train(config, run_dir, resume=bool(args.resume), cache_dir=args.cache_dir,
                           callback=callback)  # fmt: skip
        finally:
            callback.on_end({})
    except _ERRORS as e:
        return _fail("train", e)
    if not main_rank:
        return 0
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    print(f"done: {result.steps} steps, train loss {result.train_loss:.4f}  {shown}")
    print(f"run directory: {result.run_dir}")
    samples = result.run_dir / "samples.txt"
    if samples.is_file():
        last = samples.read_text(encoding="utf-8").rsplit("=== ", 1)[-1].split("\n", 1)[-1]
        if last.strip():
            print(f"last sample:\n{last.rstrip()}")
    if result.final_dir is not None:
        print(f"model and tokenizer: {result.final_dir}")
    checkpoints = result.run_dir / "checkpoints"
    if checkpoints.is_dir():
        print(f"checkpoints (resume with --resume {result.run_dir}): {checkpoints}")
    if (result.run_dir / "loss.png").is_file():
        print(f"loss curves: {result.run_dir / 'loss.png'}")
    experts = _plot_experts(result.run_dir)
    if experts is not None:
        print(f"expert load: {experts}")
    print(f"next: qkv eval {result.run_dir}")
    if result.final_dir is not None and config.data.kind == "lm":
        print(f"      qkv sample {result.run_dir} --prompt ...")
    return 0


def _plot_experts(run_dir: Path) -> Path | None:
    """Draw a mixture of experts' tokens per expert over the run (experts.json) as a PNG."""
    from qkv.train.experts import EXPERTS_FILE, read_expert_load

    if not (run_dir / EXPERTS_FILE).is_file():
        return None
    from qkv.viz.moe import plot_expert_load

    counts = read_expert_load(run_dir / EXPERTS_FILE)
    out = run_dir / "experts.png"
    plot_expert_load(
        counts["tokens_per_expert"], path=out,
        title=f"tokens per expert over {counts['step']} steps",
    )  # fmt: skip
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    """Print the validation metrics of a run's final (or best/latest) model."""
    try:
        from qkv.train.loop import evaluate_run

        metrics = evaluate_run(args.run_dir, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
                               device=args.device)  # fmt: skip
    except _ERRORS as e:
        return _fail("eval", e)
    print(f"{args.run_dir} ({args.checkpoint}):")
    for name, value in metrics.items():
        print(f"  {name:<18} {value:.6g}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample a continuation of a prompt from a run's trained language model."""
    import torch

    try:
        import qkv
        from qkv.generate import generate

        final = Path(args.run_dir) / "final"
        if not (final / "config.json").is_file():
            raise FileNotFoundError(
                f"{args.run_dir} has no final/ model; pass a run directory whose training finished"
            )
        model, tokenizer = qkv.from_pretrained(final, return_tokenizer=True)
        if not hasattr(model, "new_cache"):
            raise ValueError(
                f"{args.run_dir} holds a {type(model).__name__}, not a language model; use "
                "qkv translate --model RUN/final for encoder-decoders"
            )
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
        limit = getattr(model.config, "max_seq_len", None)
        new = args.max_new_tokens if limit is None else min(args.max_new_tokens, limit - len(ids))
        if new < 1:
            raise ValueError(f"the prompt fills all {limit} positions; pass a shorter --prompt")
        out = generate(
            model, torch.tensor([ids]), max_new_tokens=new, do_sample=True,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed, eos_token_id=[],
        )  # fmt: skip
    except _ERRORS as e:
        return _fail("sample", e)
    print(args.prompt + tokenizer.decode(out[0, len(ids) :].tolist()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``sample`` to the ``qkv`` command."""
    old_class = sub._parser_class
    sub._parser_class = _OverridesParser  # train's parser also collects --section.key overrides
    try:
        train = sub.add_parser(
            "train", help="train a model from a preset or config file",
            description="Train a model. Any --SECTION.KEY VALUE overrides one config field "
            "(e.g. --model.n_layers 2 --train.max_steps 10 --data.seq_len 64).",
        )  # fmt: skip
    finally:
        sub._parser_class = old_class
    train.add_argument("--preset", help="a built-in run (gpt-char, vit-digits, ...)")
    train.add_argument("--config", help="a YAML file of the same shape as a preset")
    train.add_argument("--out", help="the run directory (default runs/<preset>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.add_argument("--max-time", help="wall-clock budget such as 90s, 3m, 1h (train.max_time)")
    train.add_argument("--max-steps", type=int, help="step budget (train.max_steps)")
    train.add_argument(
        "--init-from", metavar="CHECKPOINT",
        help="start from pretrained weights (model.init_from): a run directory, a checkpoint "
        "directory or a packaged name such as minilm",
    )  # fmt: skip
    train.add_argument(
        "--device", choices=["auto", "cpu", "cuda"],
        help="where to train (train.device): auto takes a GPU per process if there are enough",
    )  # fmt: skip
    train.add_argument("--cache-dir", help="tokenized-corpus cache (default ~/.cache/qkv/data)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a training run on its validation split")
    ev.add_argument("run_dir", help="a directory qkv train wrote")
    ev.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"],
                    help="where to evaluate (default: the run's train.device)")  # fmt: skip
    ev.add_argument("--cache-dir", help="tokenized-corpus cache (default ~/.cache/qkv/data)")
    ev.set_defaults(func=cmd_eval)

    sample = sub.add_parser("sample", help="sample text from a trained language model")
    sample.add_argument("run_dir", help="a directory qkv train wrote")
    sample.add_argument("--prompt", default="The ", help="the text to continue")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=None, help="makes the sample reproducible")
    sample.set_defaults(func=cmd_sample)
