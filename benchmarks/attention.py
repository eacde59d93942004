"""Benchmark: every attention implementation against PyTorch's fused kernel, time and peak memory.

For growing sequence lengths T, causal self-attention (B=1, H=8, E=64, float32 and bfloat16),
forward and forward+backward, each implementation is timed and its peak memory measured, with
``sdpa`` (PyTorch's fused kernel, qkv's default) as the baseline in the same run:

    reference     core.reference_attention: all T x T scores and weights, the version to read
    sdpa          PyTorch's fused kernel (the baseline)
    tiled         variants/tiled.py: exact, in 128 x 256 tiles with an online softmax
    block_sparse  variants/sparse.py: a causal sliding window of 256 keys, computed on the kept
                  tiles of a ``BlockLayout.sliding_window`` (no T x T mask is ever built);
                  exact for the window, which is not full causal attention
    linear        variants/linear.py: elu + 1 linear attention, causal by prefix sums
    performer     variants/performer.py: FAVOR+, 256 random features
    triton        variants/triton_flash.py (CUDA only)

The others are called through ``qkv.scaled_dot_product_attention(..., impl=NAME,
is_causal=True)``, as a model would call them, so what the dispatcher builds for a backend (the
T x T causal mask for a backend that does not apply causality itself) is counted too. Each is
looked up by name when the benchmark starts; one that is not registered, or fails, gets a row
that says so.

Each case (implementation, T, dtype, pass) runs in a fresh process, so its peak memory is its
own: on the CPU the growth of the process's peak resident set (VmHWM in /proc/self/status) over
one call, from just before it (the inputs already allocated; a backward call's gradients
counted); on CUDA ``torch.cuda.max_memory_allocated`` over one call after a warm-up, minus what
was allocated before it. Time is the median over calls after that first one. A case is not run
when a formula (``needs_bytes``) says it would need more than ``--max-gib``, or when the same
implementation's time at the previous T, grown by its complexity (T^2, or T for the ones linear
in T), predicts more than ``--max-call-s`` seconds a call; its cell says why. The last column of
numbers, "differs by", is mean |out - exact| / mean |exact| against float32 ``sdpa`` on the
same inputs (T <= 4096): rounding for the exact paths, the approximation for the others.

Then a table "which to use when", read off these numbers, and the two targets of issue #14:
tiled within 3x of sdpa's time at T=4096 (forward+backward), and every path that never forms
the T x T scores running T=16384 forward+backward in a few hundred MiB.

    python benchmarks/attention.py [--quick] [--sizes 512,1024] [--dtypes float32,bfloat16]
                                   [--device cpu|cuda] [--impls sdpa,tiled] [--out FILE.json]
                                   [--repeat 5] [--max-gib N] [--max-call-s 20] [--threads N]

``--quick``: T up to 2048, float32, forward+backward only (what the tests run, with --sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import qkv

B, H, E = 1, 8, 64
WINDOW = 256  # keys a query sees in the block-sparse sliding window (itself included)
SIZES = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_MAX_T = 2048
ERROR_MAX_T = 4096  # the largest T at which outputs are compared with float32 sdpa
PASSES = ("forward", "fwd+bwd")
TARGET_T, TARGET_RATIO = 4096, 3.0  # issue #14: tiled within 3x of sdpa at T=4096, fwd+bwd
LONG_T, LONG_MIB = 16384, 512  # ... and the paths without T x T tensors in "a few hundred" MiB
GIB, MIB = 2**30, 2**20


@dataclass(frozen=True)
class Impl:
    """One implementation: its name, what it computes, and how its cost grows with T."""

    name: str
    kind: str  # "exact": causal softmax attention; "window": exact on a window; "approx"
    power: int  # time grows like T ** power (for predicting the next size)
    cuda_only: bool = False


IMPLS = (
    Impl("reference", "exact", 2),
    Impl("sdpa", "exact", 2),
    Impl("tiled", "exact", 2),
    Impl("triton", "exact", 2, cuda_only=True),
    Impl("block_sparse", "window", 1),
    Impl("linear", "approx", 1),
    Impl("performer", "approx", 1),
)
BASELINE = "sdpa"
# Implementations whose largest tensor grows with T, not T x T (the dispatcher may still hand
# some of them a T x T boolean mask, which needs_bytes counts).
NOT_DENSE = ("sdpa", "tiled", "triton", "block_sparse", "linear", "performer")


def why_unavailable(impl: Impl, device: str) -> str | None:
    """Why ``impl`` cannot run here (None: it can), looked up by name now, not at import."""
    if impl.cuda_only and device != "cuda":
        return "CUDA only"
    if impl.name == "block_sparse":
        try:
            sparse = importlib.import_module("qkv.attention.variants.sparse")
        except Exception as error:  # a module being written may fail to import in any way
            return f"cannot import qkv.attention.variants.sparse ({type(error).__name__})"
        missing = [n for n in ("BlockLayout", "block_sparse_attention") if not hasattr(sparse, n)]
        return f"variants/sparse.py has no {', '.join(missing)}" if missing else None
    if impl.name not in qkv.available_backends():
        return f"no backend named {impl.name!r} is registered"
    return None


def needs_bytes(impl: str, t: int, dtype: torch.dtype) -> int:
    """Rough peak bytes of one call, to skip what cannot fit before trying it.

    The reference forms float32 (B, H, T, T) tensors: scores, scaled scores, masked scores,
    weights, masked weights. Measured on the CPU (T=1024 to 4096), one call's peak is about 3.1
    of them in float32, forward or forward+backward (autograd keeps 2, and backward frees as it
    goes), and 3.6 in bfloat16 (the scores and weights in bfloat16 too); counted here as 3.5
    and 4, plus the dispatcher's (T, T) boolean causal mask, which it gets because it does not
    apply causality itself. The other backends apply it from positions, so the rest grows with
    T: inputs, outputs and gradients, a few (B, H, T, E) tensors, counted generously.
    """
    pairs = B * H * t * t  # elements of one (B, H, T, T) tensor
    linear_part = 16 * B * H * t * E * 4
    if impl == "reference":
        copies = 3.5 if dtype.itemsize >= 4 else 4.0
        return int(copies * pairs * 4) + t * t + linear_part
    return linear_part


def peak_rss() -> int | None:
    """This process's peak resident set in bytes (VmHWM), or None without /proc."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention by ``impl``: (B, H, T, E) -> (B, H, T, E)."""
    if impl == "block_sparse":
        sparse = importlib.import_module("qkv.attention.variants.sparse")
        t = q.shape[-2]
        layout = sparse.BlockLayout.sliding_window(t, min(WINDOW, t))  # blocks, no (T, T) mask
        return sparse.block_sparse_attention(q, k, v, layout)  # (B, H, T, E)
    return qkv.scaled_dot_product_attention(q, k, v, impl=impl, is_causal=True)  # (B, H, T, E)


