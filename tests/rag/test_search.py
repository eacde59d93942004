"""Exact search against a brute-force sort, BM25, and recall@k on a toy set."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from qkv.rag.metrics import hits, random_recall, recall_at_k
from qkv.rag.passages import Passage
from qkv.rag.questions import Question
from qkv.rag.search import BM25, keywords, search, search_reference
from tests.optional import require


@pytest.mark.parametrize("k", [1, 5, 40])
def test_search_is_exact_top_k(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    passages = F.normalize(torch.randn(40, 16, generator=g), dim=-1)  # (N, D)
    queries = F.normalize(torch.randn(7, 16, generator=g), dim=-1)  # (Q, D)
    scores, indices = search(queries, passages, k)
    ref_scores, ref_indices = search_reference(queries, passages, k)
    assert scores.shape == indices.shape == (7, k)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)
    # Brute force, by hand: every pair's cosine, sorted.
    full = torch.tensor(
        [[F.cosine_similarity(q, p, dim=0).item() for p in passages] for q in queries]
    )
    torch.testing.assert_close(scores, full.sort(dim=-1, descending=True).values[:, :k])
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first


def test_search_finds_a_planted_passage() -> None:
    passages = F.normalize(torch.randn(30, 8), dim=-1)
    query = passages[17:18] + 0.01 * torch.randn(1, 8)
    _, indices = search(F.normalize(query, dim=-1), passages, 3)
    assert indices[0, 0] == 17
    with pytest.raises(ValueError, match="pick between 1 and the number of passages, 30"):
        search(query, passages, 31)


def test_keywords() -> None:
    words = keywords('The "__debug__" flag: x in s, ___')
    assert words == ["the", "__debug__", "flag", "x", "in", "s"]


def test_bm25_ranks_by_rare_shared_words() -> None:
    require("bm25s")
    texts = [
        "the assert statement inserts debugging assertions",
        "the while statement repeats a block",
        "a lambda creates an anonymous function",
        "the break statement leaves a loop",
    ]
    index = BM25(texts)
    scores, indices = index.search(["anonymous function", "leave the loop with break"], 2)
    assert indices[:, 0].tolist() == [2, 3]
    assert scores.shape == (2, 2) and bool((scores[:, 0] > scores[:, 1]).all())


QUESTIONS = [
    Question("q1", ("a",), "name"),
    Question("q2", ("b", "c"), "name"),
    Question("q3", ("c",), "description"),
]
PASSAGES = [
    Passage("p0", "A", ("a",)),
    Passage("p1", "B", ("b",)),
    Passage("p2", "A", ("a", "c")),
    Passage("p3", "D", ("d",)),
]


def test_recall_on_a_toy_set() -> None:
    found = torch.tensor([[3, 0], [2, 1], [1, 3]])  # (Q, k) rows, best first
    hit = hits(QUESTIONS, PASSAGES, found)
    assert hit.tolist() == [[False, True], [True, True], [False, False]]
    assert recall_at_k(hit, 1) == pytest.approx(1 / 3)
    assert recall_at_k(hit, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k=3"):
        recall_at_k(hit, 3)


def test_random_recall_is_exact() -> None:
    # q1: m = 2 of N = 4 (p0, p2); q2: m = 2 (p1, p2); q3: m = 1 (p2).
    r1 = (2 / 4 + 2 / 4 + 1 / 4) / 3
    assert random_recall(QUESTIONS, PASSAGES, 1) == pytest.approx(r1)
    miss_2_of_4 = math.comb(2, 2) / math.comb(4, 2)  # m = 2: both draws among the other 2
    miss_1_of_4 = math.comb(3, 2) / math.comb(4, 2)  # m = 1: both draws among the other 3
    r2 = ((1 - miss_2_of_4) * 2 + (1 - miss_1_of_4)) / 3
    assert random_recall(QUESTIONS, PASSAGES, 2) == pytest.approx(r2)
    assert random_recall(QUESTIONS, PASSAGES, 4) == pytest.approx(1.0)
