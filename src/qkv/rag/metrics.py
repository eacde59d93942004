"""Recall@k: how often the right passage is among the first k a retriever returns.

A question is answered by a topic; a retrieved passage answers it when that topic holds the
passage. Recall@k is the fraction of questions with at least one such passage in the top k::

    recall@k = (1/|Q|) Σ_q 1[ ∃ i ≤ k : topic(q) ∈ topics(passage_i(q)) ]

Recall@1 asks "is the best passage right?"; recall@5 asks "would a reader (or a generator)
given five passages have the answer in front of it?", which is what retrieval-augmented
generation needs.

The floor is no retrieval at all: k passages drawn at random. For a question that m of the N
passages answer, the chance that none of k distinct random passages does is
C(N − m, k) / C(N, k), so its expected recall is ``random_recall`` below, computed exactly,
not sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from qkv.rag.passages import Passage
from qkv.rag.questions import Question

__all__ = ["hits", "random_recall", "recall_at_k"]


def hits(questions: Sequence[Question], passages: Sequence[Passage], indices: Tensor) -> Tensor:
    """(Q, k) bool: whether the passage at each rank answers each question.

    Args:
        questions: Q questions.
        passages: the N passages the indices point into.
        indices: (Q, k) passage rows, best first, from a search.
    """
    return indices.new_tensor(
        [
            [bool(set(q.topics) & set(passages[i].topics)) for i in row]
            for q, row in zip(questions, indices.tolist(), strict=True)
        ]
    ).bool()  # (Q, k)


# --8<-- [start:recall]
def recall_at_k(hit: Tensor, k: int) -> float:
    """The fraction of questions answered within the first ``k`` ranks.

    Args:
        hit: (Q, K) bool from ``hits``, K >= k.
        k: how many ranks count.

    Example:
        >>> import torch
        >>> hit = torch.tensor([[True, False], [False, True], [False, False]])
        >>> round(recall_at_k(hit, 1), 3), round(recall_at_k(hit, 2), 3)
        (0.333, 0.667)
    """
    if not 1 <= k <= hit.shape[1]:
        raise ValueError(f"k={k}: the search returned {hit.shape[1]} results per question")
    return hit[:, :k].any(dim=1).float().mean().item()


# --8<-- [end:recall]


def random_recall(questions: Sequence[Question], passages: Sequence[Passage], k: int) -> float:
    """Expected recall@k of k distinct passages drawn uniformly at random (no retrieval)."""
    n = len(passages)
    total = 0.0
    for q in questions:
        m = sum(bool(set(q.topics) & set(p.topics)) for p in passages)
        miss = 1.0  # C(n - m, k) / C(n, k), as a product of k ratios
        for i in range(k):
            miss *= max(n - m - i, 0) / (n - i)
        total += 1.0 - miss
    return total / len(questions)