def call(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool):
    out = attend(impl, q, k, v)
    if backward:
        out.float().sum().backward()
    return out.detach()


def measure(impl: str, t: int, dtype: str, pass_: str, device: str, repeat: int, threads: int):
    """One case, in the fresh process that runs it: time, peak memory and error."""
    if threads:
        torch.set_num_threads(threads)
    dev, dt, backward = torch.device(device), getattr(torch, dtype), pass_ == "fwd+bwd"
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(B, H, t, E, generator=gen, device=dev, dtype=dt).requires_grad_(backward)
        for _ in range(3)
    )  # (B, H, T, E)
    run = functools.partial(call, impl, q, k, v, backward)
    with torch.set_grad_enabled(backward):
        if dev.type == "cuda":
            run()  # a warm-up: kernels compiled and loaded before the memory is read
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
        else:
            before = peak_rss()
        start = time.perf_counter()
        out = run()
        sync(dev)
        first = time.perf_counter() - start
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - before
        else:
            after = peak_rss()
            peak = None if before is None or after is None else after - before
        times = []
        for _ in range(min(repeat, int(2.0 / first))):  # about 2 s of timed calls
            start = time.perf_counter()
            run()
            sync(dev)
            times.append(time.perf_counter() - start)
        if not times:  # a call of over 2 s: its first call is the time (warm-up is noise there)
            times.append(first)
    error = None
    if t <= ERROR_MAX_T:
        with torch.no_grad():
            exact = attend("sdpa", q.float(), k.float(), v.float())  # (B, H, T, E)
            error = ((out.float() - exact).abs().mean() / exact.abs().mean()).item()
    return {
        "ms": statistics.median(times) * 1e3,
        "first_ms": first * 1e3,
        "calls": len(times),
        "peak_mib": None if peak is None else peak / MIB,
        "error": error,
    }


def child(conn: Connection, case: dict[str, Any]) -> None:
    """The entry point of a case's process: send back its measurements or why it failed."""
    try:
        conn.send({"status": "ok", **measure(**case)})
    except Exception as error:  # any failure of a backend is reported in its cell
        message = str(error).splitlines()[0] if str(error) else ""
        conn.send({"status": "failed", "note": f"{type(error).__name__}: {message}"})
    finally:
        conn.close()


