"""Tiled exact attention: the reference's result, block by block, never the T x S score matrix.

    m_i = max_j s_ij     l_i = Σ_j exp(s_ij - m_i)     o_i = Σ_j exp(s_ij - m_i) v_j / l_i

Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022
(arXiv:2205.14135); Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023 (arXiv:2307.08691). The online softmax is Milakov and Gimelshein, "Online
normalizer calculation for softmax", 2018 (arXiv:1805.02867).

``reference_attention`` (core.py) forms all T x S scores at once. Here the queries go in blocks of
``block_q`` rows and, for each block, the keys stream past in blocks of ``block_k`` columns. A
running maximum m and a running sum l per query row let each new block rescale what was summed
before it (the *online softmax*), so the result is the reference's, while the largest tensor alive
is one block of scores, (block_q, block_k): memory grows with T + S, not with T x S.

The backward pass keeps no probabilities either. It recomputes each block from the log-sum-exp
L_i = m_i + log l_i saved by the forward (P = exp(S - L)), and uses FlashAttention-2's identity

    dS = P * (dP - D),    D_i = Σ_j P_ij dP_ij = Σ_e dO_ie O_ie,

so D, like L, is one number per query row.

What is reordered, compared with the reference:
    * masks: any boolean mask broadcastable to (..., T, S). A block whose slice of the mask is all
      False is skipped, forward and backward; the same test skips the blocks above a causal
      diagonal, outside a sliding window or past every sequence's padding, whatever the mask kind.
      A query row that sees no key outputs zeros and gets zero gradients, as in the reference.
    * grouped-query attention: registered with ``grouped_kv=True``. Query heads are viewed as
      (K, G), and each key/value block broadcasts over the G query heads that share it. Letting
      the dispatcher repeat k and v would copy them G times and then sum G gradients back.
    * dropout on the attention weights, as the reference applies it (after the softmax, before
      the values). Each block draws its dropout mask from a generator seeded once per call; the
      backward pass visits the blocks in the same order and draws the same masks again.
    * blocks are computed in float32 (float64 for float64 inputs), half precision included.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · G = H / K query heads per key/value head · E head dim (Ev: of the values).
Here "..." stands for the leading dimensions, usually (B,).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from qkv.attention.backends import register_backend

__all__ = ["tiled_attention"]


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[Tensor, None]:
    """Exact attention computed in (block_q, block_k) tiles; must match ``reference_attention``.

    Args:
        q: queries, (..., H, T, E) or (..., T, E).
        k: keys, (..., K, S, E) with H a multiple of K, or (..., S, E).
        v: values, shaped like k with head dim Ev.
        mask: boolean, True = may attend, broadcastable to (..., H, T, S).
        bias: additive scores, broadcastable to (..., H, T, S); it gets gradients.
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        dropout_p: dropout on the attention weights (training only).
        block_q: query rows per tile.
        block_k: key columns per tile.

    Returns:
        The output (..., H, T, Ev) in the dtype of ``v``, and None (no weights are formed).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5  # 1 / sqrt(d_k)
    group = q.shape[-3] // k.shape[-3] if q.dim() >= 4 else 1  # G
    q_g = _split_heads(q, q.dim(), group)  # (..., K, G, T, E)
    k_g, v_g = k.unsqueeze(-3), v.unsqueeze(-3)  # (..., K, 1, S, E), (..., K, 1, S, Ev)
    mask_g = None if mask is None else _split_heads(mask, q.dim(), group)  # (..., K|1, G|1, T, S)
    bias_g = None if bias is None else _split_heads(bias, q.dim(), group)  # (..., K|1, G|1, T, S)
    # The dropout generator's seed comes from torch's global generator: torch.manual_seed decides.
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0.0 else 0
    out = _TiledAttention.apply(
        q_g, k_g, v_g, mask_g, bias_g, scale, dropout_p, seed, block_q, block_k
    )  # (..., K, G, T, Ev)
    return out.reshape(*q.shape[:-1], v.shape[-1]), None  # (..., H, T, Ev)


