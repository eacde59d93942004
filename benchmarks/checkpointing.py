"""Activation checkpointing and torch.compile in training: time per step and memory, side by side.

    python benchmarks/checkpointing.py                    GPT L=6 H=6 D=384, T=256, B=16, CPU
    python benchmarks/checkpointing.py --device cuda      the same on a GPU
    python benchmarks/checkpointing.py --tiny --steps 2   a toy size (a quick check)

Four ways to train the same model on the same batches, each in a fresh process:

    eager              the plain training step (the baseline of the table)
    checkpointing      every layer recomputes its activations during backward
                       (``train.activation_checkpointing``, qkv.train.build.CheckpointedLayer)
    compile            ``torch.compile`` of the model (``train.compile``; inductor)
    compile + ckpt     both

Each row: the median step time over ``--steps`` steps after two warm-up steps (the first
includes compilation, reported apart), tokens per second, and the peak memory of the step
above what stays allocated between steps (weights, gradients, AdamW's moments): on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the process's resident high-water mark
(VmHWM, reset through /proc/self/clear_refs after the warm-up, with glibc told to hand freed
blocks back at once). That peak is what activation checkpointing saves (mostly the
activations kept for backward); the time column is what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = {
    "eager": (False, False),
    "checkpointing": (True, False),
    "compile": (False, True),
    "compile + ckpt": (True, True),
}


# glibc returns every block of 64 KiB or more to the system when it is freed (a fixed mmap
# threshold), so the resident size follows the tensors alive: the CPU peak is then theirs.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line")


def _reset_peak(device: Any) -> int:
    """Start a new peak; returns the bytes in use now (the base of the peak)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status_kib("VmRSS") * 1024


def _peak(device: Any) -> int:
    """The peak bytes in use since ``_reset_peak``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` + 2 steps in this process as ``mode`` says; the row's numbers."""
    import torch

    from qkv.models.gpt import GPT, GPTConfig
    from qkv.train.build import enable_activation_checkpointing

    ckpt, compiled = MODES[mode]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, layers, heads = (64, 2, 4) if args.tiny else (384, 6, 6)
    model = GPT(GPTConfig(vocab_size=256, d_model=d, n_layers=layers, n_heads=heads,
                          max_seq_len=args.seq_len, dropout=0.0)).to(device)  # fmt: skip
    if ckpt:
        enable_activation_checkpointing(model)
    step_model = torch.compile(model) if compiled else model
    fused = device.type == "cuda" or hasattr(torch._C, "_fused_adamw_")  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    ids = torch.randint(0, 256, (args.steps + 2, args.batch, args.seq_len + 1), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Two warm-up steps (compilation; gradients and AdamW's moments come to exist), then the
    # peak of the timed steps above what stays allocated between steps.
    times, base = [], 0
    for i in range(args.steps + 2):
        if i == 2:
            base = _reset_peak(device)
        sync()
        start = time.perf_counter()
        logits = step_model(ids[i, :, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[i, :, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        sync()
        times.append(time.perf_counter() - start)
    peak = _peak(device) - base
    step = statistics.median(times[2:])
    return {
        "mode": mode, "first_step_s": round(times[0], 2), "step_ms": round(step * 1e3, 1),
        "tokens_per_s": round(args.batch * args.seq_len / step),
        "peak_mib": round(peak / 2**20, 1),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| mode | first step (s) | step (ms) | time vs eager | tokens/s | "
             "peak above weights (MiB) | memory vs eager |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['step_ms'] / base['step_ms']:.2f}x | {r['tokens_per_s']:,} | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after two warm-ups")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model (a quick check)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return 0
    import torch

    size = "toy" if args.tiny else "GPT L=6 H=6 D=384"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {args.device}, {size}, T={args.seq_len} B={args.batch}, float32, "
          f"median of {args.steps} steps")  # fmt: skip
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for mode in args.modes:
        argv = [a for a in sys.argv[1:] if a != "--modes" and a not in MODES]
        out = subprocess.run([sys.executable, __file__, *argv, "--child", mode], check=True,
                             capture_output=True, text=True, env=CHILD_ENV).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
