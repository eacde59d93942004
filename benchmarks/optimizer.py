"""Benchmark: one AdamW step, PyTorch's fused kernel against its multi-tensor (foreach) form.

The parameters are those of the GPT that benchmarks/training.py times (L=6, H=6, D=384,
V=256: 10.8M parameters), with random gradients; both optimizers get qkv's parameter groups
(``qkv.train.optim.param_groups``). The two forms alternate, the median step of each is
printed, and the largest difference between the parameters they produce after the same steps
shows that they compute the same update.

    python benchmarks/optimizer.py [--steps 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qkv.models.gpt import GPT, GPTConfig
from qkv.train.optim import param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6, max_seq_len=256)
    models = {"foreach": GPT(config).to(device)}
    models["fused"] = copy.deepcopy(models["foreach"])
    optimizers = {
        kind: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, **{kind: True})  # type: ignore[arg-type]
        for kind, model in models.items()
    }
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for step in range(args.steps + 2):
        grads = [torch.randn_like(p) for p in models["foreach"].parameters()]
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for kind in order:
            for p, g in zip(models[kind].parameters(), grads, strict=True):
                p.grad = g
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizers[kind].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # two warm-up steps
                times[kind].append(time.perf_counter() - start)
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(models["foreach"].parameters(), models["fused"].parameters(), strict=True)
    )
    n = sum(p.numel() for p in models["foreach"].parameters())
    base = statistics.median(times["foreach"])
    print(f"AdamW over {n:,} parameters on {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.steps} steps")  # fmt: skip
    print()
    print("| form | ms per step | speed-up |")
    print("|---|---:|---:|")
    for kind, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"| {kind} | {ms:.2f} | {base / statistics.median(ts):.2f}x |")
    print()
    print(f"largest parameter difference after {args.steps + 2} steps: {gap:.1e}")


if __name__ == "__main__":
    main()