# --8<-- [start:forward]
def _forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, scale: float,
    dropout_p: float, seed: int, block_q: int, block_k: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Output (..., K, G, T, Ev) and log-sum-exp (..., K, G, T, 1) of q (..., K, G, T, E)."""
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
    t, s, ev = q.shape[-2], k.shape[-2], v.shape[-1]
    out = q.new_empty(*q.shape[:-1], ev, dtype=v.dtype)  # (..., K, G, T, Ev)
    lse = q.new_empty(*q.shape[:-1], 1, dtype=acc)  # (..., K, G, T, 1)
    dropout = _Dropout(dropout_p, seed, q.device)
    for rows in _blocks(t, block_q):
        q_i = q[..., rows, :].to(acc)  # (..., K, G, bq, E)
        row_max = q_i.new_full((*q_i.shape[:-1], 1), float("-inf"))  # (..., K, G, bq, 1) m
        row_sum = q_i.new_zeros(row_max.shape)  # (..., K, G, bq, 1) l = Σ exp(s - m)
        acc_i = q_i.new_zeros(*q_i.shape[:-1], ev)  # (..., K, G, bq, Ev) Σ exp(s - m) v
        for cols in _blocks(s, block_k):
            # 1. This block's scores; None when the mask hides all of it (skip it).
            s_ij = _scores(q_i, k[..., cols, :].to(acc), mask, bias, rows, cols, scale)
            if s_ij is None:
                continue
            # 2. The new running maximum. A row that has seen no visible key yet keeps -inf;
            #    subtracting 0 instead keeps its exponentials at exp(-inf) = 0, not NaN.
            new_max = torch.maximum(row_max, s_ij.amax(-1, keepdim=True))  # (..., K, G, bq, 1)
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # (..., K, G, bq, 1)
            p = torch.exp(s_ij - shift)  # (..., K, G, bq, bk)
            # 3. Rescale what was summed under the old maximum, then add this block.
            alpha = torch.exp(row_max - shift)  # (..., K, G, bq, 1)
            row_sum = alpha * row_sum + p.sum(-1, keepdim=True)  # (..., K, G, bq, 1)
            p = dropout.apply(p)  # (..., K, G, bq, bk) the sum above stays undropped
            acc_i = alpha * acc_i + p @ v[..., cols, :].to(acc)  # (..., K, G, bq, Ev)
            row_max = new_max
        # 4. Divide by the softmax's denominator once, at the end. A row with no visible key has
        #    acc = 0 and l = 0: its output is 0, and its L = +inf makes every P = exp(S - L) zero.
        seen = row_sum > 0  # (..., K, G, bq, 1)
        out[..., rows, :] = (acc_i / row_sum.masked_fill(~seen, 1.0)).to(v.dtype)
        lse[..., rows, :] = torch.where(seen, row_max + row_sum.log(), float("inf"))
    return out, lse


# --8<-- [end:forward]


# --8<-- [start:backward]
def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    out: Tensor, lse: Tensor, scale: float, dropout_p: float, seed: int, block_q: int,
    block_k: int, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Gradients of q, k, v (and bias), recomputing each block's probabilities from ``lse``."""
    acc = lse.dtype
    t, s = q.shape[-2], k.shape[-2]
    # D = rowsum(dO * O): the Σ_j P_ij dP_ij of the softmax's gradient, one number per row.
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (..., K, G, T, 1)
    dq = torch.zeros_like(q, dtype=acc)  # (..., K, G, T, E)
    dk = torch.zeros_like(k, dtype=acc)  # (..., K, 1, S, E)
    dv = torch.zeros_like(v, dtype=acc)  # (..., K, 1, S, Ev)
    dbias = torch.zeros_like(bias, dtype=acc) if bias is not None and bias_grad else None
    dropout = _Dropout(dropout_p, seed, q.device)  # the forward's dropout masks, drawn again
    for rows in _blocks(t, block_q):
        q_i, do_i = q[..., rows, :].to(acc), grad_out[..., rows, :].to(acc)  # (..., K, G, bq, E)
        lse_i, delta_i = lse[..., rows, :], delta[..., rows, :]  # (..., K, G, bq, 1)
        for cols in _blocks(s, block_k):
            k_j, v_j = k[..., cols, :].to(acc), v[..., cols, :].to(acc)  # (..., K, 1, bk, E)
            s_ij = _scores(q_i, k_j, mask, bias, rows, cols, scale)  # (..., K, G, bq, bk)
            if s_ij is None:  # skipped in the forward: it contributed nothing
                continue
            p = torch.exp(s_ij - lse_i)  # (..., K, G, bq, bk) the forward's softmax
            keep = dropout.scale(p.shape)  # (..., K, G, bq, bk) 0 or 1 / (1 - p), or None
            p_kept = p if keep is None else p * keep  # (..., K, G, bq, bk)
            # O = P_kept V: dV = P_kept^T dO, summed over the G query heads sharing a kv head.
            dv[..., cols, :] += (p_kept.transpose(-2, -1) @ do_i).sum_to_size(v_j.shape)
            dp = do_i @ v_j.transpose(-2, -1)  # (..., K, G, bq, bk)
            if keep is not None:
                dp = dp * keep  # through the dropout, back to the softmax's output
            ds = p * (dp - delta_i)  # (..., K, G, bq, bk) gradient of the biased scores
            dq[..., rows, :] += (ds @ k_j) * scale  # (..., K, G, bq, E)
            dk[..., cols, :] += (ds.transpose(-2, -1) @ q_i).sum_to_size(k_j.shape) * scale
            if dbias is not None:
                block = _tile(dbias, rows, cols)  # (..., K|1, G|1, bq|1, bk|1), a view
                block += ds.sum_to_size(block.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# --8<-- [end:backward]


class _TiledAttention(torch.autograd.Function):
    """Tiled forward; backward that recomputes the tiles (FlashAttention-2's algorithm)."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
        scale: float, dropout_p: float, seed: int, block_q: int, block_k: int,
    ) -> Tensor:  # fmt: skip
        out, lse = _forward(q, k, v, mask, bias, scale, dropout_p, seed, block_q, block_k)
        ctx.save_for_backward(q, k, v, mask, bias, out, lse)
        ctx.settings = (scale, dropout_p, seed, block_q, block_k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, bias, out, lse = ctx.saved_tensors
        scale, dropout_p, seed, block_q, block_k = ctx.settings
        dq, dk, dv, dbias = _backward(
            grad_out, q, k, v, mask, bias, out, lse, scale, dropout_p, seed, block_q, block_k,
            bias_grad=ctx.needs_input_grad[4],
        )  # fmt: skip
        return dq, dk, dv, None, dbias, None, None, None, None, None


# --8<-- [start:scores]
def _scores(
    q_i: Tensor, k_j: Tensor, mask: Tensor | None, bias: Tensor | None, rows: slice,
    cols: slice, scale: float,
) -> Tensor | None:  # fmt: skip
    """One block of scaled, biased, masked scores (-inf where hidden); None if all are hidden."""
    visible = None if mask is None else _tile(mask, rows, cols)  # (..., bq|1, bk|1)
    if visible is not None and not visible.any():
        return None
    s_ij = (q_i @ k_j.transpose(-2, -1)) * scale  # (..., K, G, bq, bk)
    if bias is not None:
        s_ij = s_ij + _tile(bias, rows, cols).to(s_ij.dtype)  # (..., K, G, bq, bk)
    if visible is not None:
        s_ij = s_ij.masked_fill(~visible, float("-inf"))  # (..., K, G, bq, bk)
    return s_ij


# --8<-- [end:scores]


class _Dropout:
    """Dropout masks for the blocks, in visiting order, from one seeded generator: the backward
    pass builds another with the same seed and visits the blocks in the same order."""

    def __init__(self, p: float, seed: int, device: torch.device) -> None:
        self.p = p
        self.generator = None
        if p > 0.0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def scale(self, shape: torch.Size) -> Tensor | None:
        """The next block's factors, 0 (dropped) or 1 / (1 - p) (kept); None without dropout."""
        if self.generator is None:
            return None
        device = self.generator.device
        draws = torch.rand(shape, generator=self.generator, device=device)  # (..., bq, bk)
        return (draws >= self.p).float() / (1.0 - self.p)  # (..., bq, bk)

    def apply(self, weights: Tensor) -> Tensor:
        keep = self.scale(weights.shape)
        return weights if keep is None else weights * keep


def _split_heads(x: Tensor, n_dims: int, group: int) -> Tensor:
    """View (..., H, T, X) as (..., K, G, T, X), and (..., T, X) as (..., 1, T, X); a tensor that
    broadcasts over the heads (size 1) gets (..., 1, 1, T, X). ``n_dims`` is q's."""
    x = x.view(*(1,) * (n_dims - x.dim()), *x.shape)  # (..., H|1, T, X)
    if n_dims < 4:
        return x.unsqueeze(-3)  # (..., 1, T, X)
    heads = (x.shape[-3] // group, group) if x.shape[-3] > 1 else (1, 1)
    return x.view(*x.shape[:-3], *heads, *x.shape[-2:])  # (..., K, G, T, X)


def _blocks(n: int, size: int) -> list[slice]:
    """0..n in slices of ``size`` (the last one shorter when ``size`` does not divide n)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _tile(x: Tensor, rows: slice, cols: slice) -> Tensor:
    """The (rows, cols) block of a mask or bias, which may broadcast (size 1) over T or S."""
    return x[
        ..., rows if x.shape[-2] > 1 else slice(None), cols if x.shape[-1] > 1 else slice(None)
    ]


register_backend("tiled", tiled_attention, grouped_kv=True)
