"""``qkv rag``: retrieve passages of Python's documentation for a question, and answer from them.

    qkv rag "How do I leave a loop early?"                      the top 5 passages, with scores
    qkv rag "How do I leave a loop early?" --topics break,for,while,pass   search a few topics
    qkv rag "What does assert do?" --generator runs/gpt-char-...  also a trained decoder's answer

The passages are Python's help topics cut by ``qkv.rag.split_topics`` (or the topics of a JSON
file, ``--corpus``), embedded by all-MiniLM-L6-v2 (``--encoder``) once and cached; the search
is exact cosine similarity (``qkv.rag.search``).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

__all__ = ["cmd_rag", "register"]

SHOW_CHARS = 400  # of each passage, when printed


def _topics(args: argparse.Namespace) -> dict[str, str]:
    from qkv.rag import python_docs_topics

    if args.corpus:
        data = json.loads(Path(args.corpus).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{args.corpus} must hold one JSON object of topic name -> text")
        topics: dict[str, str] = data
    else:
        topics = python_docs_topics()
    if args.topics:
        wanted = [t.strip() for t in args.topics.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in topics]
        if unknown:
            raise ValueError(
                f"no topic named {', '.join(unknown)}; the topics are: {', '.join(sorted(topics))}"
            )
        topics = {t: topics[t] for t in wanted}
    return topics


def cmd_rag(args: argparse.Namespace) -> int:
    """Print the passages nearest the question and, with a generator, its answer."""
    from qkv.interop.files import CheckpointError
    from qkv.rag import Encoder, answer, embed_passages, load_generator, search, split_topics
    from qkv.rag.embed import default_cache_dir

    if not args.question.strip():
        print("qkv rag: the question is empty", file=sys.stderr)
        return 2
    try:
        passages = split_topics(_topics(args))
        if not passages:
            raise ValueError("the topics hold no text to search")
        encoder = Encoder.load(args.encoder)
        cache = None if args.no_cache else Path(args.cache_dir or default_cache_dir())
        passage_emb = embed_passages(encoder, [p.text for p in passages], cache_dir=cache)
        query_emb = encoder.embed([args.question])  # (1, D)
        scores, indices = search(query_emb, passage_emb, min(args.top_k, len(passages)))
        generator = load_generator(args.generator) if args.generator else None
    except (OSError, ValueError, CheckpointError) as e:
        print(f"qkv rag: {e}", file=sys.stderr)
        return 2
    found = [passages[i] for i in indices[0].tolist()]
    print(f"{len(passages)} passages; the {len(found)} nearest to {args.question!r}:\n")
    for rank, (passage, score) in enumerate(zip(found, scores[0].tolist(), strict=True), 1):
        print(f"{rank}. {score:.3f}  {passage.title}  [help: {', '.join(passage.topics)}]")
        text = passage.text[:SHOW_CHARS] + (" ..." if len(passage.text) > SHOW_CHARS else "")
        print(textwrap.indent(text, "     "), end="\n\n")
    if generator is None:
        print("(no --generator: pass a run directory of qkv train to also generate an answer)")
        return 0
    model, tokenizer = generator
    reply = answer(
        model, tokenizer, args.question, [p.text for p in found], max_new_tokens=args.max_new_tokens
    )
    print(f"answer ({args.generator}):\n{reply}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rag`` to the ``qkv`` command."""
    p = sub.add_parser(
        "rag",
        help="retrieve passages of Python's docs for a question (and answer from them)",
        description=(
            "Embed Python's help topics with all-MiniLM-L6-v2, print the passages nearest a "
            "question with their cosine similarity and, given a trained decoder, its answer "
            "conditioned on them."
        ),
    )
    p.add_argument("question", help="the question, in words")
    p.add_argument("--top-k", type=int, default=5, help="passages to retrieve (default 5)")
    p.add_argument("--generator", help="a run directory of qkv train (a decoder) to answer with")
    p.add_argument("--max-new-tokens", type=int, default=120, help="answer length (default 120)")
    p.add_argument("--encoder", default="minilm", help="sentence encoder (default minilm)")
    p.add_argument("--topics", help="search only these help topics, e.g. break,for,while")
    p.add_argument("--corpus", help="a JSON file of topic name -> text to search instead")
    p.add_argument("--cache-dir", help="embedding cache (default ~/.cache/qkv/retrieval)")
    p.add_argument("--no-cache", action="store_true", help="embed afresh, write no cache")
    p.set_defaults(func=cmd_rag)
