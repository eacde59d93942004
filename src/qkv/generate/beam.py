"""Beam search: keep the num_beams most likely partial sequences instead of one.

Each running beam b has a score, the sum of its tokens' log-probabilities. At every step:

    cand(b, v)  = score_b + log p(v | beam b)                  num_beams x V candidates per row
    keep the top K = 2 num_beams candidates (K = (1 + #stop ids) num_beams with several)
    a candidate ending in a stop token, or reaching max_new_tokens, is finished:
        its final score = cand / length^length_penalty          length = tokens generated
        (only the top num_beams candidates may finish; they join the row's best num_beams)
    the best num_beams unfinished candidates run on; their caches are gathered by
        ``reorder`` (self- and cross-attention), nothing is recomputed

A row is done when it holds num_beams finished hypotheses and, with ``early_stopping=True``,
at once; with ``False``, once the best running beam, scored as if it ended now,
score / generated^length_penalty, can no longer beat the worst finished one; with ``"never"``
(and length_penalty > 0) the best running beam is scored at max_new_tokens instead. The search
ends when every row is done, or at max_new_tokens. The answer is each row's best finished
hypothesis, shorter ones padded.

This reproduces transformers' (5.x) beam search exactly, so that both return the same ids:
the ranking, the -1e9 masks, the length (generated tokens, stop token included; the prompt and
the decoder's start token are not counted) and the stopping rule are the same.
Larger length_penalty favours longer hypotheses; 0 ranks by plain log-probability.

Shape legend: B batch · N = B num_beams rows · K candidates per row · V vocabulary ·
M = max_new_tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.generate.cached import CachedDecoder, CachedEncoderDecoder
from qkv.generate.sampling import repetition_penalty
from qkv.generate.settings import GenerationSettings
from qkv.generate.stopping import StopCondition

__all__ = ["beam_search"]

_NEG = -1.0e9  # the score of a slot that must never win (transformers uses the same value)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j], ...]: pick entries along dim 1 per row; x (B, n, ...), index (B, k)."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)  # (B, k, ...)


def beam_search(
    runner: CachedDecoder | CachedEncoderDecoder, settings: GenerationSettings
) -> Tensor:
    """Beam search over a model with its caches; the best hypothesis of each row.

    One of the few functions over 80 lines, on purpose: it is one loop whose three steps
    (expand, finish, stop) share a dozen running tensors, and page 08 includes those steps
    from here in order; split into functions, each would take and return all of them.

    Args:
        runner: the model, its prompt and caches (``qkv.generate.cached``), not yet prefilled.
        settings: ``num_beams``, ``length_penalty``, ``early_stopping``, ``max_new_tokens``,
            the stop ids/strings and ``pad_token_id`` are read.

    Returns:
        (B, n) long: the new tokens of each row's best hypothesis, n <= max_new_tokens the
        longest of them, shorter ones padded with ``pad_token_id``.
    """
    s = settings
    nb, m, lp, early = s.num_beams, s.max_new_tokens, s.length_penalty, s.early_stopping
    prefix = runner.prefix  # (B, T)
    b, device = prefix.shape[0], prefix.device
    stop = StopCondition(s.stop_token_ids, s.stop_strings, s.tokenizer, device)
    k = max(2, 1 + len(s.stop_token_ids)) * nb
    pad = s.pad_token_id if s.pad_token_id is not None else 0  # only fills unused positions
    seen: Tensor | None = None
    if s.repetition_penalty is not None:
        seen = runner.seen.repeat_interleave(nb, dim=0)  # (N, T)

    # Running beams: their tokens (fixed width M, pad after t), scores; beam 0 alone at first,
    # since all beams start equal.
    running = prefix.new_full((b, nb, m), pad)  # (B, nb, M)
    running_scores = torch.zeros(b, nb, device=device)  # (B, nb)
    running_scores[:, 1:] = _NEG
    # Finished hypotheses: the best nb so far per row.
    done = prefix.new_full((b, nb, m), pad)  # (B, nb, M)
    done_scores = torch.full((b, nb), _NEG, device=device)  # (B, nb)
    done_len = torch.zeros(b, nb, dtype=torch.long, device=device)  # (B, nb)
    is_done = torch.zeros(b, nb, dtype=torch.bool, device=device)  # (B, nb)
    can_improve = torch.ones(b, 1, dtype=torch.bool, device=device)  # (B, 1)
    may_finish = torch.arange(k, device=device) < nb  # (K,): the top nb candidates
    row_offset = torch.arange(b, device=device)[:, None] * nb  # (B, 1)

    logits = runner.prefill()  # (B, V)
    runner.repeat_rows(nb)
    logits = logits.repeat_interleave(nb, dim=0)  # (N, V)
    for t in range(m):  # t tokens generated so far
        if t > 0:
            logits = runner.step(running[:, :, t - 1].reshape(-1))  # (N, V)
        # --8<-- [start:expand]
        log_probs = logits.float().log_softmax(dim=-1)  # (N, V)
        if seen is not None:
            assert s.repetition_penalty is not None
            history = torch.cat([seen, running[:, :, :t].reshape(b * nb, t)], dim=1)  # (N, T + t)
            log_probs = repetition_penalty(log_probs, history, s.repetition_penalty)
        v = log_probs.shape[-1]
        scores = log_probs.view(b, nb, v) + running_scores[:, :, None]  # (B, nb, V)
        cand_scores, flat = torch.topk(scores.view(b, nb * v), k)  # (B, K)
        cand_beam, cand_token = flat // v, flat % v  # (B, K) each
        cand = _gather(running, cand_beam)  # (B, K, M)
        cand[:, :, t] = cand_token

        # Which candidates end here: a stop token or string, or the length limit.
        if t + 1 == m:
            hits = torch.ones(b, k, dtype=torch.bool, device=device)  # (B, K)
        elif stop.active:
            so_far = cand[:, :, : t + 1].reshape(b * k, t + 1) if stop.strings else None
            hits = stop.hits(cand_token.reshape(-1), so_far).view(b, k)  # (B, K)
        else:
            hits = torch.zeros(b, k, dtype=torch.bool, device=device)  # (B, K)

        # The best nb unfinished candidates run on.
        alive_scores = cand_scores + hits.to(torch.float32) * _NEG  # (B, K)
        keep = torch.topk(alive_scores, nb).indices  # (B, nb)
        running = _gather(cand, keep)  # (B, nb, M)
        running_scores = _gather(alive_scores, keep)  # (B, nb)
        source = _gather(cand_beam, keep)  # (B, nb), the beam each one continues
        # --8<-- [end:expand]

        # --8<-- [start:finish]
        # Finished candidates among the top nb join the finished set if they rank in its top nb.
        just_done = hits & may_finish  # (B, K)
        final = cand_scores / ((t + 1) ** lp)  # (B, K), length-penalised
        row_full = is_done.all(dim=-1, keepdim=True) & (early is True)  # (B, 1)
        final += row_full.to(torch.float32) * _NEG
        final += (~can_improve).to(torch.float32) * _NEG
        final += (~just_done).to(torch.float32) * _NEG
        merged_scores = torch.cat([done_scores, final], dim=1)  # (B, nb + K)
        best = torch.topk(merged_scores, nb).indices  # (B, nb)
        done = _gather(torch.cat([done, cand], dim=1), best)  # (B, nb, M)
        done_scores = _gather(merged_scores, best)  # (B, nb)
        new_len = torch.full_like(cand_beam, t + 1)  # (B, K)
        done_len = _gather(torch.cat([done_len, new_len], dim=1), best)  # (B, nb)
        is_done = _gather(torch.cat([is_done, just_done], dim=1), best)  # (B, nb)

        runner.reorder((source + row_offset).reshape(-1))  # (N,): rows of the next step
        # --8<-- [end:finish]

        # --8<-- [start:stop_rule]
        # Can a running beam still beat the worst finished hypothesis?
        length = m if early == "never" and lp > 0.0 else t + 1
        best_running = running_scores[:, :1] / (length**lp)  # (B, 1)
        worst_done = torch.where(
            is_done, done_scores.min(dim=-1, keepdim=True).values, _NEG
        )  # (B, nb)
        can_improve = can_improve & (best_running > worst_done).any(dim=-1, keepdim=True)
        all_full = bool(is_done.all()) and early is True
        if not bool(can_improve.any()) or all_full or bool(hits.all()):
            break
        # --8<-- [end:stop_rule]

    n = int(done_len[:, 0].max())
    return done[:, 0, :n]  # (B, n)