def run_fresh(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``measure(**case)`` in a new (spawned) process; kill it after ``timeout`` seconds."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(send, case), daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(timeout):
            return receive.recv()
        reason = f"killed after {timeout:.0f} s"
    except EOFError:  # the child died without a word: out of memory, most likely
        process.join(5)
        reason = f"process died (exit code {process.exitcode}; out of memory?)"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    return {"status": "failed", "note": reason}


def machine_line(device: str) -> str:
    """CPU model and its matrix instruction sets, threads, torch, Python (and the GPU)."""
    name, flags = platform.processor() or "cpu", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    features = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    line = (
        f"{name} ({features or 'no AVX2'}), {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}, qkv {qkv.__version__}"
    )
    if device == "cuda":
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def load_average() -> str:
    """The 1-minute load average: above the CPU count, other work shares the machine."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def available_bytes(device: str) -> float:
    """Memory free for a case now: MemAvailable on the CPU, the GPU's free memory on CUDA."""
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return 8.0 * GIB


def number(x: float) -> str:
    """Three significant digits or so: 1.23, 12.3, 1,234."""
    return f"{x:,.2f}" if x < 10 else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def cell(r: dict[str, Any]) -> str:
    """A table cell: "ms · MiB", or why the case has no numbers."""
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}" if r.get("note") else r["status"]
    mib = "n/a" if r["peak_mib"] is None else f"{max(r['peak_mib'], 0):,.0f}"
    return f"{number(r['ms'])} ms · {mib} MiB"


def print_table(header: list[str], rows: list[list[str]], numbers: bool = True) -> None:
    """A markdown table; the columns after the first right-aligned when they hold ``numbers``."""
    align = ["---"] + ["---:" if numbers else "---"] * (len(header) - 1)
    for row in (header, align, *rows):
        print("| " + " | ".join(row) + " |")


class Results:
    """The cases of one dtype and one pass, looked up by (impl, T)."""

    def __init__(self, rows: list[dict[str, Any]], dtype: str, pass_: str) -> None:
        self.rows = [r for r in rows if (r["dtype"], r["pass"]) == (dtype, pass_)]
        self._by = {(r["impl"], r["t"]): r for r in self.rows}
        self.sizes = sorted({r["t"] for r in self.rows})

    def get(self, impl: str, t: int) -> dict[str, Any]:
        return self._by.get((impl, t), {"status": "not run"})

    def ran(self, impl: str, t: int) -> bool:
        return self.get(impl, t)["status"] == "ok"

    def ms(self, impl: str, t: int) -> float:
        return self.get(impl, t)["ms"] if self.ran(impl, t) else math.inf

    def mib(self, impl: str, t: int) -> float:
        peak = self.get(impl, t).get("peak_mib") if self.ran(impl, t) else None
        return math.inf if peak is None else max(peak, 0.0)

    def largest(self, impls: list[str], at_most: int = 2**62) -> int:
        """The largest T <= at_most at which all of ``impls`` ran (0: none)."""
        return max(
            (t for t in self.sizes if t <= at_most and all(self.ran(i, t) for i in impls)),
            default=0,
        )

    def largest_any(self, impls: list[str]) -> int:
        """The largest T at which any of ``impls`` ran (0: none)."""
        return max((t for t in self.sizes if any(self.ran(i, t) for i in impls)), default=0)

    def error(self, impl: str) -> str:
        """The measured difference from exact attention, at the largest T it was measured."""
        measured = [
            t for t in self.sizes if self.ran(impl, t) and self.get(impl, t)["error"] is not None
        ]
        if not measured:
            return "(not measured)"
        return f"{self.get(impl, measured[-1])['error']:.2g} (T={measured[-1]})"


