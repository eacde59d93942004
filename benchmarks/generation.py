"""Benchmark: generation speed of qkv against transformers' generate, on the same weights.

Batch 1, greedy, a 16-token prompt and 256 new tokens (EOS never stops it early). For each model
size, random weights are built in transformers, saved, and loaded into qkv through its interop,
so both libraries run the very same network, in float32 and again in bfloat16 (both libraries
in the same dtype on each row). The table shows tokens per second, time to first token, the
speed-up with transformers as the baseline in the same run, and the weight bandwidth that rate
implies (every weight is read once per token: bytes of weights x tokens/s). The two libraries
take turns within each repeat, so a load spike on a shared machine hits both.

On a GPU (``--device cuda``) both models and the prompt live on it, and every timed call ends in
``torch.cuda.synchronize()`` (CUDA runs asynchronously) before the clock is read; ``--threads``,
``--clock cpu`` and ``--layouts`` concern the CPU and are refused there.

    python benchmarks/generation.py [--device cpu|cuda] [--new-tokens 256] [--repeat 3]
                                    [--threads N] [--dtypes float32,bfloat16]
                                    [--clock wall|cpu] [--families gpt2,llama]
    python benchmarks/generation.py --device cuda --new-tokens 64 --repeat 2   (benchmarks/gpu.sh)
    python benchmarks/generation.py --layouts    (matrix-vector kernels and weight layouts)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable

import torch

import qkv

# The small model has a character-level vocabulary (256), like the main job's model; GPT-2 small
# keeps GPT-2's 50257 tokens. The LLaMA-style rows (``--families gpt2,llama``) have the same
# widths and depths, grouped-query attention (a third of the heads for keys and values) and a
# gated MLP of about 8/3 D, with a 32000-token vocabulary at the larger size.
SIZES = {
    "gpt2": {
        "small (L=4, H=4, d=128, V=256)": {
            "n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 256,
        },
        "gpt2-small (L=12, H=12, d=768)": {
            "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257,
        },
    },
    "llama": {
        "llama small (L=4, H=4, K=2, d=128)": {
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size": 128, "intermediate_size": 344, "vocab_size": 256,
        },
        "llama (L=12, H=12, K=4, d=768)": {
            "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
            "hidden_size": 768, "intermediate_size": 2048, "vocab_size": 32000,
        },
    },
}  # fmt: skip


def build_hf(family: str, size: dict[str, int]) -> torch.nn.Module:
    """A transformers model of ``family`` with random weights (seeded by the caller)."""
    import transformers as tf

    if family == "gpt2":
        config = tf.GPT2Config(n_positions=1024, bos_token_id=None, eos_token_id=None, **size)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        **size,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock reads it."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], clock: str, device: str = "cpu") -> float:
    """Seconds of one call of ``fn()`` on ``clock``: wall time, or this process's CPU time
    (with one thread, the time it actually ran: robust to other jobs on a shared machine).
    On ``device`` cuda, the queued work is waited for before each reading of the clock."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decoding step reads: every parameter once (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(
    name: str, family: str, size: dict[str, int], dtype: torch.dtype, args: argparse.Namespace
) -> None:
    """Build one size in transformers, load it into qkv, time both, print two rows."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    hf = build_hf(family, size)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = qkv.from_pretrained(tmp)
    hf, ours = hf.to(args.device, dtype), ours.to(args.device, dtype)
    # Drawn on the CPU and then moved: the same prompt on every device.
    prompt = torch.randint(0, size["vocab_size"], (1, args.prompt_len)).to(args.device)  # (B, T)
    mask = torch.ones_like(prompt)  # (B, T)
    n = args.new_tokens

    def run_hf(k: int) -> torch.Tensor:
        # Only the compared settings: greedy, exactly k new tokens, no early end.
        config = GenerationConfig(
            max_new_tokens=k, min_new_tokens=k, do_sample=False, eos_token_id=None,
            pad_token_id=0, num_beams=1,
        )  # fmt: skip
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=mask, generation_config=config)

    def run_qkv(k: int) -> torch.Tensor:
        return ours.generate(prompt, mask, max_new_tokens=k, eos_token_id=[])  # no early end

    same = torch.equal(run_hf(32), run_qkv(32))  # also the warm-up
    runs = {"transformers": run_hf, "qkv": run_qkv}
    totals: dict[str, list[float]] = {library: [] for library in runs}
    firsts: dict[str, list[float]] = {library: [] for library in runs}
    for _ in range(args.repeat):  # the libraries take turns: a load spike hits both
        for library, run in runs.items():
            totals[library].append(timed(lambda run=run: run(n), args.clock, args.device))
            firsts[library].append(timed(lambda run=run: run(1), args.clock, args.device))
    nbytes = weight_bytes(ours)
    base = n / min(totals["transformers"])
    for library in runs:
        tps, ttft = n / min(totals[library]), min(firsts[library]) * 1e3
        print(
            f"{name:<32} {str(dtype)[6:]:<9} {args.device:<6} {library:<13} {tps:>9.1f} "
            f"{ttft:>15.1f} {tps / base:>8.2f}x {nbytes * tps / 1e9:>8.1f}"
        )
    print(f"{'':<32} same greedy ids for 32 tokens: {same}")


def layouts(args: argparse.Namespace) -> None:
    """GB/s at which one token's matrix-vector products read GPT-2 small's weights, per kernel.

    ``F.linear`` reads W as stored by ``nn.Linear``, (out, in), through BLAS; ``torch.mm`` with a
    transposed contiguous copy reads it as (in, out), the layout of transformers' GPT-2
    ``Conv1D``; ``inference_linear`` is the kernel qkv decodes with (``qkv._kernels``: oneDNN
    for weights this large), on the (out, in) weight unchanged. A plain sum over as many bytes
    gives the memory bandwidth the threads can draw, the ceiling for all three.
    """
    from qkv._kernels import inference_linear

    shapes = {"q/k/v fused": (2304, 768), "out_proj": (768, 768), "mlp up": (3072, 768),
              "mlp down": (768, 3072), "lm_head": (50257, 768)}  # fmt: skip
    kernels: list[tuple[str, Callable[..., torch.Tensor], bool]] = [
        ("F.linear (out, in)", torch.nn.functional.linear, False),
        ("mm (in, out)", torch.mm, True),
        ("qkv (out, in)", inference_linear, False),
    ]
    print(f"\nmatrix-vector kernels, float32, {args.threads} threads, {args.clock} clock, GB/s")
    print(f"{'weight (out, in)':<26}" + "".join(f" {name:>19}" for name, _, _ in kernels))
    with torch.inference_mode():
        for name, (n_out, n_in) in shapes.items():
            copies = max(2, 200_000_000 // (n_out * n_in * 4))  # > the 32 MB cache in all
            weights = [torch.randn(n_out, n_in) for _ in range(copies)]
            transposed = [w.t().contiguous() for w in weights]
            x = torch.randn(1, n_in)
            nbytes = copies * n_out * n_in * 4
            rates = []
            for _, op, flipped in kernels:

                def chain(
                    op: Callable[..., torch.Tensor] = op,
                    mats: list = transposed if flipped else weights,
                    x: torch.Tensor = x,
                ) -> None:
                    for w in mats:
                        op(x, w)

                chain()
                rates.append(nbytes / min(timed(chain, args.clock) for _ in range(5)) / 1e9)
            print(f"{name + f' {n_out}x{n_in}':<26}" + "".join(f" {r:>19.1f}" for r in rates))
        flat = torch.randn(100_000_000)  # 400 MB
        flat.sum()
        rate = 4e8 / min(timed(flat.sum, args.clock) for _ in range(5)) / 1e9
        print(f"{'streaming read (sum)':<26} {rate:>19.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where both libraries run"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="CPU threads (--device cpu only; default: torch's count)"
    )
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--families", default="gpt2", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="cpu: process CPU time, for a shared machine (use with --threads 1)",
    )  # fmt: skip
    parser.add_argument(
        "--layouts", action="store_true", help="only time the matrix-vector kernels per layout"
    )
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: torch.cuda.is_available() is False (no CUDA GPU, or a CPU-only "
                "torch build); use --device cpu"
            )
        cpu_only = {"--threads": args.threads is not None, "--clock cpu": args.clock == "cpu",
                    "--layouts": args.layouts}  # fmt: skip
        given = [flag for flag, used in cpu_only.items() if used]
        if given:
            parser.error(f"{', '.join(given)}: CPU-only options; leave them out with --device cuda")
        gpu = torch.cuda.get_device_name()
        machine = f"{platform.machine()}, GPU {gpu}, CUDA {torch.version.cuda}"
    else:
        if args.threads is None:
            args.threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        machine = f"{platform.machine()}, {args.threads} threads"

    import transformers

    print(
        f"qkv {qkv.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, {machine}, batch 1, greedy, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, best of {args.repeat}, {args.clock} clock"
    )
    if args.layouts:
        layouts(args)
        return
    header = (
        f"{'model':<32} {'dtype':<9} {'device':<6} {'library':<13} {'tokens/s':>9} "
        f"{'first token ms':>15} {'speed-up':>9} {'GB/s':>8}"
    )
    print(header)
    print("-" * len(header))
    families = args.families.split(",")
    unknown = sorted(set(families) - set(SIZES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(SIZES)}")
    for family in families:
        for name, size in SIZES[family].items():
            for dtype in dtypes:
                measure(name, family, size, dtype, args)


if __name__ == "__main__":
    main()
