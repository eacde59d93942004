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
    * causality (registered with ``causal=True``): with ``is_causal`` the diagonal comes from the
      positions (query i of T sits at S - T + i, bottom-right aligned), never from a (T, S) mask.
      Key blocks past a query block's last position are not visited, and only the blocks the
      diagonal crosses are masked.
    * masks: any boolean mask broadcastable to (..., T, S). A block whose slice of it is all False
      is skipped, forward and backward; one whose slice is all True is not masked. A query row
      that sees no key outputs zeros and gets zero gradients, as in the reference.
    * grouped-query attention: registered with ``grouped_kv=True``. Query heads are viewed as
      (K, G), and each key/value block broadcasts over the G query heads that share it. Letting
      the dispatcher repeat k and v would copy them G times and then sum G gradients back.
    * dropout on the attention weights, as the reference applies it (after the softmax, before
      the values). Each block draws its dropout mask from a generator seeded once per call; the
      backward pass visits the blocks in the same order and draws the same masks again.
    * the scale multiplies q once per query block, not every block of scores; exp(S - m) and
      dS are computed in place, in the memory of the scores.
    * blocks are computed in float32 (float64 for float64 inputs), half precision included.

The default tiles, 128 queries by 256 keys, cost the least CPU time among 64..512 x 128..512 on
a 2-core x86 CPU (float32, causal, B=1, H=8, E=64, T=1024 and 4096, forward and backward); each
tile holds every head at once. A GPU wants other sizes (or ``impl="triton"``).

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · G = H / K query heads per key/value head · E head dim (Ev: of the values).
Here "..." stands for the leading dimensions, usually (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    is_causal: bool = False,
    block_q: int = 128,
    block_k: int = 256,
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
        is_causal: also hide the keys after each query (``masks.causal(T, S)``, joined with
            ``mask``), without building that (T, S) mask.
        block_q: query rows per tile.
        block_k: key columns per tile.

    Returns:
        The output (..., H, T, Ev) in the dtype of ``v``, and None (no weights are formed).
    """
    t, s = q.shape[-2], k.shape[-2]
    if is_causal and t > s:
        raise ValueError(
            f"is_causal needs S >= T (the T queries are the last T of the S positions), "
            f"got T={t}, S={s}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5  # 1 / sqrt(d_k)
    group = q.shape[-3] // k.shape[-3] if q.dim() >= 4 else 1  # G
    q_g = _split_heads(q, q.dim(), group)  # (..., K, G, T, E)
    k_g, v_g = k.unsqueeze(-3), v.unsqueeze(-3)  # (..., K, 1, S, E), (..., K, 1, S, Ev)
    mask_g = None if mask is None else _split_heads(mask, q.dim(), group)  # (..., K|1, G|1, T, S)
    bias_g = None if bias is None else _split_heads(bias, q.dim(), group)  # (..., K|1, G|1, T, S)
    # The dropout generator's seed comes from torch's global generator: torch.manual_seed decides.
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0.0 else 0
    tiles = _Tiles(t, s, block_q, block_k, is_causal, q.device)
    out = _TiledAttention.apply(
        q_g, k_g, v_g, mask_g, bias_g, scale, dropout_p, seed, tiles
    )  # (..., K, G, T, Ev)
    return out.reshape(*q.shape[:-1], v.shape[-1]), None  # (..., H, T, Ev)


# --8<-- [start:forward]
def _forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, scale: float,
    dropout_p: float, seed: int, tiles: _Tiles,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Output (..., K, G, T, Ev) and log-sum-exp (..., K, G, T, 1) of q (..., K, G, T, E), both in
    the accumulation dtype (float32 for half-precision inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 stays float64)
    k, v = k.to(acc), v.to(acc)  # (..., K, 1, S, E) no copy when already in acc
    out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=acc)  # (..., K, G, T, Ev)
    lse = q.new_empty(*q.shape[:-1], 1, dtype=acc)  # (..., K, G, T, 1)
    dropout = _Dropout(dropout_p, seed, q.device)
    for rows in tiles.rows():
        q_i = q[..., rows, :].to(acc) * scale  # (..., K, G, bq, E) scaled once, not per block
        row_max = q_i.new_full((*q_i.shape[:-1], 1), float("-inf"))  # (..., K, G, bq, 1) m
        row_sum = q_i.new_zeros(row_max.shape)  # (..., K, G, bq, 1) l = Σ exp(s - m)
        acc_i = q_i.new_zeros(*q_i.shape[:-1], v.shape[-1])  # (..., K, G, bq, Ev) Σ exp(s - m) v
        for cols in tiles.cols(rows):
            # 1. This block's scores; None when the mask hides all of it (skip it).
            s_ij = _scores(q_i, k[..., cols, :], mask, bias, rows, cols, tiles)
            if s_ij is None:
                continue
            # 2. The new running maximum. A row that has seen no visible key yet keeps -inf;
            #    subtracting 0 instead keeps its exponentials at exp(-inf) = 0, not NaN.
            new_max = torch.maximum(row_max, s_ij.amax(-1, keepdim=True))  # (..., K, G, bq, 1)
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # (..., K, G, bq, 1)
            p = s_ij.sub_(shift).exp_()  # (..., K, G, bq, bk) in the scores' memory
            # 3. Rescale what was summed under the old maximum, then add this block.
            alpha = torch.exp(row_max - shift)  # (..., K, G, bq, 1)
            row_sum.mul_(alpha).add_(p.sum(-1, keepdim=True))  # (..., K, G, bq, 1)
            p = dropout.apply(p)  # (..., K, G, bq, bk) the sum above stays undropped
            acc_i.mul_(alpha).add_(p @ v[..., cols, :])  # (..., K, G, bq, Ev)
            row_max = new_max
        # 4. Divide by the softmax's denominator once, at the end. A row with no visible key has
        #    acc = 0 and l = 0: its output is 0, and its L = +inf makes every P = exp(S - L) zero.
        seen = row_sum > 0  # (..., K, G, bq, 1)
        out[..., rows, :] = acc_i / row_sum.masked_fill(~seen, 1.0)
        lse[..., rows, :] = torch.where(seen, row_max + row_sum.log(), float("inf"))
    return out, lse


# --8<-- [end:forward]


# --8<-- [start:backward]
def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
    out: Tensor, lse: Tensor, scale: float, dropout_p: float, seed: int, tiles: _Tiles,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """Gradients of q, k, v (and bias), recomputing each block's probabilities from ``lse``."""
    acc = lse.dtype
    k, v = k.to(acc), v.to(acc)  # (..., K, 1, S, E) no copy when already in acc
    # D = rowsum(dO * O): the Σ_j P_ij dP_ij of the softmax's gradient, one number per row. O is
    # the forward's unrounded output: from a bfloat16 O, D's rounding error would reach every dS.
    delta = (grad_out.to(acc) * out).sum(-1, keepdim=True)  # (..., K, G, T, 1)
    dq = torch.zeros_like(q, dtype=acc)  # (..., K, G, T, E)
    dk = torch.zeros_like(k)  # (..., K, 1, S, E)
    dv = torch.zeros_like(v)  # (..., K, 1, S, Ev)
    dbias = torch.zeros_like(bias, dtype=acc) if bias is not None and bias_grad else None
    dropout = _Dropout(dropout_p, seed, q.device)  # the forward's dropout masks, drawn again
    for rows in tiles.rows():
        q_i = q[..., rows, :].to(acc) * scale  # (..., K, G, bq, E) as in the forward
        do_i = grad_out[..., rows, :].to(acc)  # (..., K, G, bq, Ev)
        lse_i, delta_i = lse[..., rows, :], delta[..., rows, :]  # (..., K, G, bq, 1)
        for cols in tiles.cols(rows):
            k_j, v_j = k[..., cols, :], v[..., cols, :]  # (..., K, 1, bk, E), (..., K, 1, bk, Ev)
            s_ij = _scores(q_i, k_j, mask, bias, rows, cols, tiles)  # (..., K, G, bq, bk)
            if s_ij is None:  # skipped in the forward: it contributed nothing
                continue
            p = s_ij.sub_(lse_i).exp_()  # (..., K, G, bq, bk) the forward's softmax, in place
            keep = dropout.scale(p.shape)  # (..., K, G, bq, bk) 0 or 1 / (1 - p), or None
            p_kept = p if keep is None else p * keep  # (..., K, G, bq, bk)
            # O = P_kept V: dV = P_kept^T dO, summed over the G query heads sharing a kv head.
            dv[..., cols, :] += (p_kept.transpose(-2, -1) @ do_i).sum_to_size(v_j.shape)
            dp = do_i @ v_j.transpose(-2, -1)  # (..., K, G, bq, bk)
            if keep is not None:
                dp.mul_(keep)  # through the dropout, back to the softmax's output
            ds = dp.sub_(delta_i).mul_(p)  # (..., K, G, bq, bk) dS = P * (dP - D), in place
            # S = (scale q) K^T + bias: dK = dS^T (scale q) holds the scale already; dQ gets it
            # once, after the loop.
            dq[..., rows, :] += ds @ k_j  # (..., K, G, bq, E)
            dk[..., cols, :] += (ds.transpose(-2, -1) @ q_i).sum_to_size(k_j.shape)
            if dbias is not None:
                block = _tile(dbias, rows, cols)  # (..., K|1, G|1, bq|1, bk|1), a view
                block += ds.sum_to_size(block.shape)
    dq.mul_(scale)  # (..., K, G, T, E)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dbias  # q, k, v share one dtype


# --8<-- [end:backward]


class _TiledAttention(torch.autograd.Function):
    """Tiled forward; backward that recomputes the tiles (FlashAttention-2's algorithm)."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
        scale: float, dropout_p: float, seed: int, tiles: _Tiles,
    ) -> Tensor:  # fmt: skip
        out, lse = _forward(q, k, v, mask, bias, scale, dropout_p, seed, tiles)
        ctx.save_for_backward(q, k, v, mask, bias, out, lse)  # out unrounded: float32 or 64
        ctx.settings = (scale, dropout_p, seed, tiles)
        return out.to(q.dtype)  # rounded once, to the inputs' dtype

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, bias, out, lse = ctx.saved_tensors
        scale, dropout_p, seed, tiles = ctx.settings
        dq, dk, dv, dbias = _backward(
            grad_out, q, k, v, mask, bias, out, lse, scale, dropout_p, seed, tiles,
            bias_grad=ctx.needs_input_grad[4],
        )  # fmt: skip
        return dq, dk, dv, None, dbias, None, None, None, None


# --8<-- [start:tiles]
@dataclass(frozen=True)
class _Tiles:
    """Which (rows, cols) tiles there are, and where the causal diagonal crosses them."""

    t: int
    s: int
    block_q: int
    block_k: int
    is_causal: bool
    device: torch.device

    def rows(self) -> list[slice]:
        return _blocks(self.t, self.block_q)

    def cols(self, rows: slice) -> list[slice]:
        """The key blocks these queries may see: all S; if causal, up to the last query's
        position (query i sits at S - T + i, bottom-right aligned, and sees keys j <= S - T + i)."""
        return _blocks(self.s - self.t + rows.stop if self.is_causal else self.s, self.block_k)

    def above_diagonal(self, rows: slice, cols: slice) -> Tensor | None:
        """(bq, bk), True where the key comes after the query; None for a tile with no such key
        (every tile when not causal): only the tiles the diagonal crosses get a mask."""
        if not self.is_causal or cols.stop - 1 <= self.s - self.t + rows.start:
            return None
        first = self.s - self.t + rows.start  # the position of the block's first query
        last = self.s - self.t + rows.stop  # one past its last
        query_pos = torch.arange(first, last, device=self.device)  # (bq,)
        key_pos = torch.arange(cols.start, cols.stop, device=self.device)  # (bk,)
        return key_pos > query_pos.unsqueeze(-1)  # (bq, bk)


# --8<-- [end:tiles]


# --8<-- [start:scores]
def _scores(
    q_i: Tensor, k_j: Tensor, mask: Tensor | None, bias: Tensor | None, rows: slice,
    cols: slice, tiles: _Tiles,
) -> Tensor | None:  # fmt: skip
    """One block of biased, masked scores of the scaled queries (-inf where hidden); None if
    the mask hides all of them. Only a tile that is partly hidden runs a masked_fill."""
    hidden = tiles.above_diagonal(rows, cols)  # (bq, bk) or None
    if mask is not None:
        visible = _tile(mask, rows, cols)  # (..., bq|1, bk|1)
        if not visible.any():
            return None
        if not visible.all():
            hidden = ~visible if hidden is None else hidden | ~visible  # (..., bq, bk)
    s_ij = q_i @ k_j.transpose(-2, -1)  # (..., K, G, bq, bk) q_i carries the scale
    if bias is not None:
        s_ij += _tile(bias, rows, cols)  # (..., K, G, bq, bk)
    if hidden is not None:
        s_ij.masked_fill_(hidden, float("-inf"))  # (..., K, G, bq, bk)
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


register_backend("tiled", tiled_attention, grouped_kv=True, causal=True)
