"""Benchmark: GPT training throughput against the machine's own matrix-multiply rate.

Measures the matmul rate of this machine (big square products: the baseline, in the same run),
then times full training steps (forward, backward, AdamW) of a GPT with L=6, H=6, D=384, T=256,
batch 16, in float32 and under bfloat16 autocast. Reports tokens/s and the model FLOPs
utilisation: achieved FLOP/s over the measured float32 matmul rate, with the usual count per
token of 6 N (N = non-embedding parameters, forward + backward) plus 12 L T D for attention
scores and weighted sums (Kaplan et al. 2020, arXiv:2001.08361; Chowdhery et al. 2022).

With ``--against nanogpt`` it times qkv's GPT side by side with nanoGPT's (Karpathy's
``model.py``, imported from ``--nanogpt-dir``, never copied): the same shapes, the same weights
(nanoGPT's, copied into qkv's GPT), the same identical batches and the same optimizer, one qkv
step and one nanoGPT step after the other, so that a load that comes and goes on a shared
machine falls on both. See ``against_nanogpt`` for what is counted.

    python benchmarks/training.py [--steps 5] [--batch 16] [--seq-len 256] [--threads 0]
                                  [--device cpu|cuda]
    python benchmarks/training.py --against nanogpt --nanogpt-dir ../shared/peers/nanogpt
                                  [--steps 10] [--device cpu|cuda] [--threads 0]
                                  [--own-optimizers] [--compile]
    python benchmarks/training.py --gpt-char [--max-time 3m]   the gpt-char preset's val loss
    python benchmarks/training.py --trainer [--trainer-steps 40] [--tiny] [--device cpu|cuda]
                                  [--threads 0] [--cache-dir DIR]

With ``--trainer`` it runs the real trainer (``qkv.train.train``) on the gpt-char preset for a
fixed number of steps, twice (steps only; then evaluation, sampling and checkpoints every few
steps), with a bare training step of the same model after every trainer step, and prints what
the trainer costs beyond the bare step and where. See ``against_trainer``.

Shape legend: B batch · T positions · D model width · H heads · V vocabulary · L layers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import importlib.util
import io
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import qkv
from qkv.interop import hf_gpt2
from qkv.models.gpt import GPT, GPTConfig
from qkv.train import config_from_dict, load_preset, merge_overrides, train
from qkv.train import loop as trainer_loop
from qkv.train.build import autocast_dtype, autocast_factory, build_model, build_objective
from qkv.train.config import OptimConfig, TrainConfig
from qkv.train.metrics import MetricsLog, StepMetrics, TrainCallback, read_metrics
from qkv.train.objectives import Batch, CausalLM, Objective, loss_sum
from qkv.train.optim import build_optimizer
from qkv.train.rundir import default_cache_dir
from qkv.train.state import RunParts


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock reads it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    dtype: torch.dtype, n: int = 2048, repeat: int = 5, device: torch.device | None = None
) -> float:
    """FLOP/s of an n x n x n product in ``dtype`` on ``device`` (median of ``repeat``)."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)  # (n, n)
    b = torch.randn(n, n, dtype=dtype, device=device)  # (n, n)
    a @ b
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def matmul_size(device: torch.device) -> int:
    """n of the baseline product: 2048 keeps a CPU busy; a GPU needs 8192 to reach its peak."""
    return 8192 if device.type == "cuda" else 2048


