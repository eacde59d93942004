"""A mixture of experts against a dense model of the same active size, at equal wall-clock.

    python benchmarks/moe.py                      three runs of 3 minutes of the gpt-char preset
    python benchmarks/moe.py --minutes 1          shorter (a busy machine: read the ratios)
    python benchmarks/moe.py --figure docs/learn/img/13-expert-load-gpt-char.png
                                                  also keep the MoE run's expert-load picture

The runs are the ``gpt-char`` preset (GPT, D 128, 4 layers, python-docs one character a token,
its optimizer, schedule and bfloat16 autocast where the CPU has it) with the same time budget;
they differ in the feed-forward layers only:

    dense       gpt-char as it is: one feed-forward network of width 2F = 512 per layer
    moe         4 experts of width F = 256 and a router in each layer (``model.experts``),
                each token through its top 2 (Mixtral's routing): the same active parameters
                per token as dense, twice the feed-forward parameters in all
    moe-cap1    the same with Switch's capacity factor 1.0: an expert takes at most an even
                share of a batch's choices, the rest are dropped (counted in moe_dropped)

Each row: parameters in all and active per token, steps and tokens per second within the
budget, the validation loss at the end (the whole held-out split), and for the MoE runs the
share of dropped choices and the largest share one expert took in the last step. Every run is
one ``qkv train`` in a child process (its own threads and memory).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

F = 256  # each expert's width; the dense model's is 2F (gpt-char's 4 D = 512)
BASE = ["--preset", "gpt-char", "--train.checkpoint_every", "0"]
MOE = ["--model.d_ff", str(F), "--model.experts", "{n_experts: 4, top_k: 2}"]
RUNS: dict[str, list[str]] = {
    "dense": ["--model.d_ff", str(2 * F)],
    "moe": MOE,
    "moe-cap1": [*MOE[:-1], "{n_experts: 4, top_k: 2, capacity_factor: 1.0}"],
}


def parameters(final_dir: Path) -> tuple[int, int]:
    """All parameters of the trained model, and those one token uses (k of X experts)."""
    import qkv

    model = qkv.from_pretrained(final_dir)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    spec = model.config.experts
    unused = experts * (1 - spec.top_k / spec.n_experts) if spec is not None else 0
    return total, round(total - unused)


def run(name: str, out: Path, budget: list[str]) -> dict[str, Any]:
    """One training run in a child process; what its metrics say at the end."""
    run_dir = out / name
    argv = ["train", "--out", str(run_dir), "--quiet", *BASE, *RUNS[name], *budget]
    print(f"$ qkv {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, "-m", "qkv", *argv], check=True)
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    total, active = parameters(run_dir / "final")
    last = rows[-1]
    result: dict[str, Any] = {
        "run": name, "params": total, "active": active, "steps": int(last["step"]),
        "train_s": round(float(last["time"]), 1),
        "tokens_per_s": round(int(last["tokens"]) / float(last["time"])),
        "val_loss": round(float(last["val_loss"]), 4),
    }  # fmt: skip
    if "moe_dropped" in last:
        dropped = [float(r["moe_dropped"]) for r in rows]
        result["dropped"] = round(sum(dropped) / len(dropped), 4)
        result["max_share"] = round(float(last["moe_max_share"]), 3)
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = ("| run | params | active / token | steps | tokens/s | val loss | dropped | "
            "busiest expert |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in results:
        moe = f"{r['dropped']:.1%} | {r['max_share']:.2f}" if "dropped" in r else "- | -"
        lines.append(
            f"| {r['run']} | {r['params'] / 1e6:.2f} M | {r['active'] / 1e6:.2f} M | "
            f"{r['steps']} | {r['tokens_per_s']:,} | {r['val_loss']:.3f} | {moe} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="each run's training time")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--figure", help="copy the moe run's experts.png there")
    parser.add_argument("--out", help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="qkv-moe-"))
    budget = ["--max-time", f"{args.minutes * 60:g}s"]
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = [run(name, out, budget) for name in args.runs]
    print(f"load average after: {os.getloadavg()}", flush=True)
    print(table(results))
    if args.figure and (out / "moe" / "experts.png").is_file():
        shutil.copyfile(out / "moe" / "experts.png", args.figure)
        print(f"expert load: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
