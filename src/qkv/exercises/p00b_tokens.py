"""Exercises of page 0b, tokens and embeddings: rows that learn and a tied head's saving by
hand, the 2017 Transformer's scaled embedding, GPT's tied output head.

Shape legend: B batch · T positions · N rows of the position table · V vocabulary · D model
width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.data.tokenizers import char_tokenizer
from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call
from qkv.models.gpt import GPT, GPTConfig
from qkv.positional.sinusoidal import sinusoidal_table

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/00b-tokens-and-embeddings.md"

WORD = "abracadabra"


def check_rows_by_hand(answer: Any) -> Iterator[CaseResult]:
    ids = char_tokenizer([WORD]).encode(WORD).ids
    yield compare_number(
        answer,
        float(len(set(ids))),
        tol=0.0,
        hint="a lookup reads one row per token; only the rows that are read get a gradient, "
        "and a row read several times is still one row",
        wrong=[
            (float(len(ids)), "that counts the tokens; a row read twice is one row, so count "
             "the different characters"),
            (float(len(ids) - len(set(ids))), "count the rows that are read, each once"),
        ],
    )  # fmt: skip


def check_tied_saving_by_hand(answer: Any) -> Iterator[CaseResult]:
    v, d = 32_000, 4_096
    untied = GPTConfig(vocab_size=v, d_model=d, n_layers=1, n_heads=32, tie_embeddings=False)
    tied = GPTConfig(vocab_size=v, d_model=d, n_layers=1, n_heads=32)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        saving = GPT(untied).num_parameters() - GPT(tied).num_parameters()
    yield compare_number(
        answer,
        float(saving),
        tol=0.5,
        hint="the output head is a (V, D) matrix, the shape of the embedding table; tying makes "
        "the two one matrix",
        wrong=[
            (2.0 * saving, "that is both matrices; tying keeps one of them, so it saves one"),
            (saving / 1e6, "write the number of parameters itself, not millions"),
            (float(v + d), "a (V, D) matrix holds V x D numbers, not V + D"),
        ],
    )


def _embed(ids: Tensor, table: Tensor, pos_table: Tensor, scale: float) -> Tensor:
    return F.embedding(ids, table) * scale + pos_table[: ids.shape[-1]]  # (B, T, D)


def check_embed(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, v, d, n) in enumerate([(1, 4, 10, 8, 4), (2, 6, 30, 16, 20), (3, 1, 5, 4, 8)]):
        g = generator(30 + seed)
        ids = torch.randint(v, (b, t), generator=g)
        table = randn(g, v, d) * d**-0.5  # the 2017 initialisation: std 1/sqrt(D)
        pos_table = sinusoidal_table(n, d)  # (N, D)
        tested = f"ids ({b}, {t}), table ({v}, {d}), pos_table ({n}, {d})"
        got = call(tested, "embed(ids, table, pos_table)", fn, ids, table, pos_table)
        yield compare_tensor(
            tested,
            got,
            _embed(ids, table, pos_table, math.sqrt(d)),
            hint="row ids[b, t] of the table, times sqrt(D), plus row t of pos_table",
            wrong=[
                (_embed(ids, table, pos_table, 1.0), "multiply the token embeddings by sqrt(D) "
                 "before adding the positions"),
                (_embed(ids, table, pos_table, d**-0.5), "the scale is sqrt(D), a multiplication: "
                 "it brings entries of size 1/sqrt(D) up to about 1"),
                (_embed(ids, table, pos_table * math.sqrt(d), math.sqrt(d)), "scale only the token "
                 "embeddings, then add the positions: (E[ids]) * sqrt(D) + P"),
            ],
        )  # fmt: skip


def check_tied_logits(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (b, t, v, d) in enumerate([(1, 5, 20, 16), (2, 7, 50, 32)]):
        config = GPTConfig(vocab_size=v, d_model=d, n_layers=2, n_heads=4, max_seq_len=16)
        with torch.random.fork_rng(devices=[]):  # a fixed model, the global generator untouched
            torch.manual_seed(40 + seed)
            model = GPT(config).eval()
        ids = torch.randint(v, (b, t), generator=generator(40 + seed))
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        h, table = out.last_hidden_state, model.tok_emb.weight.detach()  # (B, T, D), (V, D)
        tested = f"a qkv.GPT with tied head, V={v}, D={d}: h ({b}, {t}, {d}), table ({v}, {d})"
        got = call(tested, "tied_logits(h, table)", fn, h, table)
        yield compare_tensor(
            tested,
            got,
            out.logits,
            atol=1e-4,
            hint="the score of piece v is the dot product h · table[v]: logits = h @ table.T",
            wrong=[
                (out.logits.softmax(-1), "return the logits, the scores before any softmax"),
                (out.logits * d**-0.5, "the head has no 1/sqrt(D) scale: the logits are plain "
                 "dot products h · E_v"),
                (out.logits.log_softmax(-1), "return the logits themselves, not log-probabilities"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="00b.1",
        title="Which rows learn",
        kind="by hand",
        name="ANSWER",
        statement=(
            f"A character tokenizer turns the one-word batch {WORD!r} into one id per character, "
            "and an embedding table looks them up. After a backward pass, how many rows of the "
            "table have a gradient that is not zero? `ANSWER = ...`."
        ),
        check=check_rows_by_hand,
    ),
    Exercise(
        id="00b.2",
        title="What a tied head saves",
        kind="by hand",
        name="ANSWER",
        statement=(
            "A language model has a vocabulary of V = 32,000 pieces and width D = 4,096 (the "
            "sizes of LLaMA-2 7B). How many parameters does tying the output head to the "
            "embedding table save? `ANSWER = ...`."
        ),
        check=check_tied_saving_by_hand,
    ),
    Exercise(
        id="00b.3",
        title="The scaled embedding of 2017",
        kind="code",
        name="embed",
        statement=(
            "Write `embed(ids, table, pos_table)`: ids (B, T) token ids, table (V, D) the "
            "embedding table, pos_table (N, D) the sinusoidal encodings of positions 0 .. N - 1 "
            "(N >= T). Return the 2017 Transformer's input, (B, T, D): each token's row of the "
            "table times sqrt(D), plus the encoding of its position."
        ),
        check=check_embed,
    ),
    Exercise(
        id="00b.4",
        title="The tied output head",
        kind="code",
        name="tied_logits",
        statement=(
            "Write `tied_logits(h, table)`: h (B, T, D) the vectors after a model's last layer, "
            "table (V, D) its token embedding. Return the logits (B, T, V), the score of every "
            "piece of the vocabulary, with the table itself as the output head. The checker "
            "compares them with the logits of a qkv.GPT whose head is tied."
        ),
        check=check_tied_logits,
    ),
]
