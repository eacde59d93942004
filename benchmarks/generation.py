"""Benchmark: generation speed of qkv against transformers' generate, on the same weights.

Batch 1, greedy, a 16-token prompt and 256 new tokens (EOS never stops it early). For each model
size, random weights are built in transformers, saved, and loaded into qkv through its interop,
so both libraries run the very same network; the table shows tokens per second, time to first
token, and the speed-up, with transformers as the baseline in the same run.

    python benchmarks/generation.py [--new-tokens 256] [--repeat 3] [--threads N]
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
# keeps GPT-2's 50257 tokens.
SIZES = {
    "small (L=4, H=4, d=128, V=256)": {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 256},
    "gpt2-small (L=12, H=12, d=768)": {
        "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257,
    },
}  # fmt: skip


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest wall-clock seconds of ``fn()`` over ``repeat`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, size: dict[str, int], args: argparse.Namespace) -> None:
    """Build one size in transformers, load it into qkv, time both, print two rows."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=1024, bos_token_id=None, eos_token_id=None, **size)
    hf = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = qkv.from_pretrained(tmp)
    prompt = torch.randint(0, size["vocab_size"], (1, args.prompt_len))
    mask = torch.ones_like(prompt)
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

    same = torch.equal(run_hf(32), run_qkv(32))
    rows = {}
    for library, run in (("transformers", run_hf), ("qkv", run_qkv)):
        total = best_of(lambda run=run: run(n), args.repeat)
        first = best_of(lambda run=run: run(1), args.repeat)
        rows[library] = (n / total, first * 1e3)
    base = rows["transformers"][0]
    for library, (tps, ttft) in rows.items():
        print(f"{name:<32} {library:<13} {tps:>9.1f} {ttft:>15.1f} {tps / base:>8.2f}x")
    print(f"{'':<32} same greedy ids for 32 tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    print(
        f"qkv {qkv.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}, {args.threads} threads, float32, batch 1, "
        f"greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeat}"
    )
    header = f"{'model':<32} {'library':<13} {'tokens/s':>9} {'first token ms':>15} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for name, size in SIZES.items():
        measure(name, size, args)


if __name__ == "__main__":
    main()
