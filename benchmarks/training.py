"""Benchmark: GPT training throughput against the machine's own matrix-multiply rate.

Measures the float32 matmul rate of this machine (big square products: the baseline, in the
same run), then times full training steps (forward, backward, AdamW) of a GPT with L=6, H=6,
D=384, T=256, batch 16, in float32 and under bfloat16 autocast. Reports tokens/s and the model
FLOPs utilisation: achieved FLOP/s over the measured matmul rate, with the usual count per
token of 6 N (N = non-embedding parameters, forward + backward) plus 12 L T D for attention
scores and weighted sums (Kaplan et al. 2020, arXiv:2001.08361; Chowdhery et al. 2022).

    python benchmarks/training.py [--steps 5] [--batch 16] [--seq-len 256] [--threads 0]
    python benchmarks/training.py --gpt-char [--max-time 3m]   the gpt-char preset's val loss
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time

import torch

import qkv
from qkv.models.gpt import GPT, GPTConfig
from qkv.train.config import OptimConfig
from qkv.train.objectives import CausalLM
from qkv.train.optim import build_optimizer


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of an n x n x n product in ``dtype`` (median of ``repeat``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def flops_per_token(model: GPT, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 12 L T D (attention scores and weighted sums)."""
    c = model.config
    n = model.num_parameters(exclude_embeddings=True)
    return 6 * n + 12 * c.n_layers * seq_len * c.d_model


def train_rate(batch: int, seq_len: int, steps: int, bf16: bool) -> tuple[float, float]:
    """Tokens/s and seconds per step of GPT training (median step after one warm-up)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6,
                       max_seq_len=seq_len, dropout=0.0)  # fmt: skip
    model = GPT(config)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    objective = CausalLM()
    data = {"input_ids": torch.randint(0, 256, (batch, seq_len + 1))}
    batch_ = objective.prepare(data, seed=0, step=0)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            logits = objective.logits(model, batch_)
        (objective.loss_sum(logits, batch_) / batch_.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    times.sort()
    step = times[len(times) // 2]
    return batch * seq_len / step, step


def gpt_char(max_time: str) -> None:
    """Run the gpt-char preset for ``max_time`` and print its final validation loss."""
    from qkv.train import config_from_dict, load_preset, merge_overrides, train

    config = config_from_dict(merge_overrides(load_preset("gpt-char"),
                                              {"train.max_time": max_time}))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        result = train(config, f"{out}/run")
    print(f"gpt-char, {max_time}: {result.steps} steps, final val loss "
          f"{result.metrics['val_loss']:.4f} nats/char ({result.metrics.get('val_bpc', 0):.3f} "
          "bits/char)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--gpt-char", action="store_true", help="run the gpt-char preset")
    parser.add_argument("--max-time", default="3m", help="gpt-char's budget")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpt_char:
        gpt_char(args.max_time)
        return
    print(
        f"qkv {qkv.__version__}, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"threads {torch.get_num_threads()}; GPT L=6 H=6 D=384 T={args.seq_len} "
        f"B={args.batch}, median of {args.steps} steps"
    )
    peak32 = matmul_rate(torch.float32)
    peak16 = matmul_rate(torch.bfloat16)
    print(f"baseline: matmul 2048^3 float32 {peak32 / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peak16 / 1e9:.1f} GFLOP/s")  # fmt: skip
    probe = GPT(GPTConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6,
                          max_seq_len=args.seq_len))  # fmt: skip
    per_token = flops_per_token(probe, args.seq_len)
    header = f"{'precision':>10} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of fp32 mm':>11}"
    print(header)
    print("-" * len(header))
    for name, bf16 in (("float32", False), ("bf16 auto", True)):
        rate, step = train_rate(args.batch, args.seq_len, args.steps, bf16)
        achieved = rate * per_token
        print(f"{name:>10} {step:8.3f} {rate:10.0f} {achieved / 1e9:9.1f} "
              f"{achieved / peak32:10.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
