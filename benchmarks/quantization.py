"""Benchmark: weight-only int8 / int4 against float32 (and bfloat16), on the same weights.

For each model (the ``gpt-char`` size, from a trained run when ``--run`` is given, else random
weights; and GPT-2 small with random weights), each variant is built from the same float32
model: float32 as trained, bfloat16 (every weight cast), int8 (per output channel) and int4
(groups of ``--group-size`` columns), the two quantised ones through ``qkv.blocks.quant``
(tied head and embeddings stay float32). The table shows:

    disk MiB      model.safetensors written by save_pretrained
    memory MiB    tensors the model holds (parameters and buffers; int4's kernel copy added),
                  and the peak resident set of a fresh process that loads the saved model and
                  decodes 16 tokens (Python and torch included: the first rows show the base)
    tokens/s      decoding, batch 1, greedy, an 8-token prompt and ``--new-tokens`` new tokens
                  (at most 120 at gpt-char size: its model has 128 positions)
                  (whole call, prompt included); best of ``--repeat``, variants taking turns
                  in every repeat so a load spike on a shared machine hits all of them
    val ppl       validation perplexity of the run's split (``qkv eval``; only with ``--run``)

    python benchmarks/quantization.py [--run RUN_DIR] [--new-tokens 128] [--repeat 3]
    python benchmarks/quantization.py --kernels     (the candidate kernels at GPT-2 small shapes)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import qkv
from qkv._quant_kernels import _int4_kernel_weight
from qkv.blocks.quant import Int4Linear, QuantConfig, quantize_model
from qkv.models import GPT, GPTConfig

VARIANTS = ("float32", "bfloat16", "int8", "int4")
PROMPT = 8  # prompt tokens


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def build(model: GPT, variant: str, group_size: int) -> GPT:
    out = copy.deepcopy(model).eval()
    if variant == "bfloat16":
        return out.to(torch.bfloat16)
    if variant in ("int8", "int4"):
        bits = int(variant[3:])
        quantize_model(out, QuantConfig(bits=bits, group_size=group_size if bits == 4 else None))
    return out


def held_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for m in model.modules():  # int4's weight in the kernel's layout, made on first use
        if isinstance(m, Int4Linear) and m.group_size in (32, 64, 128, 256):
            tiled, sz = _int4_kernel_weight(m.qweight, m.scales, m.offsets)
            total += tiled.numel() * tiled.element_size() + sz.numel() * sz.element_size()
    return total


def peak_rss_mib(directory: Path) -> float:
    """Peak resident set of a fresh process that loads ``directory`` and decodes 16 tokens."""
    code = (
        "import torch, qkv\n"
        f"m = qkv.from_pretrained({str(directory)!r})\n"
        "m.generate(torch.zeros(1, 16, dtype=torch.long), max_new_tokens=16)\n"
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    )  # VmHWM: this process's peak (ru_maxrss would carry the parent's over the exec)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024  # KiB


def decode_rate(model: GPT, new_tokens: int) -> Callable[[], float]:
    new_tokens = min(new_tokens, model.config.max_seq_len - PROMPT)  # gpt-char: 128 positions
    ids = torch.randint(
        0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0)
    )

    def run() -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens)
        return new_tokens / (time.perf_counter() - start)

    return run


def perplexity(run: Path, model: GPT, workdir: Path) -> float:
    from qkv.train.loop import evaluate_run

    target = workdir / "run"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for name in ("config.yaml", "run.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, target / name)
    qkv.save_pretrained(model, target / "final")
    return evaluate_run(target, device="cpu")["val_ppl"]


def table(name: str, model: GPT, args: argparse.Namespace, run: Path | None) -> None:
    print(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters ({load()})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows: dict[str, dict[str, float]] = {}
        models = {v: build(model, v, args.group_size) for v in VARIANTS}
        for variant, m in models.items():
            directory = work / variant
            qkv.save_pretrained(m, directory)
            rows[variant] = {
                "disk": (directory / "model.safetensors").stat().st_size / 2**20,
                "held": held_bytes(m) / 2**20,
                "rss": peak_rss_mib(directory),
            }
        runners = {v: decode_rate(m, args.new_tokens) for v, m in models.items()}
        for fn in runners.values():
            fn()  # warm up
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeat):
            for v, fn in runners.items():
                rates[v].append(fn())
        for v in VARIANTS:
            rows[v]["tok/s"] = max(rates[v])
            if run is not None and v != "bfloat16":
                rows[v]["ppl"] = perplexity(run, models[v], work)
    base = rows["float32"]
    print("| variant | disk MiB | tensors MiB | peak RSS MiB | tokens/s | vs float32 | val ppl | "
          "ppl vs float32 |\n|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for v, r in rows.items():
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "-"
        dppl = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%" if "ppl" in r else "-"
        print(f"| {v} | {r['disk']:.2f} | {r['held']:.2f} | {r['rss']:.0f} | {r['tok/s']:.1f} | "
              f"{r['tok/s'] / base['tok/s']:.2f}x | {ppl} | {dppl} |")  # fmt: skip
    print(f"({load()})")


def candidates(x: torch.Tensor, w: torch.Tensor, group: int) -> dict[str, Callable[[], object]]:
    """The products compared by ``--kernels``: x (M, K) times w (N, K) transposed."""
    xb = x.bfloat16()  # (M, K)
    wb = w.bfloat16()  # (N, K)
    s8 = w.abs().amax(1) / 127  # (N,)
    q8 = torch.round(w / s8[:, None]).to(torch.int8)  # (N, K)
    layer = Int4Linear.from_linear(
        torch.nn.Linear(w.shape[1], w.shape[0], bias=False), group_size=group
    )
    tiled, sz = _int4_kernel_weight(layer.qweight, layer.scales, layer.offsets)
    int8_mm, int4_mm = (
        torch.ops.aten._weight_int8pack_mm,
        torch.ops.aten._weight_int4pack_mm_for_cpu,
    )
    out: dict[str, Callable[[], object]] = {
        "f32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "i8 ref (deq+F.linear)": lambda: F.linear(x, q8.float() * s8[:, None]),
        "i8 aten, f32 act": lambda: int8_mm(x, q8, s8),
        "i8 aten, bf16 act": lambda: int8_mm(xb, q8, s8.bfloat16()),
        "i4 ref (deq+F.linear)": lambda: layer.reference_forward(x),
        "i4 aten, f32 act": lambda: int4_mm(x, tiled, group, sz.float()),
        "i4 aten, bf16 act": lambda: int4_mm(xb, tiled, group, sz),
    }
    try:  # torchao is not a dependency: measured when installed, for the record
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    quantize_(lin, Int8WeightOnlyConfig())
    out["i8 torchao"] = lambda: lin(x)
    return out


def kernels(args: argparse.Namespace) -> None:
    """Microseconds per product: the fastest single call (the one least disturbed by other
    processes on a shared machine), the candidates taking turns."""
    print(f"\nkernels, {torch.get_num_threads()} threads, microseconds per call ({load()})")
    for rows in (1, 128):
        for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
            w = torch.randn(n, k) / k**0.5  # (N, K)
            c = candidates(torch.randn(rows, k), w, args.group_size)
            times: dict[str, list[float]] = {name: [] for name in c}
            with torch.inference_mode():
                for fn in c.values():
                    fn()
                for _ in range(200 if rows == 1 else 10):
                    for name, fn in c.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            shown = "  ".join(f"{name} {min(t) * 1e6:.0f}" for name, t in times.items())
            print(f"M={rows} K={k} N={n}: {shown}", flush=True)
    print(f"({load()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained gpt-char run (for perplexity)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--kernels", action="store_true", help="only the kernel table")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the gpt-char size")
    args = parser.parse_args()
    flags = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()} "
          f"({flags}), {torch.get_num_threads()} threads, {load()}")  # fmt: skip
    if args.kernels:
        kernels(args)
        return
    torch.manual_seed(0)
    if args.run is not None:
        small = qkv.from_pretrained(args.run / "final")
    else:
        small = GPT(GPTConfig(vocab_size=108, d_model=128, n_layers=4, n_heads=4))
    table("gpt-char size (L=4, d=128)", small, args, args.run)
    if not args.skip_gpt2:
        gpt2 = GPT(GPTConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                             max_seq_len=1024))  # fmt: skip
        table("GPT-2 small size (L=12, d=768, V=50257), random weights", gpt2, args, None)


if __name__ == "__main__":
    main()