def flops_per_token(model: GPT, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 12 L T D (attention scores and weighted sums)."""
    c = model.config
    n = model.num_parameters(exclude_embeddings=True)
    return 6 * n + 12 * c.n_layers * seq_len * c.d_model


def train_rate(
    batch: int, seq_len: int, steps: int, bf16: bool, device: torch.device
) -> tuple[float, float]:
    """Tokens/s and seconds per step of GPT training (median step after one warm-up)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6,
                       max_seq_len=seq_len, dropout=0.0)  # fmt: skip
    model = GPT(config).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    objective = CausalLM()
    data = {"input_ids": torch.randint(0, 256, (batch, seq_len + 1))}
    batch_ = objective.prepare(data, seed=0, step=0).to(device)
    times = []
    for i in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        with autocast:
            logits = objective.logits(model, batch_)
        (objective.loss_sum(logits, batch_) / batch_.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    times.sort()
    step = times[len(times) // 2]
    return batch * seq_len / step, step


def gpt_char(max_time: str) -> None:
    """Run the gpt-char preset for ``max_time`` and print its final validation loss."""
    config = config_from_dict(merge_overrides(load_preset("gpt-char"),
                                              {"train.max_time": max_time}))  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        result = train(config, f"{out}/run")
    print(f"gpt-char, {max_time}: {result.steps} steps, final val loss "
          f"{result.metrics['val_loss']:.4f} nats/char ({result.metrics.get('val_bpc', 0):.3f} "
          "bits/char)")  # fmt: skip


def machine_line(device: torch.device) -> str:
    """CPU model and the matmul-relevant instruction sets, torch, Python (and the GPU)."""
    name, flags = platform.processor() or "cpu", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    amx = sorted(f for f in flags if f.startswith("amx"))
    features = [f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16")]
    features.append(f"amx {' '.join(amx) if amx else 'no'}")
    line = (
        f"machine: {name}, {', '.join(features)}; torch {torch.__version__}, Python "
        f"{platform.python_version()}, qkv {qkv.__version__}, threads {torch.get_num_threads()}"
    )
    if device.type == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return line


# -- qkv against nanoGPT --------------------------------------------------------------------------

LR, BETAS, WEIGHT_DECAY = 6e-4, (0.9, 0.95), 0.1  # nanoGPT's train.py defaults, for both models


@dataclass(frozen=True, kw_only=True)
class Shape:
    """One configuration both models are built with and trained on."""

    name: str
    n_layers: int
    n_heads: int
    d_model: int
    seq_len: int  # T, also both models' number of learned positions
    batch: int  # B
    vocab_size: int = 256  # V; byte-sized on the CPU, GPT-2's padded 50304 on the GPU
    bf16: bool = False  # bfloat16 autocast (float32 weights and optimizer)
    compile: bool = False  # torch.compile both models


CPU_SHAPES = (
    Shape(name="L6 H6 D384 T256 B16", n_layers=6, n_heads=6, d_model=384, seq_len=256, batch=16),
    Shape(name="L4 H4 D128 T128 B16", n_layers=4, n_heads=4, d_model=128, seq_len=128, batch=16),
)
_GPT2_SMALL = {"n_layers": 12, "n_heads": 12, "d_model": 768, "seq_len": 1024, "batch": 16,
               "vocab_size": 50304, "bf16": True}  # fmt: skip
CUDA_SHAPES = (
    Shape(name="GPT-2 small, eager", **_GPT2_SMALL),
    Shape(name="GPT-2 small, compiled", compile=True, **_GPT2_SMALL),
)


def load_nanogpt(directory: str) -> ModuleType:
    """nanoGPT's ``model.py`` from ``directory``, imported in place (the project holds no copy)."""
    path = Path(directory) / "model.py"
    if not path.is_file():
        raise SystemExit(f"--nanogpt-dir {directory}: no model.py there (nanoGPT's model file)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being built
    spec.loader.exec_module(module)
    return module


def build_qkv(shape: Shape) -> GPT:
    """qkv's GPT at ``shape``, with nanoGPT's exact (erf) GELU instead of GPT-2's tanh one."""
    return GPT(GPTConfig(vocab_size=shape.vocab_size, d_model=shape.d_model,
                         n_layers=shape.n_layers, n_heads=shape.n_heads,
                         max_seq_len=shape.seq_len, dropout=0.0, activation="gelu"))  # fmt: skip


def build_nanogpt(shape: Shape, nanogpt: ModuleType) -> nn.Module:
    """nanoGPT's GPT at ``shape`` (biases on, as GPT-2), its parameter-count print silenced."""
    config = nanogpt.GPTConfig(block_size=shape.seq_len, vocab_size=shape.vocab_size,
                               n_layer=shape.n_layers, n_head=shape.n_heads,
                               n_embd=shape.d_model, dropout=0.0, bias=True)  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        return nanogpt.GPT(config)


# nanoGPT's names are Hugging Face GPT-2's; its nn.Linear weights are (out, in), the transpose
# of GPT-2's Conv1D (in, out). Transposed back, its state dict goes through qkv's own converter.
_NANOGPT_LINEARS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight")  # fmt: skip


def weights_from_nanogpt(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """nanoGPT's state dict as qkv ``GPT``'s, through ``qkv.interop.hf_gpt2.weights_from_hf``."""
    hf = {k: v.t() if k.endswith(_NANOGPT_LINEARS) else v for k, v in state.items()}
    return hf_gpt2.weights_from_hf(hf, config)


def num_parameters(model: nn.Module) -> int:
    """Parameters, a tied tensor counted once (``parameters()`` yields it once)."""
    return sum(p.numel() for p in model.parameters())


def adamw(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """Plain AdamW over all parameters, the same for both models (fused on CUDA).

    Neither library's own grouping: qkv decays no norms, biases or embeddings, nanoGPT decays
    every 2-D tensor, embeddings included; one rule for both keeps the step the same work.
    """
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS,
                             weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")  # fmt: skip


def own_optimizer(name: str, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Each library's own AdamW, as its training code builds it (``--own-optimizers``).

    qkv: ``qkv.train.optim.build_optimizer`` (decays Linear weights only; PyTorch's fused kernel
    on CPUs and GPUs). nanoGPT: its ``configure_optimizers`` (decays every 2-D tensor; fused on
    CUDA only). The same learning rate, betas and weight decay for both.
    """
    if name == "qkv":
        config = OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY)
        return build_optimizer(model, config)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its group sizes
        return model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type)  # type: ignore[operator]


def qkv_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """qkv's training loss, inputs and targets (B, T), the way its trainer computes it."""
    batch = Batch(inputs={"input_ids": inputs}, targets=targets)  # what CausalLM prepares
    logits = model(**batch.inputs).logits  # (B, T, V)
    return loss_sum(logits, batch.targets) / batch.num_targets


def nanogpt_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """nanoGPT's training loss, inputs and targets (B, T), computed inside its forward."""
    return model(inputs, targets)[1]


@torch.no_grad()
def same_function(ours: GPT, theirs: nn.Module, inputs: Tensor, targets: Tensor) -> str:
    """The float32 loss gap on one batch, with the same weights ("MISMATCH" when they differ).

    At GPT-2's initialisation every loss is near ln V, so a wrong mapping (q and k swapped in
    one layer) moves the loss by only about 1e-5; the logits, compared relative to their
    largest, move by about 1e-2 and catch it (and tanh GELU against nanoGPT's erf one, 4e-5).
    A mismatch is printed and marked in the table rather than stopping the other shapes.
    """
    loss_gap = abs(
        qkv_loss(ours, inputs, targets).item() - nanogpt_loss(theirs, inputs, targets).item()
    )
    logits, reference = ours(inputs).logits, theirs(inputs, targets)[0]  # (B, T, V) each
    logits_gap = ((logits - reference).abs().max() / reference.abs().max()).item()
    if loss_gap <= 1e-4 and logits_gap <= 1e-5:
        return f"{loss_gap:.1e}"
    print(
        f"MISMATCH: with the same weights the losses differ by {loss_gap:.1e} (at most 1e-4), "
        f"the logits by {logits_gap:.1e} of their largest (at most 1e-5)"
    )
    return f"{loss_gap:.1e} MISMATCH"


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
TokenBatch = tuple[Tensor, Tensor]  # inputs x_1 .. x_T and targets x_2 .. x_{T+1}, (B, T) each


def token_batches(shape: Shape, count: int, device: torch.device) -> list[TokenBatch]:
    """``count`` random batches, contiguous (nanoGPT's loss views its targets flat)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (count, shape.batch, shape.seq_len + 1),
                        generator=generator)  # (count, B, T + 1) # fmt: skip
    return [(x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)) for x in ids]


@dataclass
class Contestant:
    """A model in training: its loss, optimizer, step times and memory."""

    name: str
    model: nn.Module  # what runs (compiled or not)
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    times: list[float]
    last_loss: float = float("nan")
    memory: str = "n/a"

    def step(self, batch: TokenBatch, shape: Shape, device: torch.device) -> float:
        """One full training step (forward, loss, backward, AdamW); its seconds."""
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if shape.bf16
            else contextlib.nullcontext()
        )
        sync(device)
        start = time.perf_counter()
        with autocast:
            loss = self.loss_fn(self.model, *batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        self.last_loss = loss.item()
        return seconds


def tensor_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cuda_footprint(c: Contestant, batch: TokenBatch, shape: Shape, device: torch.device) -> str:
    """GiB one model's training needs: weights + optimizer state + a step's peak above them.

    Both models live on the GPU at once, so the other's tensors are measured away: the step's
    peak is taken above what was allocated just before it (by now the optimizer state exists).
    """
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    c.step(batch, shape, device)
    transient = torch.cuda.max_memory_allocated(device) - before
    state = [t for s in c.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = tensor_bytes(list(c.model.parameters())) + tensor_bytes(state)
    return f"{(resident + transient) / 2**30:.2f} GiB"


def peak_rss_kib() -> int:
    """This process's peak resident set (KiB): VmHWM, its memory map's high-water mark.

    Not ``resource.getrusage(...).ru_maxrss``: Linux carries the largest RSS of a process over
    ``execve``, so a child started by fork + exec from this benchmark would report at least the
    parent's RSS (models and all) and hide its own growth; VmHWM starts afresh with the new map.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("/proc/self/status has no VmHWM line")


def cpu_peak_rss(which: str, shape: Shape, nanogpt_dir: str, threads: int) -> tuple[int, int]:
    """In a fresh process: peak RSS (KiB) after the imports, and after two eager training steps."""
    if threads:
        torch.set_num_threads(threads)
    nanogpt = load_nanogpt(nanogpt_dir)
    batches = token_batches(shape, 2, torch.device("cpu"))
    before = peak_rss_kib()
    model = build_qkv(shape) if which == "qkv" else build_nanogpt(shape, nanogpt)
    loss_fn = qkv_loss if which == "qkv" else nanogpt_loss
    c = Contestant(which, model, loss_fn, adamw(model, torch.device("cpu")), [])
    for batch in batches:
        c.step(batch, shape, torch.device("cpu"))
    return before, peak_rss_kib()


def cpu_footprint(which: str, shape: Shape, nanogpt_dir: str, threads: int) -> str:
    """MiB a fresh process's peak RSS grows by, building the model and training 2 steps."""
    if not Path("/proc/self/status").is_file():
        return "n/a (no /proc)"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        before, after = pool.submit(cpu_peak_rss, which, shape, nanogpt_dir, threads).result()
    return f"{(after - before) / 1024:.0f} MiB"


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def against_nanogpt(args: argparse.Namespace, device: torch.device) -> None:
    """Time qkv's GPT and nanoGPT's side by side on each shape; print a markdown table.

    Per shape: both built at the same size (parameter counts checked equal), nanoGPT's weights
    copied into qkv's GPT and the two compared on one batch (``same_function``, float32); then
    the same AdamW for both, the same batches, warm-up pairs, and ``--steps`` timed pairs, qkv
    first in even pairs and nanoGPT first in odd ones. tokens/s = B T / median step; % of peak
    = tokens/s x FLOPs per token (``flops_per_token``, the same count for both) over the matmul
    rate of the step's dtype; qkv/nanoGPT = nanoGPT's step time / qkv's, per pair (> 1: qkv is
    faster), median and min-max.
    """
    nanogpt = load_nanogpt(args.nanogpt_dir)
    shapes = CPU_SHAPES + (CUDA_SHAPES if device.type == "cuda" else ())
    if args.compile:  # the CPU shapes once more, both models torch.compiled
        shapes += tuple(replace(s, name=f"{s.name}, compiled", compile=True) for s in CPU_SHAPES)
    peaks: dict[torch.dtype, float] = {}
    n = matmul_size(device)
    for dtype in sorted({torch.bfloat16 if s.bf16 else torch.float32 for s in shapes}, key=str):
        peaks[dtype] = matmul_rate(dtype, n=n, device=device)
    print(machine_line(device))
    print("baseline: matmul " + ", ".join(f"{n}^3 {str(d).removeprefix('torch.')} "
          f"{r / 1e9:.1f} GFLOP/s" for d, r in peaks.items()))  # fmt: skip
    if args.own_optimizers:
        print(f"optimizer: each library's own AdamW (qkv's build_optimizer, fused; nanoGPT's "
              f"configure_optimizers, fused on CUDA only), lr {LR}, betas {BETAS}, weight decay "
              f"{WEIGHT_DECAY}; qkv's GPT with activation='gelu' (nanoGPT's exact GELU); "
              "dropout 0")  # fmt: skip
    else:
        print(f"optimizer: torch.optim.AdamW over all parameters for both, lr {LR}, betas "
              f"{BETAS}, weight decay {WEIGHT_DECAY}{', fused' if device.type == 'cuda' else ''}; "
              "qkv's GPT with activation='gelu' (nanoGPT's exact GELU); dropout 0")  # fmt: skip
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        theirs = build_nanogpt(shape, nanogpt)
        ours = build_qkv(shape)
        ours.load_state_dict(weights_from_nanogpt(theirs.state_dict(), ours.config))
        if num_parameters(ours) != num_parameters(theirs):
            raise SystemExit(f"{shape.name}: qkv has {num_parameters(ours):,} parameters, "
                             f"nanoGPT {num_parameters(theirs):,}")  # fmt: skip
        ours, theirs = ours.to(device), theirs.to(device)
        steps, warmup = args.steps, 3 if shape.compile else 2
        batches = token_batches(shape, warmup + steps, device)
        gap = same_function(ours, theirs, *batches[0])
        print(
            f"{shape.name}: {num_parameters(ours):,} parameters each; with the same weights "
            f"their float32 losses on one batch differ by {gap}"
        )
        per_token = flops_per_token(ours, shape.seq_len)
        run_ours = torch.compile(ours) if shape.compile else ours
        run_theirs = torch.compile(theirs) if shape.compile else theirs
        if args.own_optimizers:
            optimizers = (own_optimizer("qkv", ours, device),
                          own_optimizer("nanogpt", theirs, device))  # fmt: skip
        else:
            optimizers = adamw(ours, device), adamw(theirs, device)
        pair = (
            Contestant("qkv", run_ours, qkv_loss, optimizers[0], []),
            Contestant("nanoGPT", run_theirs, nanogpt_loss, optimizers[1], []),
        )
        for i in range(warmup):
            for c in pair:
                c.step(batches[i], shape, device)
        if device.type == "cuda":
            for c in pair:
                c.memory = cuda_footprint(c, batches[0], shape, device)
        for i in range(steps):
            for c in pair if i % 2 == 0 else pair[::-1]:
                c.times.append(c.step(batches[warmup + i], shape, device))
        if device.type == "cpu":  # the footprint process trains eagerly: no row for compiled
            for c in pair:
                c.memory = (
                    "see eager"
                    if shape.compile
                    else cpu_footprint(c.name.lower(), shape, args.nanogpt_dir, args.threads)
                )
        ratios = [t / o for o, t in zip(pair[0].times, pair[1].times, strict=True)]
        peak = peaks[torch.bfloat16 if shape.bf16 else torch.float32]
        rates = [shape.batch * shape.seq_len / statistics.median(c.times) for c in pair]
        print(f"{shape.name}: loss at the last step (same start, same batches): qkv "
              f"{pair[0].last_loss:.4f}, nanoGPT {pair[1].last_loss:.4f}")  # fmt: skip
        rows.append([shape.name + (", bf16" if shape.bf16 else ", fp32"), gap,
                     *(f"{r:,.0f}" for r in rates), *(f"{r * per_token / peak:.1%}" for r in rates),
                     *(c.memory for c in pair), spread(ratios)])  # fmt: skip
        print("row: | " + " | ".join(rows[-1]) + " |")  # kept if a later shape runs out of time
        del pair, run_ours, run_theirs, ours, theirs, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS growth"
    header = ["config", "Δloss (same weights)", "qkv tok/s", "nanoGPT tok/s", "qkv % peak",
              "nanoGPT % peak", f"qkv {memory}", f"nanoGPT {memory}",
              f"qkv/nanoGPT, median (min-max) of {args.steps} pairs"]  # fmt: skip
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- the trainer against the bare step ------------------------------------------------------------

# --tiny: a model and batch small enough for a test to run the whole comparison in seconds.
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "data.seq_len": 32,
        "train.batch_size": 8, "train.eval_batches": 4, "eval.sample_tokens": 16}  # fmt: skip
TRAINER_WARMUP = 2  # the first steps of both loops allocate and fill caches: not timed
PRESET_EVERY = 100  # gpt-char's own eval_every and checkpoint_every


class Spans:
    """Seconds spent in named functions of the trainer, timed by wrapping them in place.

    Only the outermost timed call counts (an evaluation's own batch copies belong to the
    evaluation). ``restore`` puts every original back; nothing in ``src/`` is edited.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self._depth = 0
        self._undo: list[tuple[object, str, object]] = []

    def replace(self, owner: object, name: str, new: object) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds.setdefault(label, []).append(time.perf_counter() - start)

        self.replace(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def total(self, label: str) -> float:
        return sum(self.seconds.get(label, []))

    def calls(self, label: str) -> int:
        return len(self.seconds.get(label, []))

    def mean(self, label: str) -> float:
        return self.total(label) / max(self.calls(label), 1)


@dataclass
class BareStep:
    """The training step without the trainer: the same model, batches, optimizer, precision.

    Built with the trainer's own builders (``build_model``, ``build_objective``,
    ``build_optimizer``, ``autocast_dtype``) from the same config; the batches are the
    trainer's (the same data source, seed and steps), prepared and moved to the device
    beforehand. One step: forward under autocast, loss, backward, gradient clipping, AdamW,
    zero_grad; nothing read back to the host.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    autocast: Callable[[], contextlib.AbstractContextManager[object]]
    batches: list[Batch]
    counts: list[int]  # N of each batch, counted beforehand (counting reads back)
    grad_clip: float
    device: torch.device

    @classmethod
    def build(cls, config: TrainConfig, cache_dir: Path, device: torch.device) -> BareStep:
        from qkv.data import build_data

        c = config.train
        source, _ = build_data(config.data, cache_dir)
        model = build_model(config, source).to(device)
        model.train()
        objective = build_objective(config, source, model.config)
        batches = [objective.prepare(source.train_batch(step, c.batch_size, c.seed), seed=c.seed,
                                     step=step) for step in range(c.max_steps)]  # fmt: skip
        precision = autocast_dtype(c.precision, device)
        return cls(
            model=model, optimizer=build_optimizer(model, config.optim), objective=objective,
            autocast=autocast_factory(precision, device),
            batches=[b.to(device) for b in batches], counts=[b.num_targets for b in batches],
            grad_clip=config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf,
            device=device,
        )  # fmt: skip

    def run(self, index: int) -> None:
        batch = self.batches[index % len(self.batches)]
        with self.autocast():
            logits = self.objective.logits(self.model, batch)  # (B, T, V)
        (self.objective.loss_sum(logits, batch) / self.counts[index % len(self.counts)]).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, index: int) -> float:
        """One step on batch ``index``, timed with the device drained on both sides; seconds."""
        sync(self.device)
        start = time.perf_counter()
        self.run(index)
        sync(self.device)
        return time.perf_counter() - start

    def unsynced(self, steps: int) -> float:
        """Seconds per step of ``steps`` steps queued back to back, one drain at the end."""
        sync(self.device)
        start = time.perf_counter()
        for i in range(steps):
            self.run(i)
        sync(self.device)
        return (time.perf_counter() - start) / steps


class BareAlongside(TrainCallback):
    """After every trainer step, one bare step (a load that comes and goes falls on both);
    it times itself (the trainer's clock leaves callbacks out, so this is for the record)."""

    def __init__(self, bare: BareStep) -> None:
        self.bare = bare
        self.bare_seconds: dict[int, float] = {}
        self.own_seconds: dict[int, float] = {}

    def on_step(self, metrics: StepMetrics) -> None:
        start = time.perf_counter()
        self.bare_seconds[metrics.step] = self.bare(metrics.step - 1)
        self.own_seconds[metrics.step] = time.perf_counter() - start


@dataclass(frozen=True, kw_only=True)
class TrainerRun:
    """One trainer run and the bare steps beside it; seconds, keyed by step (1 = the first)."""

    name: str
    every: int  # eval_every = checkpoint_every (0: only at the end)
    bare: dict[int, float]
    step: dict[int, float]  # the trainer's own record: tokens of the step / its tokens_per_s
    iteration: dict[int, float]  # from the previous step's clock to this one's, less the callback
    spans: Spans
    precision: str

    @property
    def timed(self) -> list[int]:
        return [s for s in sorted(self.step) if s > TRAINER_WARMUP and s in self.iteration]


def trainer_config(args: argparse.Namespace, every: int) -> TrainConfig:
    """The gpt-char preset for ``--trainer-steps`` steps, evaluating and checkpointing every
    ``every`` steps (0: only at the end), on ``--device`` (``--tiny``: a toy size)."""
    overrides: dict[str, object] = {
        "train.max_steps": args.trainer_steps, "train.max_time": "",
        "train.eval_every": every, "train.checkpoint_every": every,
        "train.device": args.device, "train.threads": args.threads,
    }  # fmt: skip
    if args.tiny:
        overrides.update(TINY)
    return config_from_dict(merge_overrides(load_preset("gpt-char"), overrides))


def run_trainer(
    args: argparse.Namespace, device: torch.device, name: str, every: int
) -> TrainerRun:
    """``qkv.train.train`` on ``trainer_config(args, every)``, a bare step after each step."""
    config = trainer_config(args, every)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    bare = BareStep.build(config, cache_dir, device)
    callback = BareAlongside(bare)
    spans = Spans()

    def setup_run(*a: Any, **k: Any) -> RunParts:
        run = original_setup(*a, **k)
        spans.wrap(run.source, "train_batch", "data")
        spans.wrap(run.objective, "prepare", "data")
        spans.wrap(run.evaluator, "evaluate", "validation")
        spans.wrap(run.evaluator, "sample", "sample")
        return run

    original_setup = trainer_loop.setup_run
    spans.replace(trainer_loop, "setup_run", setup_run)
    spans.wrap(trainer_loop, "setup_run", "setup")
    spans.wrap(Batch, "to", "to device")
    spans.wrap(MetricsLog, "write", "logging")
    spans.wrap(trainer_loop, "_checkpoint", "checkpoint")
    spans.wrap(trainer_loop, "_finish", "finish")
    try:
        with tempfile.TemporaryDirectory() as out:
            train(config, f"{out}/run", cache_dir=cache_dir, callback=callback)
            rows = read_metrics(Path(out) / "run" / "metrics.csv")
    finally:
        spans.restore()
    step, iteration, tokens, clock = {}, {}, 0, {}
    for row in rows:
        s = int(row["step"])
        step[s] = (int(row["tokens"]) - tokens) / float(row["tokens_per_s"])
        tokens, clock[s] = int(row["tokens"]), float(row["time"])
        if s - 1 in clock:
            iteration[s] = clock[s] - clock[s - 1]  # the clock leaves out the callback
    precision = autocast_dtype(config.train.precision, device)
    return TrainerRun(
        name=name, every=every, bare=callback.bare_seconds, step=step, iteration=iteration,
        spans=spans, precision=str(precision).removeprefix("torch.") if precision else "float32",
    )  # fmt: skip


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def percent(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def trainer_row(run: TrainerRun, steps: int) -> list[str]:
    """One table row: medians, per-pair overhead, mean iteration, and the timed spans."""
    timed = run.timed
    bare = [run.bare[s] for s in timed]
    step = [run.step[s] for s in timed]
    iteration = [run.iteration[s] for s in timed]
    pairs = [t / b for t, b in zip(step, bare, strict=True)]
    sp = run.spans
    data = (sp.total("data") + sp.total("to device")) / steps
    return [
        run.name, str(len(timed)), ms(statistics.median(bare)), ms(statistics.median(step)),
        f"{percent(statistics.median(pairs))} ({percent(min(pairs))} to {percent(max(pairs))})",
        f"{ms(min(bare))} / {ms(min(step))}", ms(statistics.median(iteration)),
        ms(statistics.mean(iteration)), percent(statistics.mean(iteration) / statistics.mean(bare)),
        f"{data * 1e3:.3f}", f"{sp.mean('logging') * 1e3:.3f}",
        *(f"{ms(sp.mean(label))} x {sp.calls(label)}"
          for label in ("validation", "sample", "checkpoint")),
    ]  # fmt: skip


def against_trainer(args: argparse.Namespace, device: torch.device) -> None:
    """Time ``qkv train``'s steps against the bare step; print a markdown table.

    Two runs of the gpt-char preset (``--tiny``: a toy size) for ``--trainer-steps`` steps:
    "steps only" (evaluation, sample and checkpoint only after the last step) and one that
    evaluates (the preset's whole validation split and 200-character sample), and
    checkpoints, every quarter of the steps. Inside each, after every trainer step, the
    callback runs one bare step (``BareStep``). The first ``TRAINER_WARMUP`` steps of both are
    not timed.

    What is timed:
    trainer step    the trainer's own record: metrics.csv's tokens of the step over its
                    ``tokens_per_s``, i.e. its clock around the schedule, the data, forward,
                    backward, clipping, AdamW and the read-back of loss and gradient norm
    loop iteration  the difference of metrics.csv's ``time`` between consecutive steps: the
                    trainer's training clock, which leaves out what follows a step (evaluation,
                    sample, metrics.csv, callbacks such as the bare step, checkpoint)
    spans           wall seconds inside the trainer's functions, wrapped in place (``Spans``):
                    data = ``source.train_batch`` + ``objective.prepare`` + ``Batch.to``
                    (inside the step), logging = ``MetricsLog.write``, validation =
                    ``Evaluator.evaluate``, sample = ``Evaluator.sample``, checkpoint =
                    ``_checkpoint`` (wall time, outside the training clock)
    overhead        per pair, trainer step / the bare step right after it, median (min to max);
                    and mean loop iteration / mean bare step. On a loaded machine the fastest
                    steps (min) are the steadier comparison.

    The trainer's clock (metrics.csv ``time``) stops during evaluations, logging, callbacks
    and checkpoints, so the mean loop iteration is what a ``train.max_time`` budget pays per
    step; the spans are what those pauses add to the wall time.
    """
    steps = args.trainer_steps
    load_before = os.getloadavg()
    print(machine_line(device))
    every = max(1, steps // 4)
    runs = [
        run_trainer(args, device, "steps only", 0),
        run_trainer(args, device, f"eval + sample + checkpoint every {every}", every),
    ]
    config = trainer_config(args, 0)
    m = config.model.options
    print(f"gpt-char{' (--tiny)' if args.tiny else ''}: L={m['n_layers']} H={m['n_heads']} "
          f"D={m['d_model']} T={config.data.seq_len} B={config.train.batch_size}, "
          f"{runs[0].precision} autocast as the trainer chooses it ({config.train.precision}), "
          f"{steps} steps per run, the first {TRAINER_WARMUP} not timed")  # fmt: skip
    print("trainer step: its own record (metrics.csv tokens / tokens_per_s); bare step: "
          "forward, loss, backward, clip, AdamW of the same model, optimizer and batches, "
          "after each trainer step")  # fmt: skip
    header = ["run", "timed steps", "bare step, median (ms)", "trainer step, median (ms)",
              "step overhead, median of pairs (min to max)", "fastest step, bare / trainer (ms)",
              "loop iteration, median (ms)",
              "loop iteration, mean (ms)", "mean iteration overhead", "data (ms/step)",
              "logging (ms/step)", "validation (ms x calls)", "sample (ms x calls)",
              "checkpoint (ms x calls)"]  # fmt: skip
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for run in runs:
        print("| " + " | ".join(trainer_row(run, steps)) + " |")
    print()
    # Every evaluation and checkpoint of both runs, at the preset's cadence: the mean call
    # against the median bare step, and the fastest call against the fastest bare step.
    labels = ("validation", "sample", "checkpoint")
    calls = {k: [t for run in runs for t in run.spans.seconds.get(k, [])] for k in labels}
    bare = [run.bare[s] for run in runs for s in run.timed]
    mean_cost = sum(statistics.mean(calls[k]) for k in labels) / PRESET_EVERY
    best_cost = sum(min(calls[k]) for k in labels) / PRESET_EVERY
    print(f"at the preset's own cadence (validation + sample + checkpoint every {PRESET_EVERY} "
          f"steps): {mean_cost * 1e3:.2f} ms per step from the mean calls, "
          f"{mean_cost / statistics.median(bare):.1%} of the median bare step; "
          f"{best_cost * 1e3:.2f} ms from the fastest calls, {best_cost / min(bare):.1%} of "
          "the fastest bare step")  # fmt: skip
    for run in runs:
        sp = run.spans
        print(f"{run.name}: setup {sp.total('setup'):.2f} s, fetch + prepare "
              f"{sp.total('data') / steps * 1e3:.3f} ms/step, to device "
              f"{sp.total('to device') / steps * 1e3:.3f} ms/step, final export + loss plot "
              f"{sp.total('finish'):.2f} s")  # fmt: skip
    if device.type == "cuda":
        bare_step = BareStep.build(trainer_config(args, 0), Path(args.cache_dir or
                                   default_cache_dir()), device)  # fmt: skip
        for i in range(TRAINER_WARMUP):
            bare_step(i)
        synced = statistics.median(bare_step(i) for i in range(steps))
        queued = bare_step.unsynced(steps)
        print(
            f"bare step drained every step {ms(synced)} ms, queued back to back "
            f"{ms(queued)} ms: a read-back per step costs {percent(synced / queued)}"
        )
    load_after = os.getloadavg()
    print(
        f"load average (1, 5, 15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (pairs with --against)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--against", choices=("nanogpt",), help="time side by side with a peer")
    parser.add_argument("--nanogpt-dir", help="folder holding nanoGPT's model.py")
    parser.add_argument(
        "--own-optimizers",
        action="store_true",
        help="with --against: each library's own AdamW, not one for both",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --against: also time the CPU shapes with both models torch.compiled",
    )
    parser.add_argument("--gpt-char", action="store_true", help="run the gpt-char preset")
    parser.add_argument("--max-time", default="3m", help="gpt-char's budget")
    parser.add_argument("--trainer", action="store_true", help="time the trainer's steps")
    parser.add_argument("--trainer-steps", type=int, default=40, help="steps per trainer run")
    parser.add_argument("--tiny", action="store_true", help="--trainer at a toy size (tests)")
    parser.add_argument("--cache-dir", help="tokenized-corpus cache (default: qkv's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpt_char:
        gpt_char(args.max_time)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.trainer:
        if args.trainer_steps < TRAINER_WARMUP + 2:
            parser.error(f"--trainer-steps must be at least {TRAINER_WARMUP + 2}")
        against_trainer(args, device)
        return
    if args.against == "nanogpt":
        if not args.nanogpt_dir:
            parser.error("--against nanogpt needs --nanogpt-dir DIR, the folder of nanoGPT's "
                         "model.py (e.g. ../shared/peers/nanogpt)")  # fmt: skip
        against_nanogpt(args, device)
        return
    print(
        f"qkv {qkv.__version__}, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"threads {torch.get_num_threads()}, device {device}; GPT L=6 H=6 D=384 "
        f"T={args.seq_len} B={args.batch}, median of {args.steps} steps"
    )
    n = matmul_size(device)
    peak32 = matmul_rate(torch.float32, n=n, device=device)
    peak16 = matmul_rate(torch.bfloat16, n=n, device=device)
    print(f"baseline: matmul {n}^3 float32 {peak32 / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peak16 / 1e9:.1f} GFLOP/s")  # fmt: skip
    probe = GPT(GPTConfig(vocab_size=256, d_model=384, n_layers=6, n_heads=6,
                          max_seq_len=args.seq_len))  # fmt: skip
    per_token = flops_per_token(probe, args.seq_len)
    header = f"{'precision':>10} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of fp32 mm':>11}"
    print(header)
    print("-" * len(header))
    for name, bf16 in (("float32", False), ("bf16 auto", True)):
        rate, step = train_rate(args.batch, args.seq_len, args.steps, bf16, device)
        achieved = rate * per_token
        print(f"{name:>10} {step:8.3f} {rate:10.0f} {achieved / 1e9:9.1f} "
              f"{achieved / peak32:10.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
