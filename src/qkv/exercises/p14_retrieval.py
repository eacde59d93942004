"""Exercises of page 14, retrieval: a cosine similarity by hand, mean pooling with a mask,
top-k search by cosine, recall@k.

Shape legend: B batch · T positions · D model width · Q questions · N passages · K results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from qkv.exercises.cases import compare_number, compare_tensor, generator, randn
from qkv.exercises.grading import CaseResult, Exercise, call, require
from qkv.models.bert import sentence_embedding
from qkv.rag.metrics import recall_at_k
from qkv.rag.search import search

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/14-retrieval.md"


def check_cosine_by_hand(answer: Any) -> Iterator[CaseResult]:
    a, b = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([4.0, 0.0, 3.0])
    yield compare_number(
        answer,
        float(F.cosine_similarity(a, b, dim=0)),
        tol=2e-3,
        hint="cos = a·b / (|a| |b|)",
        wrong=[
            (10.0, "that is the dot product: divide it by both lengths, |a| and |b|"),
            (10 / 3, "divide by both lengths: |a| = 3 and |b| = 5"),
            (10 / 5, "divide by both lengths: |a| = 3 and |b| = 5"),
        ],
    )


def check_mean_pool(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, lengths in enumerate([[4, 4], [6, 3, 1], [5, 2, 5, 4]]):
        b, t, d = len(lengths), max(lengths), 8 * (seed + 1)
        hidden = randn(generator(1400 + seed), b, t, d) * 3
        mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()  # (B, T), 1 = real
        tested = f"hidden {(b, t, d)}, attention_mask (B, T) int64, lengths {lengths}"
        got = call(tested, "mean_pool(hidden, attention_mask)", fn, hidden.clone(), mask.clone())
        yield compare_tensor(
            tested,
            got,
            sentence_embedding(hidden, mask),
            hint="sum the vectors of the real tokens (mask 1), divide by their count, then "
            "scale each row to length 1",
            wrong=[
                (F.normalize(hidden.mean(dim=1), dim=-1), "leave the padding out: average "
                 "only the positions where the mask is 1"),
                (sentence_embedding(hidden, mask, normalize=False), "scale each mean to "
                 "length 1 (divide it by its norm)"),
                (sentence_embedding(hidden, 1 - mask), "the mask is 1 on real tokens and 0 "
                 "on padding: average where it is 1"),
            ],
        )  # fmt: skip


def check_top_k(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (q, n, d, k) in enumerate([(3, 10, 8, 1), (4, 20, 16, 5), (2, 12, 6, 12)]):
        g = generator(1410 + seed)
        queries = randn(g, q, d) * (0.2 + 4 * torch.rand(q, 1, generator=g))  # lengths vary
        passages = randn(g, n, d) * (0.2 + 4 * torch.rand(n, 1, generator=g))
        tested = f"queries {(q, d)}, passages {(n, d)} of many lengths, k={k}"
        got = call(tested, "top_k(queries, passages, k)", fn, queries.clone(), passages.clone(),
                   k, returns=("scores", "indices"))  # fmt: skip
        unit_q, unit_p = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
        scores, indices = search(unit_q, unit_p, k)  # (Q, k) each
        require(compare_tensor(
            tested,
            got[0],
            scores,
            what="the scores",
            hint="cosine similarity: the dot products of the unit-length vectors, the k "
            "largest of each row, best first",
            wrong=[
                ((queries @ passages.T).topk(k).values, "a dot product is a cosine only "
                 "between unit vectors: normalise queries and passages first"),
                ((queries @ unit_p.T).topk(k).values, "normalise the queries too"),
                ((unit_q @ passages.T).topk(k).values, "normalise the passages too"),
                (-(-unit_q @ unit_p.T).topk(k).values, "keep the k largest scores, not the "
                 "smallest"),
            ],
        ))  # fmt: skip
        yield compare_tensor(
            tested,
            got[1],
            indices,
            what="the indices",
            hint="the rows of the passages with those scores, in the same order",
        )


def check_recall(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    for seed, (q, n, big_k, k) in enumerate([(6, 12, 5, 1), (10, 20, 5, 3), (8, 9, 4, 4)]):
        g = generator(1420 + seed)
        relevant = torch.rand(q, n, generator=g) < 0.2  # (Q, N): passage n answers question q
        indices = torch.stack([torch.randperm(n, generator=g)[:big_k] for _ in range(q)])
        tested = f"indices (Q, K) = {(q, big_k)}, relevant (Q, N) = {(q, n)}, k={k}"
        got = call(tested, "recall_at_k(indices, relevant, k)", fn, indices.clone(),
                   relevant.clone(), k)  # fmt: skip
        if isinstance(got, (int, float)) and not isinstance(got, bool):
            got = torch.tensor(float(got))
        hit = relevant.gather(1, indices)  # (Q, K): does the passage at rank i answer?
        yield compare_tensor(
            tested,
            got,
            torch.tensor(recall_at_k(hit, k)),
            what="the recall",
            hint="the fraction of questions with at least one answering passage among their "
            "first k",
            wrong=[
                (hit[:, :k].float().mean(), "that is precision@k, the fraction of answering "
                 "passages: recall@k counts a question once if any of its first k answers"),
                (hit[:, :k].sum(1).float().mean(), "count each question at most once (any "
                 "answering passage), not once per passage"),
                (torch.tensor(recall_at_k(hit, big_k)) if k < big_k else None, "look at the "
                 "first k ranks only, not all K"),
            ],
        )  # fmt: skip


EXERCISES = [
    Exercise(
        id="14.1",
        title="A cosine similarity by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "What is the cosine similarity of a = (1, 2, 2) and b = (4, 0, 3)? `ANSWER = ...` "
            "(three decimals)."
        ),
        check=check_cosine_by_hand,
    ),
    Exercise(
        id="14.2",
        title="Mean pooling with a mask",
        kind="code",
        name="mean_pool",
        statement=(
            "Write `mean_pool(hidden, attention_mask)` -> (B, D): hidden (B, T, D) are the "
            "final vectors of a batch, attention_mask (B, T) int64 is 1 on real tokens and 0 "
            "on padding. Return each sequence's mean over its real tokens, scaled to length 1."
        ),
        check=check_mean_pool,
    ),
    Exercise(
        id="14.3",
        title="Top-k search by cosine similarity",
        kind="code",
        name="top_k",
        statement=(
            "Write `top_k(queries, passages, k)` -> (scores, indices): queries (Q, D) and "
            "passages (N, D) are embeddings of any length. Return the k largest cosine "
            "similarities of each query with the passages and the passages' rows, both "
            "(Q, k), best first."
        ),
        check=check_top_k,
    ),
    Exercise(
        id="14.4",
        title="Recall@k",
        kind="code",
        name="recall_at_k",
        statement=(
            "Write `recall_at_k(indices, relevant, k)` -> float: indices (Q, K) int64 are the "
            "passages a search returned for each question, best first; relevant (Q, N) bool "
            "says whether passage n answers question q. Return the fraction of questions with "
            "at least one answering passage among their first k (k <= K)."
        ),
        check=check_recall,
    ),
]
