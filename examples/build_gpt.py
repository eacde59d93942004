"""Build a GPT step by step: eight small models, each one idea more than the one before.

    1 bigram            a table: the next character from the current one alone
    2 average the past  embeddings, positions, and a fixed average over the earlier positions
    3 one head          the average becomes learned attention weights (queries, keys, values)
    4 multi-head        several smaller heads side by side, joined by an output projection
    5 + feed-forward    a small network after attention, applied to each position alone
    6 + residuals       each sublayer adds to its input instead of replacing it
    7 + LayerNorm       each sublayer reads a normalised copy of the stream (pre-norm)
    8 blocks            the layer of stage 7 as a Block, stacked L times, the head tied to the
                        embedding: this is qkv.GPT, and the script proves it on the logits

Every stage trains for the same number of seconds (``--seconds``, the training clock only:
evaluation is not counted) on the text of Python's documentation, one token per character,
with AdamW, the same learning rate, the same seed and the same batches in the same order. The
script prints a table (stage, parameters, steps, validation loss, time), writes it as
``results.md`` and ``results.json``, and draws the validation loss against training time in
``loss.png``, all in ``--out``.

Run from the repository root (docs/learn/15-build-a-gpt.md walks through it)::

    python examples/build_gpt.py                 # 60 s per stage, about 9 minutes in all
    python examples/build_gpt.py --quick         # tiny sizes, 1 s per stage (what CI runs)

Shape legend: B batch · T positions (at most ``block_size``) · D model width · H heads ·
E head dim (D / H) · F feed-forward width (4 D) · V vocabulary · L layers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv import GPT
from qkv.data.corpora import resolve_text_corpus
from qkv.models.gpt import GPTConfig


# --8<-- [start:data]
def load_characters() -> tuple[list[str], Tensor]:
    """The text of Python's documentation as ids, one per character, and the vocabulary."""
    text = "".join(resolve_text_corpus("python-docs").texts())
    chars = sorted(set(text))  # the vocabulary: every character that occurs, V of them
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])  # (N,) one id per character
    return chars, ids