def recommendations(res: Results, impls: list[Impl]) -> list[list[str]]:
    """The table "which to use when", read off the measured numbers (and what they cannot
    show: only the reference returns the weights)."""
    names = [i.name for i in impls]
    exact = [i.name for i in impls if i.kind == "exact"]
    approx = [i.name for i in impls if i.kind == "approx"]
    rows = []

    def fastest(candidates: list[str], t: int) -> str:
        return min((n for n in candidates if res.ran(n, t)), key=lambda n: res.ms(n, t))

    def versus(pick: str, t: int) -> str:
        others = [
            f"{n} {res.ms(n, t) / res.ms(pick, t):.1f}x its time"
            + (
                " (within 20%: a tie on a shared machine)"
                if res.ms(n, t) < 1.2 * res.ms(pick, t)
                else ""
            )
            for n in exact
            if n != pick and res.ran(n, t)
        ]
        return f"{pick} {number(res.ms(pick, t))} ms at T={t}" + "".join(f"; {o}" for o in others)

    t_short = max(
        (t for t in res.sizes if t <= 1024 and any(res.ran(n, t) for n in exact)), default=0
    )
    if t_short:
        rows.append(
            [
                f"exact, short (T = {t_short})",
                fastest(exact, t_short),
                versus(fastest(exact, t_short), t_short),
            ]
        )
    t_long = res.largest_any(exact)
    if t_long and t_long != t_short:
        stopped = [n for n in exact if not res.ran(n, t_long) and res.largest_any([n])]
        note = "".join(f"; {n} stopped at T={res.largest_any([n])}" for n in stopped)
        pick = fastest(exact, t_long)
        rows.append([f"exact, long (T = {t_long})", pick, versus(pick, t_long) + note])
    if t_long:
        ran = [n for n in exact if res.ran(n, t_long)]
        pick = min(ran, key=lambda n: res.mib(n, t_long))
        mib = ", ".join(f"{n} {res.mib(n, t_long):,.0f} MiB" for n in ran)
        rows.append([f"exact, least memory (T = {t_long})", pick, mib])
    if "reference" in names:
        rows.append(
            [
                "the attention weights (viz, teaching)",
                "reference",
                "the only path that returns the (T, S) weights: memory grows with T^2",
            ]
        )
    if "block_sparse" in names and (t := res.largest(["block_sparse", BASELINE])):
        speed = res.ms(BASELINE, t) / res.ms("block_sparse", t)
        rows.append(
            [
                f"local context is enough (causal window {WINDOW})",
                "block_sparse",
                f"{speed:.1f}x sdpa's speed (full causal) at T={t}, "
                f"{res.mib('block_sparse', t):,.0f} MiB; exact inside the window, differs from "
                f"full causal attention by {res.error('block_sparse')}",
            ]
        )
    if t := res.largest_any(approx):
        pick = fastest(approx, t)
        faster = [u for u in res.sizes if res.ms(pick, u) < res.ms(BASELINE, u)]
        when = (
            f"faster than sdpa from T={faster[0]}"
            if faster
            else "never faster than sdpa here, so use sdpa unless memory forbids it"
        )
        errors = ", ".join(f"{n} {res.error(n)}" for n in approx)
        rows.append(
            [
                "approximate is acceptable, long T",
                pick,
                f"{pick} {number(res.ms(pick, t))} ms, {res.mib(pick, t):,.0f} MiB at T={t}; "
                f"{when}; differs from softmax attention by {errors}",
            ]
        )
    return rows


