"""Benchmark: a half-size gpt-char student distilled from a trained teacher, against the same
student trained alone for the same time.

The student is the gpt-char preset with half its layers (``--model.n_layers 2`` of 4; the same
width, heads and data). Both students train at once, one thread each, with the same wall-clock
budget, so that a load that comes and goes on a shared machine falls on both; the distilled
one pays for the teacher's forward pass in its budget, so it takes fewer steps. Then, for the
teacher and both students: the validation loss of the final model (the whole held-out split,
plain cross-entropy, as ``qkv eval`` reports it), the parameter count, and the greedy decoding
speed (batch 1, float32, one thread, a 4-token prompt and 124 new tokens: all 128 positions;
the models take turns within each repeat, and the median of the repeats is kept).

    python benchmarks/distillation.py --teacher RUN_DIR [--time 3m | --steps N] [--out DIR]
                                      [--temperature 2] [--alpha 0.5] [--repeat 5]

``--steps N`` gives both students the same number of steps instead (and the same learning-rate
schedule): what the teacher's signal is worth per step, its cost left out.

The teacher is a gpt-char run, e.g. ``qkv train --preset gpt-char --max-steps 300 --out RUN``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qkv
from qkv.generate import generate
from qkv.train.metrics import read_metrics

PROMPT = "The "


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_students(
    teacher: Path, out: Path, budget: list[str], temperature: float, alpha: float
) -> None:
    """The student alone and the distilled student, trained at the same time, one thread each."""
    common = [sys.executable, "-m", "qkv", "train", "--preset", "gpt-char", "--model.n_layers",
              "2", *budget, "--train.threads", "1", "--quiet"]  # fmt: skip
    distill = ["--distill.teacher", str(teacher), "--distill.temperature", str(temperature),
               "--distill.alpha", str(alpha)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, extra in (("alone", []), ("distilled", distill)):
        with open(out / f"{name}.log", "w", encoding="utf-8") as log:  # the child keeps it open
            command = [*common, *extra, "--out", str(out / name)]
            runs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    for run in runs:
        if run.wait() != 0:
            raise SystemExit(f"a training run failed (see its .log in {out}): {run.args}")


def decode_speed(models: dict[str, torch.nn.Module], tokenizer: object, repeat: int) -> dict:
    """Median greedy-decoding tokens/s of each model (they take turns within each repeat)."""
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])  # type: ignore[attr-defined]  # (1, T)
    new = 124  # the prompt and the new tokens fill the 128 positions
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        generate(model, ids, max_new_tokens=8, eos_token_id=[])
    for _ in range(repeat):
        for name, model in models.items():
            start = time.perf_counter()
            out = generate(model, ids, max_new_tokens=new, eos_token_id=[])
            times[name].append(time.perf_counter() - start)
            assert out.shape[1] == ids.shape[1] + new
    return {name: new / statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True, help="a finished gpt-char run")
    parser.add_argument("--time", default="3m", help="each student's training budget")
    parser.add_argument("--steps", type=int, help="a step budget instead of --time")
    parser.add_argument("--out", type=Path, help="where the students go (default: a temp dir)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="qkv-distill-"))
    load_before = os.getloadavg()
    budget = ["--max-steps", str(args.steps)] if args.steps else ["--max-time", args.time]
    train_students(args.teacher, out, budget, args.temperature, args.alpha)
    load_after = os.getloadavg()
    runs = {"teacher (L=4)": args.teacher, "student alone (L=2)": out / "alone",
            "student distilled (L=2)": out / "distilled"}  # fmt: skip
    torch.set_num_threads(1)
    models, rows = {}, {}
    for name, run in runs.items():
        model, tokenizer = qkv.from_pretrained(run / "final", return_tokenizer=True)
        metrics = read_metrics(run / "metrics.csv")
        last = [r for r in metrics if r.get("val_loss")][-1]
        models[name] = model
        rows[name] = (len(metrics), float(last["time"]), float(last["val_loss"]),
                      model.num_parameters())  # fmt: skip
    speed = decode_speed(models, tokenizer, args.repeat)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"Python {platform.python_version()}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after the students; students in {out}")  # fmt: skip
    print(f"distill.temperature={args.temperature:g}, distill.alpha={args.alpha:g}\n")
    columns = ["steps", "training s", "val loss (nats/char)", "val bpc", "parameters"]
    print(f"| model | {' | '.join(columns)} | decode tok/s |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name, (steps, seconds, loss, params) in rows.items():
        print(f"| {name} | {steps} | {seconds:.0f} | {loss:.3f} | {loss / math.log(2):.3f} "
              f"| {params:,} | {speed[name]:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
