"""Draw the Transformer-XL picture of docs/learn/09-efficient-attention.md: loss against context.

A small Transformer-XL learns the bytes of the ``python-docs`` corpus (Python's own help text,
which ships with Python) for a fixed number of steps, reading each of its training streams
segment after segment with the memory carried along, as the paper trains. Then it reads held-out
text with ``evaluate_with_memory`` at several segment lengths T, twice: with the memory of the
segments before (each token sees up to mem_len earlier positions per layer, beyond its segment)
and without (each segment starts afresh, like a model with a fixed window of T tokens). One
picture, the held-out loss against T, one line each.

Run from the repository root:
``python docs/figures/transformer_xl.py [--out docs/learn/img] [--steps 300]``.
The default run takes about 10 s on one CPU core; the committed picture may come from a longer
run (``--steps``), and the page says which.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F

from qkv.data.corpora import python_docs_text
from qkv.models.transformer_xl import TransformerXL, TransformerXLConfig, evaluate_with_memory
from qkv.train.schedule import warmup_cosine_lr

SEGMENT_LEN = 32  # L: positions per training segment
BATCH = 16  # training streams read side by side
HELD_OUT_ROWS, HELD_OUT_LEN = 8, 512  # held-out text: 8 rows of 512 bytes, the corpus's end
EVAL_SEGMENTS = (2, 4, 8, 16, 32, 64)  # T of the evaluation
CONFIG = TransformerXLConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, mem_len=SEGMENT_LEN, dropout=0.0
)


def corpus_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The python-docs text as byte ids: (training streams (BATCH, N), held-out rows (8, 512))."""
    data = torch.tensor(list(python_docs_text().encode("utf-8")), dtype=torch.long)  # (N,)
    held = HELD_OUT_ROWS * HELD_OUT_LEN
    train, test = data[:-held], data[-held:]
    per_stream = len(train) // BATCH
    streams = train[: BATCH * per_stream].view(BATCH, per_stream)  # (BATCH, N / BATCH)
    return streams, test.view(HELD_OUT_ROWS, HELD_OUT_LEN)


def train(streams: torch.Tensor, steps: int, seed: int) -> tuple[TransformerXL, list[float]]:
    """``steps`` updates on consecutive segments of every stream, the memory carried along."""
    torch.manual_seed(seed)
    model = TransformerXL(CONFIG).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    memory, start, losses = None, 0, []
    for step in range(steps):
        if start + SEGMENT_LEN + 1 > streams.shape[1]:  # the end of the streams: begin again
            memory, start = None, 0
        window = streams[:, start : start + SEGMENT_LEN + 1]  # (B, L + 1)
        lr = warmup_cosine_lr(step, peak=3e-3, warmup_steps=min(30, steps // 10),
                              progress=step / steps, min_lr_ratio=0.1)  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model(window[:, :-1], memory)  # logits (B, L, V), memory (L, B, M, D)
        # Every position is scored (the first too: the memory is its context).
        loss = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        memory, start = out.memory, start + SEGMENT_LEN
        losses.append(loss.item())
    return model.eval(), losses


def loss_by_context(model: TransformerXL, held_out: torch.Tensor) -> dict[str, list[float]]:
    """Held-out loss (nats per byte) at each T of ``EVAL_SEGMENTS``, with and without memory."""
    return {
        name: [evaluate_with_memory(model, held_out, t, use_memory=flag) for t in EVAL_SEGMENTS]
        for name, flag in (("with memory", True), ("without memory", False))
    }


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # One thread: a model this small gains nothing from a second, and the test suite runs two
    # workers on two cores, where oversubscribed threads run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        streams, held_out = corpus_bytes()
        model, losses = train(streams, args.steps, args.seed)
        curves = loss_by_context(model, held_out)
    finally:
        torch.set_num_threads(threads)

    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for (name, values), marker, dy in zip(curves.items(), "os", (-12, 6), strict=True):
        ax.plot(EVAL_SEGMENTS, values, marker=marker, label=name)
        for t, value in zip(EVAL_SEGMENTS, values, strict=True):
            ax.annotate(f"{value:.2f}", (t, value), textcoords="offset points", xytext=(0, dy),
                        ha="center", fontsize=7)  # fmt: skip
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.05 * (high - low), high + 0.08 * (high - low))  # room for the labels
    ax.axvline(SEGMENT_LEN, color="grey", lw=0.8, ls=":")
    ax.text(SEGMENT_LEN, ax.get_ylim()[1], " trained with L = 32", va="top", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(EVAL_SEGMENTS, [str(t) for t in EVAL_SEGMENTS])
    ax.set_xlabel("segment length T at evaluation (bytes read at once)")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(
        f"Transformer-XL on python-docs bytes, {args.steps} steps "
        f"(train loss {sum(losses[-20:]) / min(20, len(losses)):.2f}); memory M = {CONFIG.mem_len}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = args.out / "09-xl-memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    for name, values in curves.items():
        print(name, " ".join(f"T={t}: {v:.3f}" for t, v in zip(EVAL_SEGMENTS, values, strict=True)))
    print(f"uniform over 256 bytes: {math.log(256):.3f} nats")
    return [path]


if __name__ == "__main__":
    for path in main():
        print(path)