def report(
    rows: list[dict[str, Any]], impls: list[Impl], dtypes: list[str], passes: list[str]
) -> None:
    """The tables: every case, which to use when, and the issue's two targets."""
    for dtype in dtypes:
        for pass_ in passes:
            res = Results(rows, dtype, pass_)
            print(f"\n{dtype}, {pass_}: ms per call (median) · peak memory growth of one call")
            header = ["impl", *(f"T={t}" for t in res.sizes), "time / sdpa", "differs by"]
            table = []
            for impl in impls:
                t = res.largest([impl.name, BASELINE])
                ratio = f"{res.ms(impl.name, t) / res.ms(BASELINE, t):.2f}x (T={t})" if t else ""
                cells = [cell(res.get(impl.name, t)) for t in res.sizes]
                table.append([impl.name, *cells, ratio, res.error(impl.name)])
            print_table(header, table)
    res = Results(rows, dtypes[0], passes[-1])
    print(f"\nWhich to use when ({dtypes[0]}, {passes[-1]}, causal; from the numbers above)")
    print_table(["need", "use", "measured"], recommendations(res, impls), numbers=False)
    print()
    for dtype in dtypes:
        res = Results(rows, dtype, "fwd+bwd")
        if res.ran("tiled", TARGET_T) and res.ran(BASELINE, TARGET_T):
            ratio = res.ms("tiled", TARGET_T) / res.ms(BASELINE, TARGET_T)
            verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
            print(
                f"tiled / sdpa at T={TARGET_T}, fwd+bwd, {dtype}: {ratio:.2f}x "
                f"(target: at most {TARGET_RATIO:g}x, {verdict})"
            )
        else:
            print(f"tiled / sdpa at T={TARGET_T}, fwd+bwd, {dtype}: not measured")
        paths = [i.name for i in impls if i.name in NOT_DENSE]
        if LONG_T not in res.sizes:
            print(f"T={LONG_T} fwd+bwd, {dtype}: not measured")
            continue
        parts = [
            f"{n} {res.mib(n, LONG_T):,.0f} MiB"
            if res.ran(n, LONG_T)
            else f"{n} {res.get(n, LONG_T)['status']}"
            for n in paths
        ]
        within = all(res.mib(n, LONG_T) <= LONG_MIB for n in paths)
        print(
            f"T={LONG_T} fwd+bwd, {dtype}: every path without T x T scores within {LONG_MIB} "
            f"MiB: {'yes' if within else 'no'} ({', '.join(parts)})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T <= 2048, float32, fwd+bwd")
    parser.add_argument("--sizes", "--lengths", help="comma-separated T (default: 512 .. 16384)")
    parser.add_argument("--dtypes", "--dtype", help="float32,bfloat16 (default: both)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--impls", help="comma-separated names (default: all)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls at most, per case")
    parser.add_argument(
        "--max-gib",
        type=float,
        help="skip cases needing more (default: half of the memory available now)",
    )
    parser.add_argument(
        "--max-call-s", type=float, default=20.0, help="skip cases predicted to take longer a call"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, help="save the raw results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else [t for t in SIZES if not args.quick or t <= QUICK_MAX_T]
    )
    dtypes = (
        args.dtypes.split(",")
        if args.dtypes
        else (["float32"] if args.quick else ["float32", "bfloat16"])
    )
    passes = ["fwd+bwd"] if args.quick else list(PASSES)
    wanted = args.impls.split(",") if args.impls else None
    if unknown := set(wanted or ()) - {i.name for i in IMPLS}:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {[i.name for i in IMPLS]}")
    impls = [
        i
        for i in IMPLS
        if (wanted is None or i.name in wanted) and (not i.cuda_only or args.device == "cuda")
    ]
    unavailable = {i.name: why_unavailable(i, args.device) for i in impls}
    max_bytes = args.max_gib * GIB if args.max_gib else available_bytes(args.device) / 2
    timeout = 10 * args.max_call_s + 60

    print(machine_line(args.device))
    print(
        f"B={B} H={H} E={E}, causal, device {args.device}; median of up to {args.repeat} "
        f"calls after the first; a fresh process per case; skipped when it would need over "
        f"{max_bytes / GIB:.1f} GiB or over {args.max_call_s:g} s a call"
    )
    load_before = load_average()
    print(f"load average (1 min) at the start: {load_before} on {os.cpu_count()} CPUs")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for dtype in dtypes:
        for pass_ in passes:
            for impl in impls:
                last: tuple[int, float] | None = None  # (T, seconds a call) of the last run
                for t in sizes:
                    row = {"impl": impl.name, "t": t, "dtype": dtype, "pass": pass_}
                    need = needs_bytes(impl.name, t, getattr(torch, dtype))
                    guess = last[1] * (t / last[0]) ** impl.power if last else 0.0
                    target = (t, pass_) == (TARGET_T, "fwd+bwd") and impl.name in (
                        "tiled",
                        BASELINE,
                    )
                    if target and guess < timeout / 2:
                        guess = 0.0  # the target is measured if it can finish
                    if unavailable[impl.name]:
                        row |= {"status": "not available", "note": unavailable[impl.name]}
                    elif need > max_bytes:
                        row |= {"status": "skipped", "note": f"needs ~{need / GIB:.0f} GiB"}
                    elif guess > args.max_call_s:
                        row |= {
                            "status": "skipped",
                            "note": f"~{guess:.0f} s a call (T={last[0]}: {last[1]:.1f} s)",
                        }  # type: ignore[index]
                    else:
                        case = {
                            "impl": impl.name,
                            "t": t,
                            "dtype": dtype,
                            "pass_": pass_,
                            "device": args.device,
                            "repeat": args.repeat,
                            "threads": args.threads,
                        }
                        row |= run_fresh(case, timeout)
                        if row["status"] == "ok":
                            last = (t, row["ms"] / 1e3)
                    rows.append(row)
                    print(
                        f"[{time.perf_counter() - started:5.0f} s] {dtype} {pass_} "
                        f"{impl.name} T={t}: {cell(row)}",
                        file=sys.stderr,
                    )
    report(rows, impls, dtypes, passes)
    load_after = load_average()
    print(
        f"load average (1 min) at the end: {load_after}; {time.perf_counter() - started:.0f} s "
        "in all"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": machine_line(args.device),
            "B": B,
            "H": H,
            "E": E,
            "window": WINDOW,
            "device": args.device,
            "date": time.strftime("%Y-%m-%d"),
            "load_average": [load_before, load_after],
        }
        args.out.write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")
        print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
