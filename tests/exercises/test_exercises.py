"""The exercises and their checkers: every reference solution passes, plausible mistakes fail
with the hint aimed at them, and ``qkv exercises`` / ``qkv check`` work end to end.

The reference solutions are the files of tests/exercises/solutions/ (one per exercise, named as
``qkv check`` looks for them in a folder). The wrong answers below are the mistakes learners
make: forgetting the scale, a mask the wrong way round, a missing transpose, an off-by-one in a
position.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from qkv.cli.main import main
from qkv.exercises import EXERCISES, PAGES, check_path, get, page_of
from qkv.exercises.grading import Report, grade
from tests.exercises.test_exercises_later_pages import WRONG as WRONG_LATER_PAGES
from tests.exercises.test_exercises_p13 import WRONG as WRONG_P13

SOLUTIONS = Path(__file__).resolve().parent / "solutions"
ROOT = Path(__file__).resolve().parents[2]


def report_text(report: Report) -> str:
    return "\n".join(f"{c.tested}\n{c.problem}\n{c.hint}" for c in report.cases)


# --- every reference solution passes --------------------------------------------------------


@pytest.mark.parametrize("exercise_id", list(EXERCISES))
def test_reference_solution_passes(exercise_id: str) -> None:
    exercise = EXERCISES[exercise_id]
    _, report = check_path(exercise, SOLUTIONS / exercise.file_name)
    assert report.passed, report_text(report)
    assert len(report.cases) >= 1


def test_every_page_has_three_to_five_exercises() -> None:
    for page in PAGES:
        ids = [i for i, e in EXERCISES.items() if e.page == page]
        assert 3 <= len(ids) <= 5, (page, ids)
        assert ids == [f"{page}.{n}" for n in range(1, len(ids) + 1)]
        kinds = [EXERCISES[i].kind for i in ids]
        assert kinds[0] == "by hand" and "code" in kinds, (page, kinds)
    assert {p.name for p in SOLUTIONS.glob("ex_*.py")} == {e.file_name for e in EXERCISES.values()}


# --- plausible wrong answers fail, with the hint aimed at them -------------------------------


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-2, -1)


def rnn_last_state_only(x: torch.Tensor, w_h: torch.Tensor, w_x: torch.Tensor) -> torch.Tensor:
    h = torch.zeros(w_h.shape[0])
    for x_t in x:
        h = torch.tanh(h @ w_h + x_t @ w_x)
    return h


def rnn_no_recurrence(x: torch.Tensor, w_h: torch.Tensor, w_x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w_x)  # every step at once: no h_{t-1}


def additive_no_tanh(s_prev: Any, h: Any, W: Any, U: Any, v: Any) -> Any:
    weights = torch.softmax(((s_prev @ W.T).unsqueeze(-2) + h @ U.T) @ v, dim=-1)
    return (weights.unsqueeze(-2) @ h).squeeze(-2), weights


def additive_dot_product(s_prev: Any, h: Any, W: Any, U: Any, v: Any) -> Any:
    scores = (h @ s_prev.unsqueeze(-1)).squeeze(-1) * h.shape[-1] ** -0.5
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-2) @ h).squeeze(-2), weights


def embed_no_scale(ids: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return table[ids] + pos[: ids.shape[-1]]


def embed_scale_after_positions(ids: Any, table: Any, pos: Any) -> torch.Tensor:
    return (table[ids] + pos[: ids.shape[-1]]) * table.shape[-1] ** 0.5


def tied_probabilities(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.softmax(h @ table.T, dim=-1)


def tied_scaled(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return h @ table.T / h.shape[-1] ** 0.5


def softmax_unstable(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x) / torch.exp(x).sum(dim=-1, keepdim=True)


def softmax_first_dim(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=0, keepdim=True))
    return e / e.sum(dim=0, keepdim=True)


def attention_no_scale(q: Any, k: Any, v: Any, scale: Any = None) -> Any:
    w = torch.softmax(_scores(q, k), dim=-1)
    return w @ v, w


def attention_no_transpose(q: Any, k: Any, v: Any, scale: Any = None) -> Any:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.softmax(q @ k * scale, dim=-1)
    return w @ v, w


def causal_wrong_way(t: int, s: int | None = None) -> torch.Tensor:
    s = t if s is None else s
    return torch.arange(s)[None, :] >= torch.arange(s - t, s)[:, None]


def causal_top_left(t: int, s: int | None = None) -> torch.Tensor:
    return torch.ones(t, t if s is None else s).tril().bool()


def padding_off_by_one(lengths: list[int], s: int) -> torch.Tensor:
    return (torch.arange(s)[None, :] <= torch.tensor(lengths)[:, None])[:, None, None, :]


def padding_flat(lengths: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]


def masked_attention_neg_inf(q: Any, k: Any, v: Any, mask: Any) -> Any:
    scores = _scores(q, k) * q.shape[-1] ** -0.5
    w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return w @ v, w


def masked_attention_inverted(q: Any, k: Any, v: Any, mask: Any) -> Any:
    scores = _scores(q, k) * q.shape[-1] ** -0.5
    w = torch.softmax(scores.masked_fill(mask, -1e9), dim=-1).masked_fill(mask, 0.0)
    return w @ v, w


def split_without_transpose(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, n_heads, t, d // n_heads)


def merge_without_transpose(x: torch.Tensor) -> torch.Tensor:
    b, h, t, e = x.shape
    return x.reshape(b, t, h * e)


def repeat_kv_tiled(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x.repeat(1, n_rep, 1, 1)


def _angles(n: int, d: int) -> torch.Tensor:
    return torch.arange(n).float()[:, None] / 10000 ** (torch.arange(0, d, 2).float() / d)


def sinusoidal_halves(n_positions: int, d_model: int) -> torch.Tensor:
    a = _angles(n_positions, d_model)
    return torch.cat([a.sin(), a.cos()], dim=-1)


def _rotate(x: torch.Tensor, angles: torch.Tensor, neighbours: bool = False) -> torch.Tensor:
    e = x.shape[-1]
    if neighbours:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : e // 2], x[..., e // 2 :]
    cos, sin = angles.cos(), angles.sin()
    first, second = a * cos - b * sin, b * cos + a * sin
    if neighbours:
        return torch.stack([first, second], dim=-1).flatten(-2)
    return torch.cat([first, second], dim=-1)


def _rope_angles(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    e = x.shape[-1]
    return positions.float()[:, None] * 10000.0 ** (-torch.arange(0, e, 2).float() / e)


def rope_neighbours(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _rotate(x, _rope_angles(x, positions), neighbours=True)


def rope_off_by_one(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return _rotate(x, _rope_angles(x, positions + 1))


def alibi_positive(slopes: torch.Tensor, t: int, s: int) -> torch.Tensor:
    d = (torch.arange(s - t, s)[:, None] - torch.arange(s)[None, :]).abs()
    return slopes[:, None, None] * d


def alibi_top_left(slopes: torch.Tensor, t: int, s: int) -> torch.Tensor:
    d = (torch.arange(t)[:, None] - torch.arange(s)[None, :]).abs()
    return -slopes[:, None, None] * d


def layer_norm_unbiased(x: Any, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def layer_norm_eps_outside(x: Any, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    c = x - x.mean(-1, keepdim=True)
    y = c / (c.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def rms_norm_centred(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    c = x - x.mean(-1, keepdim=True)
    return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu_gate_on_up(x: Any, w_gate: Any, w_up: Any, w_down: Any) -> torch.Tensor:
    return ((x @ w_gate) * F.silu(x @ w_up)) @ w_down


def post_norm_block(x: Any, attn: Any, mlp: Any, attn_norm: Any, mlp_norm: Any) -> Any:
    h = attn_norm(x + attn(x))
    return mlp_norm(h + mlp(h))


def smoothing_paper(targets: torch.Tensor, vocab_size: int, eps: float) -> torch.Tensor:
    one_hot = F.one_hot(targets, vocab_size).float()
    return (1 - eps) * one_hot + eps / (vocab_size - 1) * (1 - one_hot)


def _pad(lengths: list[int], n: int) -> torch.Tensor:
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def seq2seq_causal_cross(src: list[int], tgt: list[int]) -> tuple[Any, Any, Any]:
    s, t = max(src), max(tgt)
    causal = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]  # (T, S)
    dec = torch.ones(t, t).tril().bool() & _pad(tgt, t)
    return _pad(src, s), dec, causal & _pad(src, s)


def seq2seq_causal_encoder(src: list[int], tgt: list[int]) -> tuple[Any, Any, Any]:
    s, t = max(src), max(tgt)
    dec = torch.ones(t, t).tril().bool() & _pad(tgt, t)
    return torch.ones(s, s).tril().bool() & _pad(src, s), dec, _pad(src, s)


def cross_entropy_all_positions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    logits, targets = logits.reshape(-1, v), targets.reshape(-1)
    keep = targets != -100
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    return (nll * keep).sum() / targets.numel()


def cross_entropy_naive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]
    logits, targets = logits.reshape(-1, v), targets.reshape(-1)
    keep = targets != -100
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    return -probs[keep].gather(-1, targets[keep][:, None]).log().mean()


def warmup_from_zero(step: int, *, peak: float, warmup_steps: int, **kw: Any) -> float:
    if step < warmup_steps:
        return peak * step / warmup_steps
    p = min((step - warmup_steps) / (kw["max_steps"] - warmup_steps), 1.0)
    return peak * (kw["min_lr_ratio"] + (1 - kw["min_lr_ratio"]) * (1 + math.cos(math.pi * p)) / 2)


def warmup_unclipped(step: int, *, peak: float, warmup_steps: int, **kw: Any) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    p = (step - warmup_steps) / (kw["max_steps"] - warmup_steps)
    return peak * (kw["min_lr_ratio"] + (1 - kw["min_lr_ratio"]) * (1 + math.cos(math.pi * p)) / 2)


HP = ("lr", "beta1", "beta2", "eps", "weight_decay")


def adam_l2(param: Any, m: Any, v: Any, grad: Any, step: int, **hp: float) -> Any:
    lr, beta1, beta2, eps, weight_decay = (hp[k] for k in HP)
    grad = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return param - lr * m_hat / (v_hat.sqrt() + eps), m, v


def adamw_no_bias_correction(param: Any, m: Any, v: Any, grad: Any, step: int, **hp: float) -> Any:
    lr, beta1, beta2, eps, weight_decay = (hp[k] for k in HP)
    param = param - lr * weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    return param - lr * m / (v.sqrt() + eps), m, v


def top_k_zero_fill(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, 0.0)


def top_k_one_more(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k + 1, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_drops_crossing(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop = sorted_logits.softmax(-1).cumsum(-1) >= p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _cached(q: Any, k: Any, v: Any, mask: torch.Tensor) -> Any:
    scores = _scores(q, k) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def cached_top_left(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any) -> Any:
    k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
    mask = torch.ones(q.shape[-2], k.shape[-2]).tril().bool()
    return _cached(q, k, v, mask), k, v


def cached_new_first(q: Any, k_new: Any, v_new: Any, k_cache: Any, v_cache: Any) -> Any:
    k, v = torch.cat([k_new, k_cache], -2), torch.cat([v_new, v_cache], -2)
    t, s = q.shape[-2], k.shape[-2]
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    return _cached(q, k, v, mask), k, v


def _distance(t: int, s: int | None, *, top_left: bool = False) -> torch.Tensor:
    s = t if s is None else s
    query_pos = torch.arange(t) if top_left else torch.arange(s - t, s)
    return query_pos[:, None] - torch.arange(s)[None, :]  # (T, S): the distance


def window_off_by_one(t: int, window: int, s: int | None = None) -> torch.Tensor:
    distance = _distance(t, s)
    return (distance >= 0) & (distance <= window)


def window_not_causal(t: int, window: int, s: int | None = None) -> torch.Tensor:
    return _distance(t, s).abs() < window


def window_top_left(t: int, window: int, s: int | None = None) -> torch.Tensor:
    distance = _distance(t, s, top_left=True)
    return (distance >= 0) & (distance < window)


def _online(q: Any, k: Any, v: Any, block: int, *, rescale: bool, stable: bool) -> Any:
    scores = _scores(q, k) * q.shape[-1] ** -0.5
    m = torch.full(q.shape[:-1], float("-inf") if stable else 0.0)
    total, acc = torch.zeros(q.shape[:-1]), torch.zeros(*q.shape[:-1], v.shape[-1])
    for start in range(0, k.shape[-2], block):
        s_j, v_j = scores[..., start : start + block], v[..., start : start + block, :]
        new_m = torch.maximum(m, s_j.amax(-1)) if stable else m
        alpha = torch.exp(m - new_m) if rescale else torch.ones_like(m)
        p = torch.exp(s_j - new_m[..., None])
        total, acc, m = alpha * total + p.sum(-1), alpha[..., None] * acc + p @ v_j, new_m
    return acc / total[..., None], m + total.log()


def online_no_rescale(q: Any, k: Any, v: Any, block_size: int) -> Any:
    return _online(q, k, v, block_size, rescale=False, stable=True)


def online_overflows(q: Any, k: Any, v: Any, block_size: int) -> Any:
    return _online(q, k, v, block_size, rescale=True, stable=False)  # exp of raw scores


def online_lse_without_max(q: Any, k: Any, v: Any, block_size: int) -> Any:
    out, lse = _online(q, k, v, block_size, rescale=True, stable=True)
    return out, lse - (_scores(q, k) * q.shape[-1] ** -0.5).amax(-1)


def _linear(phi_q: Any, phi_k: Any, v: Any, mask: torch.Tensor, normalise: bool = True) -> Any:
    sim = _scores(phi_q, phi_k).masked_fill(~mask, 0.0)
    return (sim / sim.sum(-1, keepdim=True) if normalise else sim) @ v


def linear_not_causal(phi_q: Any, phi_k: Any, v: Any) -> Any:
    t = phi_q.shape[-2]
    return _linear(phi_q, phi_k, v, torch.ones(t, t, dtype=torch.bool))


def linear_excludes_itself(phi_q: Any, phi_k: Any, v: Any) -> Any:
    t = phi_q.shape[-2]
    return _linear(phi_q, phi_k, v, torch.ones(t, t, dtype=torch.bool).tril(-1))  # 0/0 at t=0


def linear_no_normaliser(phi_q: Any, phi_k: Any, v: Any) -> Any:
    t = phi_q.shape[-2]
    return _linear(phi_q, phi_k, v, torch.ones(t, t, dtype=torch.bool).tril(), normalise=False)


def entropy_naive(weights: torch.Tensor) -> torch.Tensor:
    return -(weights * weights.log()).sum(-1).mean(-1)


def entropy_counts_empty_rows(weights: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(weights, weights).sum(-1).mean(-1)


def _rollout(weights: torch.Tensor, reverse: bool, residual: bool) -> torch.Tensor:
    t = weights.shape[-1]
    out = torch.eye(t)
    for layer in weights:
        mixed = layer.mean(0) + (torch.eye(t) if residual else 0)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        out = out @ mixed if reverse else mixed @ out
    return out


def rollout_reversed(weights: torch.Tensor) -> torch.Tensor:
    return _rollout(weights, reverse=True, residual=True)


def rollout_no_residual(weights: torch.Tensor) -> torch.Tensor:
    return _rollout(weights, reverse=False, residual=False)


# (exercise, wrong answer, a phrase its hint must contain)
WRONG: list[tuple[str, Any, str]] = [
    ("00.1", 16, "each float32 score takes 4 bytes"),
    ("00.1", 4096 * 4096 * 4 / 1e6, "not a million"),
    ("00.2", math.exp(2) / (2 * math.exp(2) + 1), "the tanh goes on each entry"),
    ("00.2", 1 / (math.e + 1 / math.e + 1), "dot-product score"),
    ("00.3", rnn_last_state_only, "return every state"),
    ("00.3", rnn_no_recurrence, "needs the one before it"),
    ("00.4", additive_no_tanh, "the tanh goes on"),
    ("00.4", additive_dot_product, "scaled dot product"),
    ("00b.1", 11, "counts the tokens"),
    ("00b.2", 2 * 32_000 * 4_096, "both matrices"),
    ("00b.3", embed_no_scale, "multiply the token embeddings by sqrt(D)"),
    ("00b.3", embed_scale_after_positions, "scale only the token embeddings"),
    ("00b.4", tied_probabilities, "before any softmax"),
    ("00b.4", tied_scaled, "no 1/sqrt(D) scale"),
    ("01.1", 1 / (1 + math.exp(-3.0)), "without the scale"),
    ("01.1", 1 / (1 + math.exp(-0.75)), "you divided by d_k"),
    ("01.2", 256, "square root"),
    ("01.3", softmax_unstable, "subtract each row's maximum"),
    ("01.3", softmax_first_dim, "first dimension"),
    ("01.4", attention_no_scale, "without the 1/sqrt(d_k) scale"),
    ("01.4", attention_no_transpose, "without the transpose"),
    ("02.1", 21, "causal mask alone"),
    ("02.1", 27, "`&` (both allow)"),
    ("02.2", causal_wrong_way, "wrong way round"),
    ("02.2", causal_top_left, "align bottom-right"),
    ("02.3", padding_off_by_one, "off by one"),
    ("02.3", padding_flat, "(B, 1, 1, S)"),
    ("02.4", masked_attention_neg_inf, "finfo"),
    ("02.4", masked_attention_inverted, "True means *may attend*"),
    ("03.1", 4 * 262144, "query heads"),
    ("03.1", 131072, "keys *and* values"),
    ("03.2", split_without_transpose, "mixes positions and heads"),
    ("03.3", merge_without_transpose, ".transpose(1, 2) first"),
    ("03.4", repeat_kv_tiled, "tiled the whole block"),
    ("04.1", math.sin(2.0), "odd columns hold cosines"),
    ("04.2", sinusoidal_halves, "interleave"),
    ("04.3", rope_neighbours, "rotate-half"),
    ("04.3", rope_off_by_one, "off by one"),
    ("04.4", alibi_positive, "penalty"),
    ("04.4", alibi_top_left, "last T positions"),
    ("05.1", 3 / math.sqrt(14 / 3), "not D - 1"),
    ("05.1", 6 / math.sqrt(12.5), "that is RMSNorm"),
    ("05.2", layer_norm_unbiased, "biased variance"),
    ("05.2", layer_norm_eps_outside, "inside the square root"),
    ("05.3", rms_norm_centred, "that is LayerNorm"),
    ("05.4", swiglu_gate_on_up, "the activation goes on the gate"),
    ("05.5", post_norm_block, "post-norm"),
    ("06.1", {2, 4, 5}, "5 is not causal"),
    ("06.1", {2}, "4 is causal"),
    ("06.2", 0.9, "the right one included"),
    ("06.3", smoothing_paper, "V - 1"),
    ("06.4", seq2seq_causal_cross, "cross-attention is not causal"),
    ("06.4", seq2seq_causal_encoder, "both ways"),
    ("07.1", 3e-4 * (1 + math.cos(math.pi / 4)) / 2, "floor"),
    ("07.2", cross_entropy_all_positions, "number of targets that count"),
    ("07.2", cross_entropy_naive, "logsumexp"),
    ("07.3", warmup_from_zero, "step 0 must not"),
    ("07.3", warmup_unclipped, "clip p to 1"),
    ("07.4", adam_l2, "Adam with L2"),
    ("07.4", adamw_no_bias_correction, "bias correction"),
    ("08.1", 2, "has not reached"),
    ("08.2", top_k_zero_fill, "-inf"),
    ("08.2", top_k_one_more, "off by one"),
    ("08.3", top_p_drops_crossing, "takes the total past p"),
    ("08.4", cached_top_left, "off by P"),
    ("08.4", cached_new_first, "earlier positions"),
    ("09.1", math.exp(-1) + 1 + 1 + math.exp(-4), "multiply it by α"),
    ("09.1", math.exp(-1) + 1 + math.exp(2) + math.exp(-2), "relative to the new maximum"),
    ("09.2", 320, "not the H = 64 query heads"),
    ("09.2", 20, "a key *and* a value"),
    ("09.3", window_off_by_one, "off by one"),
    ("09.3", window_not_causal, "no key after the query"),
    ("09.3", window_top_left, "align bottom-right"),
    ("09.4", online_no_rescale, "multiply ℓ and acc by α"),
    ("09.4", online_overflows, "subtract the running maximum"),
    ("09.4", online_lse_without_max, "add the final maximum"),
    ("09.5", linear_not_causal, "only keys 0 .. t"),
    ("09.5", linear_excludes_itself, "key t itself"),
    ("09.5", linear_no_normaliser, "divide by the normaliser"),
    ("10.1", 1.5, "bits"),
    ("10.2", entropy_naive, "0·log 0"),
    ("10.2", entropy_counts_empty_rows, "leave out queries"),
    ("10.3", rollout_reversed, "other order"),
    ("10.3", rollout_no_residual, "identity"),
    *WRONG_LATER_PAGES,  # pages 11, 12, 14 and 15
    *WRONG_P13,  # page 13
]


def _label(item: tuple[str, Any, str]) -> str:
    exercise_id, answer, _ = item
    return f"{exercise_id}-{getattr(answer, '__name__', repr(answer))}"


@pytest.mark.parametrize(("exercise_id", "answer", "phrase"), WRONG, ids=map(_label, WRONG))
def test_wrong_answer_fails_with_its_hint(exercise_id: str, answer: Any, phrase: str) -> None:
    report = grade(get(exercise_id), answer)
    assert not report.passed
    failed = report.cases[-1]
    assert phrase in failed.hint, report_text(report)
    assert failed.tested and failed.problem


def test_every_exercise_has_a_wrong_answer() -> None:
    assert {w[0] for w in WRONG} == set(EXERCISES)


def _solution_code_lines(exercise_id: str) -> list[str]:
    """The code lines of a reference solution worth hiding (comments and short lines left out)."""
    text = (SOLUTIONS / EXERCISES[exercise_id].file_name).read_text(encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [line for line in lines if len(line) >= 20 and not line.startswith(("def ", "import"))]


@pytest.mark.parametrize(("exercise_id", "answer", "phrase"), WRONG, ids=map(_label, WRONG))
def test_checker_output_never_shows_the_solution(
    exercise_id: str, answer: Any, phrase: str
) -> None:
    text = report_text(grade(get(exercise_id), answer))
    for line in _solution_code_lines(exercise_id):
        assert line not in text, f"{exercise_id}: the output shows the solution line {line!r}"
    if EXERCISES[exercise_id].kind == "by hand" and exercise_id != "06.1":
        namespace: dict[str, Any] = {}
        exec((SOLUTIONS / EXERCISES[exercise_id].file_name).read_text(), namespace)
        want = float(namespace["ANSWER"])
        for shown in (f"{want:g}", f"{want:.3f}", f"{want:.2f}"):
            assert not re.search(rf"(?<![\d.]){re.escape(shown)}(?!\d)", text), (shown, text)


# --- the command line, end to end ------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exercises_lists_every_id(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "exercises")
    assert code == 0
    for exercise_id, exercise in EXERCISES.items():
        assert f"{exercise_id}  " in out and exercise.title in out


def test_exercises_of_a_page_and_of_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "exercises", "4")
    assert code == 0 and "04.3" in out and "qkv check 04.3 ex_04_3.py" in out
    assert "01.1" not in out
    code, out, _ = run(capsys, "exercises", "01.4")
    assert code == 0 and "def attention(...)" in out
    code, _, err = run(capsys, "exercises", "99")
    assert code == 2 and "no exercises" in err
    code, _, err = run(capsys, "exercises", "01.9")
    assert code == 2 and "no exercise '01.9'" in err


def test_check_passes_a_solution(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "01.4", str(SOLUTIONS / "ex_01_4.py"))
    assert code == 0, out
    assert out.count("  pass  ") == 3 and "passed: all 3 cases." in out


def test_page_ids_with_a_letter(capsys: pytest.CaptureFixture[str]) -> None:
    """Page 0b sits between 0 and 1: "0b" and "00b" name it as "1" and "01" name page 01."""
    assert page_of("1") == page_of("01") == "01"
    assert page_of("0b") == page_of("00b") == "00b"
    assert page_of("b") is None and page_of("13b") is None
    assert get("0b.2") is get("00b.2") and get("1.3") is get("01.3")
    code, out, _ = run(capsys, "exercises", "0b")
    assert code == 0 and "qkv check 00b.3 ex_00b_3.py" in out and "00.1" not in out
    code, out, _ = run(capsys, "check", "00b.4", str(SOLUTIONS))
    assert code == 0 and "ex_00b_4.py" in out


def test_check_a_folder_finds_the_file_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "2.2", str(SOLUTIONS))  # "2.2" is "02.2"
    assert code == 0 and "ex_02_2.py" in out


def test_check_fails_a_wrong_answer_with_a_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "mine.py"
    file.write_text(
        "import torch\n\n\ndef attention(q, k, v, scale=None):\n"
        "    w = torch.softmax(q @ k.transpose(-2, -1), dim=-1)\n    return w @ v, w\n"
    )
    code, out, _ = run(capsys, "check", "01.4", str(file))
    assert code == 1
    assert "FAIL  q (2, 3, 4, 8)" in out and "max |error|" in out
    assert "hint: your weights equal attention without the 1/sqrt(d_k) scale" in out
    assert "not passed yet" in out


def test_check_by_hand_answer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "ex_08_1.py").write_text("ANSWER = 4\n")
    code, out, _ = run(capsys, "check", "08.1", str(tmp_path))
    assert code == 1 and "already reaches 0.7" in out
    (tmp_path / "ex_08_1.py").write_text("ANSWER = 3\n")
    code, out, _ = run(capsys, "check", "08.1", str(tmp_path))
    assert code == 0
    (tmp_path / "ex_08_1.py").write_text("ANSWER = 'three'\n")
    code, out, _ = run(capsys, "check", "08.1", str(tmp_path))
    assert code == 1 and "write a number" in out


def test_check_a_folder_finds_the_file_defining_the_function(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "notes.py").write_text("X = 1\n")
    (tmp_path / "work.py").write_text(
        "def repeat_kv(x, n_rep):\n    return x.repeat_interleave(n_rep, dim=1)\n"
    )
    code, out, _ = run(capsys, "check", "03.4", str(tmp_path))
    assert code == 0 and "work.py" in out
    (tmp_path / "again.py").write_text("def repeat_kv(x, n_rep):\n    return x\n")
    code, _, err = run(capsys, "check", "03.4", str(tmp_path))
    assert code == 1 and "several files" in err and "again.py" in err


def test_check_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check", "01.7", str(tmp_path))
    assert code == 2 and "no exercise '01.7'" in err and "01.4" in err
    code, _, err = run(capsys, "check", "01.4", str(tmp_path / "missing.py"))
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "check", "01.4", str(tmp_path))
    assert code == 1 and "no .py file defining `attention`" in err

    other = tmp_path / "other.py"
    other.write_text("def something_else():\n    pass\n")
    code, _, err = run(capsys, "check", "01.4", str(other))
    assert code == 1 and "does not define attention" in err

    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nSCALE = 1 / 0  # the learner's own bug\n")
    code, _, err = run(capsys, "check", "01.4", str(broken))
    assert code == 1 and "raised an error while being imported" in err
    assert "ZeroDivisionError" in err and "SCALE = 1 / 0" in err
    assert "importlib" not in err and "grading.py" not in err

    not_a_function = tmp_path / "value.py"
    not_a_function.write_text("attention = 3\n")
    code, out, _ = run(capsys, "check", "01.4", str(not_a_function))
    assert code == 1 and "not a function" in out


def test_an_error_in_the_learners_function_shows_their_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "ex_02_2.py"
    file.write_text("def causal_mask(t, s=None):\n    return undefined_name\n")
    code, out, _ = run(capsys, "check", "02.2", str(file))
    assert code == 1
    assert "NameError" in out and "return undefined_name" in out
    assert "grading.py" not in out and "p02_masks.py" not in out


def test_the_softmax_exercise_switches_torch_softmax_off(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "ex_01_3.py"
    file.write_text("import torch\n\n\ndef softmax(x):\n    return torch.softmax(x, dim=-1)\n")
    code, out, _ = run(capsys, "check", "01.3", str(file))
    assert code == 1 and "write softmax yourself" in out
    assert torch.softmax(torch.zeros(2), dim=-1).tolist() == [0.5, 0.5]  # restored afterwards


def test_every_page_lists_its_exercises_and_questions() -> None:
    for page, path in PAGES.items():
        assert Path(path).name.startswith(f"{page}-"), (page, path)
        text = (ROOT / path).read_text(encoding="utf-8")
        assert "## Exercises" in text and "## Check your understanding" in text, path
        section = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
        for exercise_id, exercise in EXERCISES.items():
            if exercise.page == page:
                assert f"qkv check {exercise_id} {exercise.file_name}" in section, (
                    path,
                    exercise_id,
                )
        questions = text.split("## Check your understanding", 1)[1]
        assert 2 <= questions.count('??? question "') <= 3, path
