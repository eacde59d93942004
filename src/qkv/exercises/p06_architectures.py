"""Exercises of page 6, architectures: which stacks are causal, label smoothing, seq2seq masks.

Shape legend: B batch · S source positions · T target positions · V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention import masks
from qkv.exercises.cases import compare_number, compare_tensor, generator
from qkv.exercises.grading import CaseResult, Exercise, call, require

__all__ = ["EXERCISES", "PAGE"]

PAGE = "docs/learn/06-architectures.md"

CAUSAL_CHOICES = {
    1: "BERT's encoder",
    2: "GPT's decoder",
    3: "the encoder of the 2017 translation Transformer",
    4: "the self-attention of that Transformer's decoder",
    5: "the cross-attention of that Transformer's decoder",
    6: "the Vision Transformer (ViT)",
}
_WHY = {
    1: "BERT reads both ways: its only mask hides padding",
    2: "GPT predicts the next token, so position t must not see positions after t",
    3: "the encoder reads the whole source sentence, both ways",
    4: "the decoder's self-attention must not see later target tokens",
    5: "cross-attention lets every target position read the whole source (padding aside)",
    6: "a ViT's patches all see each other",
}


def check_which_causal(answer: Any) -> Iterator[CaseResult]:
    want = {2, 4}
    tested = "ANSWER"
    try:
        given = {int(x) for x in answer}
    except (TypeError, ValueError):
        yield CaseResult(
            tested, False, f"ANSWER is a {type(answer).__name__}", "write a set: ANSWER = {1, 2}"
        )
        return
    if given == want:
        yield CaseResult(tested, True)
        return
    extra, missing = sorted(given - want), sorted(want - given)
    problem = f"ANSWER = {sorted(given)} is not right"
    if extra:
        yield CaseResult(tested, False, problem, f"{extra[0]} is not causal: {_WHY[extra[0]]}")
    else:
        yield CaseResult(tested, False, problem, f"{missing[0]} is causal: {_WHY[missing[0]]}")


def check_smoothing_by_hand(answer: Any) -> Iterator[CaseResult]:
    yield compare_number(
        answer,
        0.9 + 0.1 / 5,
        tol=1e-3,
        hint="(1 - ε) on the right token, plus ε/V spread over all V tokens",
        wrong=[
            (0.9, "the uniform part ε/V goes to every token, the right one included"),
            (0.1 / 5, "that is what each wrong token gets; the question asks for the right one"),
        ],
    )


def _smoothed(targets: Tensor, v: int, eps: float) -> Tensor:
    return (1 - eps) * F.one_hot(targets, v).float() + eps / v  # (N, V)


def check_smoothing(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "label_smoothing_targets(targets, vocab_size, eps)"
    for seed, (n, v, eps) in enumerate([(4, 5, 0.1), (6, 11, 0.2), (3, 7, 0.0)]):
        targets = torch.randint(v, (n,), generator=generator(700 + seed))
        tested = f"targets ({n},), vocab_size={v}, eps={eps}"
        got = call(tested, signature, fn, targets, v, eps)
        one_hot = F.one_hot(targets, v).float()
        paper = (1 - eps) * one_hot + eps / (v - 1) * (1 - one_hot)
        yield compare_tensor(
            tested,
            got,
            _smoothed(targets, v, eps),
            hint="(1 - eps) · one_hot(targets) + eps / V; each row sums to 1",
            wrong=[
                (paper, "spread eps over all V tokens (eps / V each, the right one included), "
                 "as PyTorch's label_smoothing does, not over the V - 1 others"),
                (one_hot + eps / v, "scale the one-hot part by (1 - eps): each row must sum to 1"),
                ((1 - eps) * one_hot, "add the uniform part eps / V to every token"),
            ],
        )  # fmt: skip


def _full(mask: Tensor, size: tuple[int, ...]) -> Tensor | None:
    try:
        return torch.broadcast_to(mask, size)
    except RuntimeError:
        return None


def check_seq2seq_masks(fn: Callable[..., Any]) -> Iterator[CaseResult]:
    signature = "seq2seq_masks(src_lengths, tgt_lengths)"
    for src_lengths, tgt_lengths in [([3, 5], [4, 2]), ([4, 2, 4], [3, 3, 1])]:
        s, t, b = max(src_lengths), max(tgt_lengths), len(src_lengths)
        tested = f"src_lengths={src_lengths}, tgt_lengths={tgt_lengths}"
        got = call(
            tested,
            signature,
            fn,
            list(src_lengths),
            list(tgt_lengths),
            returns=("encoder_mask", "decoder_mask", "cross_mask"),
        )
        src_pad, tgt_pad = masks.padding(src_lengths, s), masks.padding(tgt_lengths, t)
        expected = {
            "encoder_mask": ((b, 1, s, s), src_pad, [
                (masks.causal(s) & src_pad, "the encoder reads the source both ways, no causal"),
            ]),
            "decoder_mask": ((b, 1, t, t), masks.causal(t) & tgt_pad, [
                (tgt_pad, "the decoder's self-attention is causal: join causal(T) with `&`"),
                (masks.causal(t).expand(b, 1, t, t), "also hide the target's padding keys"),
            ]),
            "cross_mask": ((b, 1, t, s), src_pad, [
                (masks.causal(t, s) & src_pad, "cross-attention is not causal: every target "
                 "position may read the whole source"),
            ]),
        }  # fmt: skip
        for index, (what, (size, want, wrong)) in enumerate(expected.items()):
            mask = got[index]
            full = _full(mask, size) if isinstance(mask, Tensor) else None
            if full is None:
                got_shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                yield CaseResult(
                    tested,
                    False,
                    f"the {what} ({got_shape}) does not broadcast to {size}",
                    "shape it (B, 1, 1, S) for padding or (B, 1, T, S) when it differs per query",
                )
                return
            require(
                compare_tensor(
                    tested,
                    full,
                    torch.broadcast_to(want, size),
                    what=f"the {what} (broadcast to {size})",
                    hint="True = may attend; the encoder and the cross-attention hide source "
                    "padding, the decoder is causal and hides target padding",
                    wrong=[(torch.broadcast_to(w, size), h) for w, h in wrong],
                )
            )
        yield CaseResult(tested, True)


EXERCISES = [
    Exercise(
        id="06.1",
        title="Which attention is causal?",
        kind="by hand",
        name="ANSWER",
        statement=(
            "Which of these use a causal mask? "
            + "; ".join(f"{n} {what}" for n, what in CAUSAL_CHOICES.items())
            + ". Write the numbers as a set: `ANSWER = {...}`."
        ),
        check=check_which_causal,
    ),
    Exercise(
        id="06.2",
        title="Label smoothing by hand",
        kind="by hand",
        name="ANSWER",
        statement=(
            "With label smoothing ε = 0.1 over a vocabulary of V = 5 tokens, the target "
            "distribution is (1 - ε)·one-hot + ε/V on every token (PyTorch's and qkv's "
            "convention). What probability does it give the correct token? `ANSWER = ...`."
        ),
        check=check_smoothing_by_hand,
    ),
    Exercise(
        id="06.3",
        title="Label-smoothed targets",
        kind="code",
        name="label_smoothing_targets",
        statement=(
            "Write `label_smoothing_targets(targets, vocab_size, eps)`: targets (N,) int64 "
            "becomes the (N, V) float target distributions (1 - eps)·one_hot + eps/V."
        ),
        check=check_smoothing,
    ),
    Exercise(
        id="06.4",
        title="The three masks of an encoder-decoder",
        kind="code",
        name="seq2seq_masks",
        statement=(
            "Write `seq2seq_masks(src_lengths, tgt_lengths)` for a batch of source and target "
            "sequences padded on the right (lists of B lengths; S and T the longest of each). "
            "Return boolean masks (True = may attend) `(encoder_mask, decoder_mask, "
            "cross_mask)` for the encoder's self-attention, the decoder's self-attention and "
            "the decoder's cross-attention, each broadcastable to (B, 1, queries, keys): "
            "(B, 1, S, S), (B, 1, T, T) and (B, 1, T, S)."
        ),
        check=check_seq2seq_masks,
    ),
]
