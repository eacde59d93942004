"""Retrieval on Python's documentation: MiniLM against BM25 against no retrieval
(docs/learn/14-retrieval.md).

    python benchmarks/retrieval.py                 the table, timings and the failures
    python benchmarks/retrieval.py --markdown      the same, as Markdown for RESULTS.md

The passages are ``qkv.rag.split_topics`` of this Python's ``pydoc_data.topics``; the questions
are ``qkv.rag.build_questions`` of the same topics (a ``name`` and a ``description`` question
per topic, fixed rules, see ``qkv/rag/questions.py``). Every passage is embedded afresh (no
cache) so that the embedding time is measured; MiniLM searches exactly (``qkv.rag.search``),
BM25 through ``bm25s``, and "none" is the exact expected recall of k random passages. Two
variants of the description questions (masked words deleted; the sentence unmasked) show what
the mask costs each retriever. When ``rank_bm25`` is installed, it is scored on the same words
as a check of the BM25 library.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import qkv
from qkv.rag import (
    BM25,
    Encoder,
    build_questions,
    hits,
    keywords,
    python_docs_topics,
    random_recall,
    recall_at_k,
    search,
    split_topics,
)
from qkv.rag.questions import MASK, first_sentence

K = 5
SHOW_FAILURES = 6


def _rank_bm25(texts: list[str], queries: list[str]) -> tuple[torch.Tensor, float, float]:
    """Top-K rows by rank_bm25's BM25Okapi, and its index and query seconds."""
    from rank_bm25 import BM25Okapi

    start = time.perf_counter()
    index = BM25Okapi([keywords(t) for t in texts])
    built = time.perf_counter() - start
    start = time.perf_counter()
    scores = torch.tensor([list(index.get_scores(keywords(q))) for q in queries])  # (Q, N)
    return scores.topk(K, dim=-1).indices, built, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)

    topics = python_docs_topics()
    passages = split_topics(topics)
    questions = build_questions(topics)
    texts = [p.text for p in passages]
    queries = [q.text for q in questions]

    encoder = Encoder.load("minilm")
    start = time.perf_counter()
    passage_emb = encoder.embed(texts)  # (N, D)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    query_emb = encoder.embed(queries)  # (Q, D)
    query_s = time.perf_counter() - start
    start = time.perf_counter()
    _, dense = search(query_emb, passage_emb, K)  # (Q, K)
    search_ms = (time.perf_counter() - start) * 1e3
    cut = sum(len(encoder.tokenizer.encode(t).ids) >= encoder.max_tokens for t in texts)

    start = time.perf_counter()
    bm25 = BM25(texts)
    bm25_index_s = time.perf_counter() - start
    start = time.perf_counter()
    _, sparse = bm25.search(queries, K)  # (Q, K)
    bm25_query_s = time.perf_counter() - start

    rows: list[tuple[str, str, float, float]] = []
    kinds = sorted({q.kind for q in questions}, reverse=True)  # name, description
    for kind in [*kinds, "all"]:
        picked = [i for i, q in enumerate(questions) if kind in ("all", q.kind)]
        qs = [questions[i] for i in picked]
        for name, found in (("MiniLM (exact cosine)", dense), ("BM25 (bm25s)", sparse)):
            hit = hits(qs, passages, found[picked])
            rows.append((kind, name, recall_at_k(hit, 1), recall_at_k(hit, K)))
        none = (random_recall(qs, passages, 1), random_recall(qs, passages, K))
        rows.append((kind, "none (k random passages)", *none))

    # What hurts MiniLM on descriptions: the mask token, or the missing name? The same
    # questions with the masked words deleted, and with the sentence as written (unmasked).
    described = [q for q in questions if q.kind == "description"]
    variants = {
        "description, masked words deleted": [
            " ".join(w for w in q.text.split() if w != MASK) for q in described
        ],
        "description, unmasked (as written)": [
            f"{first_sentence(topics[q.topics[0]])}." for q in described
        ],
    }
    for kind, texts_of_kind in variants.items():
        _, found = search(encoder.embed(texts_of_kind), passage_emb, K)
        hit = hits(described, passages, found)
        rows.append((kind, "MiniLM (exact cosine)", recall_at_k(hit, 1), recall_at_k(hit, K)))
        hit = hits(described, passages, bm25.search(texts_of_kind, K)[1])
        rows.append((kind, "BM25 (bm25s)", recall_at_k(hit, 1), recall_at_k(hit, K)))

    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"qkv {qkv.__version__}, torch {torch.__version__}, Python {platform.python_version()}"
        f" (pydoc_data of this Python), {platform.processor() or platform.machine()},"
        f" {threads} threads, load average {load:.1f}"
    )
    print(
        f"{len(passages)} passages from {len(topics)} topics, {len(questions)} questions"
        f" ({', '.join(f'{sum(q.kind == k for q in questions)} {k}' for k in kinds)});"
        f" {cut} passages reach MiniLM's {encoder.max_tokens} word pieces and are cut\n"
    )
    if args.markdown:
        print(f"| questions | retriever | recall@1 | recall@{K} |\n|---|---|---:|---:|")
    for kind, name, r1, rk in rows:
        if args.markdown:
            print(f"| {kind} | {name} | {r1:.3f} | {rk:.3f} |")
        else:
            print(f"{kind:<12} {name:<26} recall@1 {r1:.3f}  recall@{K} {rk:.3f}")
    print()
    print(
        f"MiniLM: embedding {len(passages)} passages took {embed_s:.1f} s"
        f" ({len(passages) / embed_s:.1f} passages/s), {len(questions)} questions {query_s:.1f} s,"
        f" exact search of all questions {search_ms:.2f} ms"
    )
    print(f"BM25 (bm25s): index {bm25_index_s:.2f} s, all questions {bm25_query_s * 1e3:.0f} ms")
    try:
        ranked, built, queried = _rank_bm25(texts, queries)
    except ImportError:
        print("rank_bm25 is not installed: the check of the BM25 library is skipped")
    else:
        hit = hits(questions, passages, ranked)
        print(
            f"BM25 (rank_bm25, same words): recall@1 {recall_at_k(hit, 1):.3f},"
            f" recall@{K} {recall_at_k(hit, K):.3f}; index {built:.2f} s,"
            f" all questions {queried * 1e3:.0f} ms"
        )

    dense_hit = hits(questions, passages, dense)
    sparse_hit = hits(questions, passages, sparse)
    print(f"\nwhere MiniLM misses in the top {K} (BM25's result in brackets):")
    shown = 0
    for i, q in enumerate(questions):
        if dense_hit[i].any() or shown >= SHOW_FAILURES:
            continue
        shown += 1
        top = passages[int(dense[i, 0])]
        ok = "hit" if sparse_hit[i].any() else "miss"
        print(f"  [{q.kind}] {q.text!r} -> wants {'/'.join(q.topics)}, got {top.title!r} [{ok}]")
    both = int((~dense_hit.any(1) & ~sparse_hit.any(1)).sum())
    only_dense = int((dense_hit.any(1) & ~sparse_hit.any(1)).sum())
    only_sparse = int((~dense_hit.any(1) & sparse_hit.any(1)).sum())
    print(
        f"missed in the top {K}: by both {both}, only by BM25 {only_dense},"
        f" only by MiniLM {only_sparse} (of {len(questions)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
