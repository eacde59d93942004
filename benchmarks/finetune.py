"""Fine-tuning against its baselines, on this machine's CPU (docs/learn/12-fine-tuning.md).

    python benchmarks/finetune.py classify    majority class, BERT from scratch, MiniLM fine-tuned
                                              in full and through LoRA (preset minilm-classify)
    python benchmarks/finetune.py classify --steps 40     the same, 40 steps each (a busy machine)
    python benchmarks/finetune.py continued   gpt-char (python-docs) continued on python-code,
                                              against python-code from scratch for the same time

Every run is one ``qkv train`` in a child process, so that its peak resident memory (ru_maxrss:
Python, torch, the data, the model, gradients and AdamW's moments) is its own. Each row reports
the final evaluation, the parameters that train, the steps taken within the time budget and
that peak. Add ``--minutes`` to change the budgets, ``--out`` to keep the runs somewhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MINILM = ["--preset", "minilm-classify"]
SCRATCH_SIZES = ["--model.d_model", "384", "--model.n_layers", "6", "--model.n_heads", "12",
                 "--model.d_ff", "1536"]  # fmt: skip
CODE = ["--preset", "gpt-char", "--data.corpus", "python-code", "--data.max_bytes", "2000000"]


def child(run_dir: str, argv: list[str]) -> int:
    """Train in this process, then record its peak resident memory beside the run."""
    from qkv.cli.main import main

    code = main(["train", "--out", run_dir, "--quiet", *argv])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    Path(run_dir, "peak_rss.json").write_text(json.dumps({"peak_rss_mib": peak / 1024}))
    return code


def run(name: str, out: Path, argv: list[str]) -> dict[str, Any]:
    """One training run in a child process; its last evaluation, budget use and memory."""
    run_dir = out / name
    cmd = [sys.executable, __file__, "--child", str(run_dir), "--", *argv]
    print(f"$ qkv train --out {run_dir} {' '.join(argv)}", flush=True)
    subprocess.run(cmd, check=True)
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        last = list(csv.DictReader(f))[-1]
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    trainable = info.get("finetune", {}).get("trainable_parameters")
    peak = json.loads((run_dir / "peak_rss.json").read_text())["peak_rss_mib"]
    result = {
        "run": name, "steps": int(last["step"]), "train_s": float(last["time"]),
        "trainable": trainable, "peak_rss_mib": round(peak),
        **{k: float(v) for k, v in last.items() if k.startswith("val_") and v},
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def classify(out: Path, minutes: float, steps: int) -> list[dict[str, Any]]:
    from qkv.interop import resolve_checkpoint

    budget = ["--max-time", f"{minutes * 60:g}s"]
    if steps:  # a short run: a warmup of a fifth of it (the preset's 20 steps suit 3 minutes)
        budget = ["--max-steps", str(steps), "--schedule.warmup_steps", str(max(1, steps // 5))]
    tokenizer = str(resolve_checkpoint("minilm") / "tokenizer.json")
    scratch = [*MINILM, "--model.init_from", "", "--data.tokenizer", tokenizer, *SCRATCH_SIZES,
               "--optim.head_lr", "0", "--optim.lr", "5e-4"]  # fmt: skip
    return [
        run("minilm-full", out, [*MINILM, *budget]),
        run("minilm-lora", out, [*MINILM, "--lora.rank", "8", "--optim.lr", "1e-3", *budget]),
        run("scratch", out, [*scratch, *budget]),
    ]


def continued(out: Path, minutes: float) -> list[dict[str, Any]]:
    budget = ["--max-time", f"{minutes * 60:g}s", "--train.eval_batches", "20"]
    base = run("gpt-char", out, ["--preset", "gpt-char", "--max-time", f"{minutes * 80:g}s"])
    tokenizer = str(out / "gpt-char" / "final" / "tokenizer.json")  # the same ids for both
    init = ["--init-from", str(out / "gpt-char"), "--data.tokenizer", "checkpoint"]
    return [
        base,
        run("code-scratch", out, [*CODE, "--data.tokenizer", tokenizer, *budget]),
        run("code-continued", out, [*CODE, *init, *budget]),
    ]


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["classify", "continued"])
    parser.add_argument("--minutes", type=float, default=3.0, help="each run's training budget")
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="classify: a step budget instead of the time budget (a loaded machine)",
    )
    parser.add_argument("--out", help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="qkv-finetune-"))
    print(f"load average before: {os.getloadavg()}", flush=True)
    if args.what == "classify":
        results = classify(out, args.minutes, args.steps)
    else:
        results = continued(out, args.minutes)
    print(f"load average after: {os.getloadavg()}", flush=True)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