def split(ids: Tensor) -> tuple[Tensor, Tensor]:
    """The first 90% to train on, the last 10% held out to measure the model on."""
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def random_batch(
    ids: Tensor, batch_size: int, block_size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """B windows of T + 1 consecutive characters at random places: x is the first T of each,
    y the same window shifted by one, so y[b, t] is the character that follows x[b, : t + 1]."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=gen)  # (B,)
    windows = torch.stack([ids[s : s + block_size + 1] for s in starts.tolist()])  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


# --8<-- [end:data]


# --8<-- [start:sizes]
@dataclass(frozen=True, kw_only=True)
class Sizes:
    """The sizes every stage is built from (a stage uses the ones it needs)."""

    vocab_size: int  # V
    d_model: int = 64  # D
    n_heads: int = 4  # H
    n_layers: int = 2  # L, for the last stage (stages 3 to 7 have one layer)
    block_size: int = 64  # T, the longest context a model sees

    @property
    def head_dim(self) -> int:
        """E = D / H."""
        return self.d_model // self.n_heads


# --8<-- [end:sizes]


# --8<-- [start:bigram]
class Bigram(nn.Module):
    """Stage 1: row c of a V x V table holds the logits of the character after c."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.table = nn.Embedding(s.vocab_size, s.vocab_size)  # weight (V, V)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(ids)  # (B, T, V): each position looks only at its own character


# --8<-- [end:bigram]


# --8<-- [start:average]
class AveragePast(nn.Module):
    """Stage 2: each position takes the mean of its own vector and every earlier one."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)  # weight (V, D)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)  # weight (T, D), one per position
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)  # D features -> V logits
        # Row t of the lower-triangular matrix is 1 in columns 0 .. t and 0 after; dividing
        # each row by its sum, t + 1, turns it into the weights of an average over the past.
        ones = torch.tril(torch.ones(s.block_size, s.block_size))  # (T, T)
        self.register_buffer("average", ones / ones.sum(dim=1, keepdim=True), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t))  # (B, T, D)
        x = self.average[:t, :t] @ x  # (B, T, D): x[:, t] = mean of x[:, 0], ..., x[:, t]
        return self.lm_head(x)  # (B, T, V)


# --8<-- [end:average]


# --8<-- [start:head]
class Head(nn.Module):
    """One head of causal self-attention: the average of stage 2 with weights that each
    position computes from the data, attending to itself and the positions before it."""

    def __init__(self, d_model: int, head_dim: int, block_size: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, head_dim)  # what each position is looking for
        self.k_proj = nn.Linear(d_model, head_dim)  # what each position offers
        self.v_proj = nn.Linear(d_model, head_dim)  # what it hands over when chosen
        causal = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))  # (T, T)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t, e = x.shape[1], self.q_proj.out_features
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, E) each
        scores = q @ k.transpose(1, 2) / math.sqrt(e)  # (B, T, T): how well query t fits key s
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))  # hide the future
        weights = scores.softmax(dim=-1)  # (B, T, T): each row sums to 1, like `average`
        return weights @ v  # (B, T, E)


class OneHead(nn.Module):
    """Stage 3: stage 2 with the fixed average replaced by one head of width D."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)  # weight (V, D)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)  # weight (T, D)
        self.self_attn = Head(s.d_model, s.d_model, s.block_size)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        x = self.self_attn(x)  # (B, T, D)
        return self.lm_head(x)  # (B, T, V)


# --8<-- [end:head]


# --8<-- [start:multihead]
class MultiHeadAttention(nn.Module):
    """H heads of width E = D / H side by side, joined by one output projection."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            Head(s.d_model, s.head_dim, s.block_size) for _ in range(s.n_heads)
        )
        self.out_proj = nn.Linear(s.d_model, s.d_model)  # mixes what the heads found

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, H * E) = (B, T, D)
        return self.out_proj(x)  # (B, T, D)


class MultiHead(nn.Module):
    """Stage 4: stage 3 with H smaller heads in place of one wide one."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.self_attn = MultiHeadAttention(s)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        x = self.self_attn(x)  # (B, T, D)
        return self.lm_head(x)  # (B, T, V)


# --8<-- [end:multihead]


# --8<-- [start:feed_forward]
class FeedForward(nn.Module):
    """Two linear layers with a GELU between: each position is transformed on its own."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, 4 * d_model)  # D -> F = 4 D
        self.down_proj = nn.Linear(4 * d_model, d_model)  # F -> D

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, F), GPT-2's GELU
        return self.down_proj(h)  # (B, T, D)


class PlusFeedForward(nn.Module):
    """Stage 5: attention gathers from other positions, then the feed-forward network
    works on what each position gathered."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.self_attn = MultiHeadAttention(s)
        self.mlp = FeedForward(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        x = self.self_attn(x)  # (B, T, D)
        x = self.mlp(x)  # (B, T, D)
        return self.lm_head(x)  # (B, T, V)


# --8<-- [end:feed_forward]


# --8<-- [start:residual]
class PlusResidual(nn.Module):
    """Stage 6: each sublayer's output is added to its input, x + f(x), so the input (the
    character's own embedding, first of all) is never lost on the way up."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.self_attn = MultiHeadAttention(s)
        self.mlp = FeedForward(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        x = x + self.self_attn(x)  # (B, T, D)
        x = x + self.mlp(x)  # (B, T, D)
        return self.lm_head(x)  # (B, T, V)


# --8<-- [end:residual]


# --8<-- [start:layernorm]
class PlusLayerNorm(nn.Module):
    """Stage 7: each sublayer reads a normalised copy of the stream (pre-norm, as in GPT-2),
    and the stream is normalised once more before the output head."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.attn_norm = nn.LayerNorm(s.d_model)  # eps 1e-5
        self.self_attn = MultiHeadAttention(s)
        self.mlp_norm = nn.LayerNorm(s.d_model)
        self.mlp = FeedForward(s.d_model)
        self.final_norm = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        x = x + self.self_attn(self.attn_norm(x))  # (B, T, D)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, D)
        return self.lm_head(self.final_norm(x))  # (B, T, V)


# --8<-- [end:layernorm]


# --8<-- [start:block]
class Block(nn.Module):
    """The layer of stage 7, on its own: pre-norm attention, then pre-norm feed-forward."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(s.d_model)
        self.self_attn = MultiHeadAttention(s)
        self.mlp_norm = nn.LayerNorm(s.d_model)
        self.mlp = FeedForward(s.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.attn_norm(x))  # (B, T, D)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, D)


class BlockGPT(nn.Module):
    """Stage 8: L blocks in a row, and the output head reusing the token embedding (tied,
    as in GPT-2): the same function as ``qkv.GPT`` (see ``to_qkv_gpt``)."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(s.vocab_size, s.d_model)
        self.pos_emb = nn.Embedding(s.block_size, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.final_norm = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # one (V, D) matrix reads in and reads out

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.lm_head(self.final_norm(x))  # (B, T, V)


# --8<-- [end:block]


# --8<-- [start:stages]
STAGES: list[tuple[str, type[nn.Module]]] = [
    ("bigram", Bigram),
    ("average the past", AveragePast),
    ("one head", OneHead),
    ("multi-head", MultiHead),
    ("+ feed-forward", PlusFeedForward),
    ("+ residuals", PlusResidual),
    ("+ LayerNorm", PlusLayerNorm),
    ("blocks = qkv.GPT", BlockGPT),
]


def build(stage: type[nn.Module], s: Sizes, seed: int) -> nn.Module:
    """A stage with GPT-2's initialisation: weights from N(0, 0.02²), biases zero, LayerNorms
    at gain 1 and shift 0 (PyTorch's default); GPT-2 also starts the two projections into the
    residual stream smaller, which this leaves out. The same seed for every stage."""
    torch.manual_seed(seed)
    model = stage(s)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


# --8<-- [end:stages]


# --8<-- [start:train]
@dataclass(frozen=True, kw_only=True)
class Budget:
    """How every stage is trained: the same for all of them."""

    seconds: float = 60.0  # of training steps; the evaluations are not counted
    batch_size: int = 32  # B
    lr: float = 3e-3  # AdamW, constant; weight decay 0.01 (PyTorch's default)
    seed: int = 0
    evals: int = 12  # points on the curve, spread over the seconds
    curve_windows: int = 64  # of the validation windows, for each point on the curve


def validation_windows(val: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """The held-out text cut into consecutive windows, every character predicted once."""
    n = (len(val) - 1) // block_size
    x = val[: n * block_size].view(n, block_size)  # (N, T)
    y = val[1 : n * block_size + 1].view(n, block_size)  # (N, T): the next characters
    return x, y


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """The mean cross-entropy in nats per character over the windows (x, y)."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])  # (B, T, V)
        loss = F.cross_entropy(
            logits.flatten(0, 1), y[i : i + batch_size].flatten(), reduction="sum"
        )
        total += loss.item()
    model.train()
    return total / y.numel()


def train(
    model: nn.Module, train_ids: Tensor, val: tuple[Tensor, Tensor], s: Sizes, b: Budget
) -> tuple[int, float, list[tuple[float, float]]]:
    """Train for ``b.seconds`` of step time; returns the steps taken, the seconds, and the
    loss on ``b.curve_windows`` of the validation windows ``val`` at ``b.evals`` evenly
    spaced moments, as (seconds, loss) pairs."""
    every = max(1, len(val[0]) // b.curve_windows)
    val = (val[0][::every][: b.curve_windows], val[1][::every][: b.curve_windows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.lr)
    gen = torch.Generator().manual_seed(b.seed)  # every stage draws the same batches in order
    curve = [(0.0, evaluate(model, *val))]
    steps, clock = 0, 0.0
    while clock < b.seconds:
        start = time.perf_counter()
        x, y = random_batch(train_ids, b.batch_size, s.block_size, gen)  # (B, T), (B, T)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # nats per character
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock += time.perf_counter() - start
        steps += 1
        if clock >= len(curve) * b.seconds / b.evals:  # the next point on the curve is due
            curve.append((clock, evaluate(model, *val)))
    return steps, clock, curve


# --8<-- [end:train]


# --8<-- [start:to_qkv]
def to_qkv_gpt(model: BlockGPT, s: Sizes) -> GPT:
    """A ``qkv.GPT`` holding ``model``'s weights. Most names are the same; three differ:

        ours                                        qkv.GPT
        pos_emb.weight                              pos_emb.emb.weight
        blocks.{i}.…                                layers.{i}.…
        blocks.{i}.self_attn.heads.{h}.q_proj       layers.{i}.self_attn.q_proj, rows h*E .. h*E+E
        (the same for k_proj and v_proj)

    qkv keeps the H heads' (E, D) projections as one (H * E, D) matrix and splits its output
    into heads afterwards, "b t (h e) -> b h t e": stacking our heads' rows in order gives it.
    """
    config = GPTConfig(
        vocab_size=s.vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
        max_seq_len=s.block_size, dropout=0.0,
        # The defaults already match BlockGPT; named here so the match can be read:
        d_ff=4 * s.d_model, activation="gelu_tanh", norm_eps=1e-5, tie_embeddings=True,
    )  # fmt: skip
    weights: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".heads." in name:
            continue  # joined below
        name = name.replace("pos_emb.weight", "pos_emb.emb.weight").replace("blocks.", "layers.")
        weights[name] = tensor
    for i, block in enumerate(model.blocks):
        for proj in ("q_proj", "k_proj", "v_proj"):
            heads = [getattr(head, proj) for head in block.self_attn.heads]
            prefix = f"layers.{i}.self_attn.{proj}"
            weights[f"{prefix}.weight"] = torch.cat([p.weight for p in heads])  # (H * E, D)
            weights[f"{prefix}.bias"] = torch.cat([p.bias for p in heads])  # (H * E,)
    gpt = GPT(config)
    gpt.load_state_dict(weights, strict=True)  # every tensor named, none left over
    return gpt.eval()


def same_logits(model: BlockGPT, s: Sizes, ids: Tensor) -> tuple[float, float]:
    """Run ``model`` and its ``qkv.GPT`` copy on ``ids`` (B, T); the largest difference of
    their logits and the largest logit. Raises AssertionError if the difference exceeds 1e-5
    times the largest logit (float32 arithmetic done in another order, nothing more)."""
    with torch.no_grad():
        ours = model.eval()(ids)  # (B, T, V)
        theirs = to_qkv_gpt(model, s)(ids).logits  # (B, T, V)
    diff, largest = (ours - theirs).abs().max().item(), ours.abs().max().item()
    assert diff <= 1e-5 * largest, f"logits differ by {diff:.3g} (largest logit {largest:.3g})"
    return diff, largest


# --8<-- [end:to_qkv]

QUICK_SIZES = {"d_model": 32, "n_heads": 4, "n_layers": 2, "block_size": 32}
QUICK_BUDGET = Budget(seconds=1.0, batch_size=16, evals=4, curve_windows=32)


def parameters(model: nn.Module) -> int:
    """Trainable numbers, a tied matrix counted once (``parameters()`` yields it once)."""
    return sum(p.numel() for p in model.parameters())


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | parameters | steps | validation loss (nats/char) | time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['parameters']:,} | {r['steps']:,} | {r['val_loss']:.3f} "
            f"| {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], vocab_size: int, b: Budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in rows:
        seconds, losses = zip(*r["curve"], strict=True)
        ax.plot(seconds, losses, marker=".", label=f"{r['stage']}  ({r['val_loss']:.2f})")
    ax.axhline(math.log(vocab_size), color="grey", ls=":", lw=1)
    ax.text(0, math.log(vocab_size), " uniform guess, ln V", va="bottom", fontsize=8)
    ax.set_xlabel(f"training time (s), {b.seconds:g} s per stage")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_ylim(top=math.log(vocab_size) + 0.3)
    ax.legend(loc="upper right", fontsize=8, title="stage (final loss)", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 s per stage (CI)")
    parser.add_argument("--seconds", type=float, help="training time per stage (default 60)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs/build_gpt"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = QUICK_BUDGET if args.quick else Budget()
    if args.seconds is not None:
        budget = replace(budget, seconds=args.seconds)
    chars, ids = load_characters()
    sizes = Sizes(vocab_size=len(chars), **(QUICK_SIZES if args.quick else {}))
    train_ids, val_ids = split(ids)
    val = validation_windows(val_ids, sizes.block_size)
    load = os.getloadavg()
    print(
        f"python-docs: {len(ids):,} characters, V = {len(chars)}; validation: "
        f"{val[1].numel():,} characters; {budget.seconds:g} s per stage; "
        f"{torch.get_num_threads()} threads; load average {load[0]:.1f}",
        flush=True,
    )
    rows = []
    model = None
    for name, stage in STAGES:
        model = build(stage, sizes, budget.seed)
        steps, seconds, curve = train(model, train_ids, val, sizes, budget)
        val_loss = evaluate(model, *val)  # on the whole validation split
        rows.append({
            "stage": name, "parameters": parameters(model), "steps": steps, "seconds": seconds,
            "val_loss": val_loss, "curve": curve,
        })  # fmt: skip
        print(f"{name:>18}: {steps:6,} steps, validation loss {val_loss:.3f}", flush=True)
    assert isinstance(model, BlockGPT)
    diff, largest = same_logits(model, sizes, val[0][:4])
    check = f"qkv.GPT gives the same logits: largest difference {diff:.2g}, largest logit "
    check += f"{largest:.3g} (tolerance 1e-5 x largest logit)"
    markdown = table(rows)
    print(f"\n{markdown}\n\n{check}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "sizes": asdict(sizes), "budget": asdict(budget), "stages": rows,
        "equal_to_qkv_gpt": {"max_abs_diff": diff, "largest_logit": largest, "passed": True},
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "load_average_before": load[0],
            "load_average_after": os.getloadavg()[0],
        },
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (args.out / "results.md").write_text(f"{markdown}\n\n{check}\n", encoding="utf-8")
    plot(rows, sizes.vocab_size, budget, args.out / "loss.png")
    print(f"wrote {args.out / 'results.md'}, results.json and loss.png", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
