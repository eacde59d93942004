"""Search: the passages nearest a question, by embedding (exact, in torch) and by keywords (BM25).

Dense search. With unit-length embeddings the cosine similarity of a question q and a passage
p is their dot product, so scoring every passage is one matrix product, and the k best are a
``topk``::

    scores = Q Pᵀ          (Q questions × N passages)
    top-k  = the k largest scores of each row

This is exact: every passage is scored. For Python's help (N = 596 passages, D = 384) all 150
questions of ``benchmarks/retrieval.py`` were searched in 28 to 104 ms on a busy 2-core CPU,
while embedding the passages took two to three minutes: an approximate index such as faiss
(which trades a little recall for speed at millions of passages) would save nothing here.
``search_reference`` is the plain version, a full sort, and the tests hold the two equal.

Keyword search. BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25
and Beyond") scores a passage by the query words it contains, each weighted by how rare the
word is (IDF) and damped by how often it repeats and how long the passage is::

    score(q, p) = Σ_{w ∈ q} IDF(w) · f(w, p) (k1 + 1) / (f(w, p) + k1 (1 − b + b |p| / avg|p|))

It is the classic baseline a learned retriever must beat. qkv uses the ``bm25s`` package
(sparse matrices; ``pip install bm25s``) with its defaults (Lucene's variant, k1 = 1.5,
b = 0.75) over qkv's own word split, ``keywords``: lower case, runs of letters, digits and
underscores, with no stop words and no stemming (``in``, ``is`` and ``not`` are Python
keywords here, not noise).

Shape legend: Q questions · N passages · D model width · k results.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BM25", "keywords", "search", "search_reference"]

_WORD = re.compile(r"\w+")


# --8<-- [start:search]
def search(queries: Tensor, passages: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` passages most similar to each query: exact search over all of them.

    Args:
        queries: (Q, D) unit-length embeddings.
        passages: (N, D) unit-length embeddings.
        k: results per query; at most N.

    Returns:
        ``(scores, indices)``, both (Q, k), best first: cosine similarities and passage rows.
    """
    if not 1 <= k <= passages.shape[0]:
        raise ValueError(f"k={k}: pick between 1 and the number of passages, {passages.shape[0]}")
    scores = queries @ passages.T  # (Q, N): cosine similarity, as both sides have length 1
    top = scores.topk(k, dim=-1)  # (Q, k): the k largest of each row, sorted
    return top.values, top.indices


# --8<-- [end:search]


def search_reference(queries: Tensor, passages: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``search`` done the plain way: score every pair in a loop, sort each row, keep k."""
    all_scores = []
    for q in queries:  # (D,)
        row = torch.stack([torch.dot(q, p) for p in passages])  # (N,)
        all_scores.append(row)
    scores = torch.stack(all_scores)  # (Q, N)
    order = scores.argsort(dim=-1, descending=True, stable=True)[:, :k]  # (Q, k)
    return scores.gather(-1, order), order


def keywords(text: str) -> list[str]:
    """The words BM25 matches: lower case, runs of ``\\w`` that are not only underscores."""
    return [w for w in _WORD.findall(text.lower()) if w.strip("_")]


class BM25:
    """A BM25 index of passages (``bm25s``), searched with ``search(queries, k)``.

    Args:
        texts: the passages' texts.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        try:
            import bm25s
        except ImportError:
            raise ImportError(
                "the BM25 baseline needs the bm25s package: pip install bm25s "
                "(or pip install 'qkv[test]')"
            ) from None
        self.size = len(texts)
        self._index: Any = bm25s.BM25()
        self._index.index([keywords(t) for t in texts], show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[Tensor, Tensor]:
        """``(scores, indices)``, both (Q, k), best first, for each query text."""
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k}: pick between 1 and the number of passages, {self.size}")
        # A query word the passages never use is dropped; an empty query still gets k rows.
        tokens = [keywords(q) or ["_"] for q in queries]
        indices, scores = self._index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(indices).long()
