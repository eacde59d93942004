"""Generation conditioned on retrieved passages: the "G" of retrieval-augmented generation.

A language model answers from what is in its context. Retrieval puts the passages that matter
there: the prompt is the passages, then the question, then the cue for an answer::

    <passage k> ... <passage 2> <passage 1>      worst first: the best lands nearest the question
    Question: <question>
    Answer:

and the model continues it (Lewis et al. 2020, "Retrieval-Augmented Generation for
Knowledge-Intensive NLP Tasks", arXiv:2005.11401, in its simplest form: the passages are
concatenated, not marginalised over). A prompt longer than the model's context keeps its end:
the question and the best passages.

The generator is whatever decoder the user trained (``qkv train --preset gpt-char`` learns
Python's documentation character by character in minutes). Such a small model reads only its
last ``max_seq_len`` characters and has learned the style of the docs, not how to answer, so
expect it to continue the best passage's prose more than to answer; the mechanism is the same
for a model large enough to answer.

Shape legend: T positions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qkv.generate import generate
from qkv.interop.pretrained import from_pretrained

__all__ = ["answer", "build_prompt", "load_generator"]


# --8<-- [start:build_prompt]
def build_prompt(question: str, passages: Sequence[str]) -> str:
    """The prompt: the passages worst first (``passages`` is best first), then the question."""
    context = "\n\n".join(reversed(passages))
    return f"{context}\n\nQuestion: {question}\nAnswer:"


# --8<-- [end:build_prompt]


def load_generator(run_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The decoder and tokenizer of a run directory (its ``final/`` model) or a checkpoint."""
    path = Path(run_dir)
    directory = path / "final" if (path / "final" / "config.json").is_file() else path
    model, tokenizer = from_pretrained(directory, return_tokenizer=True)
    if not hasattr(model, "new_cache"):
        raise ValueError(
            f"{run_dir} holds a {type(model).__name__}, not a language model; pass the run "
            "directory of a decoder (qkv train --preset gpt-char)"
        )
    return model, tokenizer


def answer(
    model: Any,
    tokenizer: Any,
    question: str,
    passages: Sequence[str],
    *,
    max_new_tokens: int = 120,
) -> str:
    """The model's greedy continuation of ``build_prompt(question, passages)``, up to the
    first blank line.

    Args:
        model: a decoder (``GPT``, ``Llama``, ...).
        tokenizer: its ``tokenizers.Tokenizer``.
        question: the question.
        passages: the retrieved passages' texts, best first.
        max_new_tokens: the most tokens to generate.
    """
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = tokenizer.encode(build_prompt(question, passages)).ids
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - 1)
        ids = ids[-(limit - max_new_tokens) :]  # keep the end: the question, the best passage
    prompt = torch.tensor([ids])  # (1, T)
    out = generate(model, prompt, max_new_tokens=max_new_tokens, eos_token_id=[])
    text: str = tokenizer.decode(out[0, prompt.shape[1] :].tolist())
    return text.split("\n\n", 1)[0].strip()
