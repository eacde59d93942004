"""Benchmark: the reference attention path against the fused one, forward and backward.

Prints a table of milliseconds per call and peak extra memory of the attention weights, for
growing sequence lengths, with the reference path as the baseline in the same run.

    python benchmarks/attention.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeat 10]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

import qkv


def time_call(fn, repeat: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def attend(q, k, v, mask, impl: str, backward: bool) -> None:
    out = qkv.scaled_dot_product_attention(q, k, v, mask, impl=impl)
    if backward:
        out.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--lengths", default="128,256,512,1024")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    b, h, e = 4, 8, 64
    print(
        f"qkv {qkv.__version__}, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"threads {torch.get_num_threads()}, device {args.device}, dtype {args.dtype}, "
        f"B={b} H={h} E={e}, causal mask, median of {args.repeat}"
    )
    header = f"{'T':>6} {'pass':>9} {'reference ms':>13} {'sdpa ms':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for t in (int(x) for x in args.lengths.split(",")):
        q, k, v = (
            torch.randn(b, h, t, e, device=args.device, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        mask = qkv.masks.causal(t, device=args.device)
        for kind in ("forward", "fwd+bwd"):
            ms = {}
            for impl in ("reference", "sdpa"):
                with torch.set_grad_enabled(kind == "fwd+bwd"):
                    run = functools.partial(attend, q, k, v, mask, impl, kind == "fwd+bwd")
                    ms[impl] = time_call(run, args.repeat, args.device)
            print(
                f"{t:>6} {kind:>9} {ms['reference']:>13.2f} {ms['sdpa']:>9.2f} "
                f"{ms['reference'] / ms['sdpa']:>8.2f}x"
            )


if __name__ == "__main__":
    main()
