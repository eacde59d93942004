"""Block-sparse attention: compute only the blocks of scores that a sparse pattern keeps.

    out_i = sum over kept keys j of softmax_j(q_i . k_j / sqrt(E)) v_j

Sparse patterns let each query see few keys: a sliding window, Longformer's window plus global
tokens (Beltagy et al. 2020, arXiv:2004.05150), BigBird's window, global and random blocks
(Zaheer et al. 2020, arXiv:2007.14062); see ``masks.py``. The dense reference still computes all
T x S scores and masks most of them away. Cut queries and keys into blocks of ``block``
positions: a (query block, key block) tile whose mask is all False adds nothing, so skip it.
Memory and time then grow with T x (keys kept per query), not with T x S::

                 key blocks
    query  0 | # # . . . .      #  kept tile: scores computed, then the exact mask applied
    blocks 1 | # # # . . .      .  skipped tile: never computed
           2 | . # # # . .
           3 | . . # # # .      BlockLayout.kv_blocks[i]: the key blocks query block i keeps;
           4 | . . . # # #      BlockLayout.rule(q_pos, k_pos): the mask inside a kept tile
           5 | . . . . # #

Two implementations of one function, both held to ``reference_attention`` with the dense mask:

* ``block_sparse_loop``, plain PyTorch, the one to read: for each query block, gather its kept
  key blocks, compute those scores, mask, softmax, weighted sum. Autograd runs through it.
* ``flex_block_sparse``: ``torch.nn.attention.flex_attention`` under ``torch.compile``, with a
  ``BlockMask`` built straight from the layout (no T x S tensor). Eager flex_attention
  materialises every score (PyTorch warns so), and in torch 2.13 it has no backward on the CPU;
  compiled, it took 6 s to compile and then 6 ms for a forward at T=4096, window 64, B=1, H=2,
  E=32 on a 2-core CPU (eager flex: 1.2 s; the loop: about 0.1 s, 0.3-0.7 s with autograd;
  measured once on a shared machine, no benchmark script yet). So ``impl="auto"`` uses flex
  on CUDA only; ``impl="flex"`` asks for it anywhere (CPU: inference only), and where it cannot
  run (no gradient on the CPU, or the probe on the device fails) the loop runs instead, with a
  logged warning naming both paths.

The backend ``impl="block_sparse"`` takes the usual dense boolean mask (..., T, S) and derives
the layout from it (that mask already costs T x S bytes); to avoid any T x S tensor, build the
layout from the pattern (``BlockLayout.sliding_window``, ``.longformer``, ``.bigbird``) and call
``block_sparse_attention``. A query that sees no key outputs zeros, with zero gradients.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention import masks
from qkv.attention.backends import check_attention_inputs, register_backend, repeat_kv

__all__ = ["BlockLayout", "block_sparse_attention", "block_sparse_loop", "flex_block_sparse"]

logger = logging.getLogger(__name__)

MaskRule = Callable[[Tensor, Tensor], Tensor]
"""Query positions (Tq, 1) and key positions (1, Sk) -> boolean, broadcastable to (..., Tq, Sk)."""


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which tiles of the (T, S) scores to compute, and the exact mask inside them.

    Query block i holds positions [i * block, (i + 1) * block) (the last one may be shorter);
    ``kv_blocks[i]`` lists, in ascending order, the key blocks it keeps; ``rule`` gives the
    element mask at any positions. ``position_only`` says the rule ignores batch and head.
    """

    t: int
    s: int
    block: int
    kv_blocks: tuple[tuple[int, ...], ...]
    rule: MaskRule
    position_only: bool = True

    def __post_init__(self) -> None:
        n_q, n_kv = -(-self.t // self.block), -(-self.s // self.block)
        if len(self.kv_blocks) != n_q:
            raise ValueError(f"kv_blocks has {len(self.kv_blocks)} rows; T={self.t} needs {n_q}")
        if any(j < 0 or j >= n_kv for row in self.kv_blocks for j in row):
            raise ValueError(f"kv_blocks names a key block outside [0, {n_kv})")

    def key_positions(self, i: int, device: torch.device | None = None) -> Tensor:
        """The key positions query block i keeps, (Sk,)."""
        b = self.block
        spans = [torch.arange(j * b, min((j + 1) * b, self.s)) for j in self.kv_blocks[i]]
        return torch.cat(spans).to(device) if spans else torch.zeros(0, dtype=torch.long).to(device)

    def dense_mask(self, device: torch.device | str | None = None) -> Tensor:
        """The mask the layout computes, (..., T, S): for checks at small sizes only."""
        rows = []
        for i in range(len(self.kv_blocks)):
            q_pos = torch.arange(i * self.block, min((i + 1) * self.block, self.t))  # (Tb,)
            k_pos = self.key_positions(i)  # (Sk,)
            allowed = self.rule(q_pos[:, None], k_pos[None, :])  # (..., Tb, Sk)
            row = torch.zeros(*allowed.shape[:-1], self.s, dtype=torch.bool)  # (..., Tb, S)
            rows.append(row.index_copy(-1, k_pos, allowed))
        return torch.cat(rows, dim=-2).to(device)

    # -- layouts from a pattern, without any T x S tensor ---------------------------------------
    @classmethod
    def sliding_window(
        cls, t: int, window: int, block: int = 64, *, causal: bool = True
    ) -> BlockLayout:
        """``masks.sliding_window(t, window, causal=causal)`` in blocks: ``window - 1`` keys
        before each query (and as many after it when ``causal=False``)."""
        _check_sizes(t, block)
        if not 1 <= window <= t:
            raise ValueError(f"window must be between 1 and t={t}, got {window}")
        after = 0 if causal else window - 1

        def rule(q: Tensor, k: Tensor) -> Tensor:
            return (q - k < window) & (k - q <= after)  # (Tq, Sk)

        spans = [(max(0, lo - window + 1), min(t - 1, hi + after)) for lo, hi in _spans(t, block)]
        return cls(t, t, block, _block_ranges(spans, block), rule)

    @classmethod
    def causal(cls, t: int, block: int = 64) -> BlockLayout:
        """``masks.causal(t)`` in blocks: the tiles on and below the diagonal."""
        return cls.sliding_window(t, t, block)

    @classmethod
    def longformer(
        cls, t: int, window: int, global_tokens: Sequence[int] | Tensor, block: int = 64
    ) -> BlockLayout:
        """``masks.longformer(t, window, global_tokens)`` in blocks."""
        _check_sizes(t, block)
        is_global = masks.longformer_globals(t, window, global_tokens)  # (T,)
        half = window // 2

        def rule(q: Tensor, k: Tensor) -> Tensor:
            g = is_global.to(q.device)
            return ((q - k).abs() <= half) | g[q] | g[k]  # (Tq, Sk)

        global_blocks = sorted({int(p) // block for p in is_global.nonzero().flatten()})
        n = -(-t // block)
        rows = []
        for (lo, hi), near in zip(
            _spans(t, block), _block_ranges(_near(t, block, half), block), strict=True
        ):
            sees_all = bool(is_global[lo : hi + 1].any())  # a global query sees every block
            rows.append(tuple(range(n)) if sees_all else tuple(sorted({*near, *global_blocks})))
        return cls(t, t, block, tuple(rows), rule)

    @classmethod
    def bigbird(
        cls,
        t: int,
        block: int,
        window_blocks: int,
        global_blocks: int,
        random_blocks: int,
        seed: int,
    ) -> BlockLayout:
        """``masks.bigbird(...)`` (same arguments): its blocks are the layout's blocks."""
        keeps = masks.bigbird_blocks(t, block, window_blocks, global_blocks, random_blocks, seed)

        def rule(q: Tensor, k: Tensor) -> Tensor:
            return keeps.to(q.device)[q // block, k // block]  # (Tq, Sk)

        rows = tuple(tuple(row.nonzero().flatten().tolist()) for row in keeps)
        return cls(t, t, block, rows, rule)

    @classmethod
    def from_mask(
        cls, mask: Tensor, block: int = 64, *, t: int | None = None, s: int | None = None
    ) -> BlockLayout:
        """The tiles of a dense boolean mask that hold any True (in any batch or head).

        ``mask`` broadcasts to (..., T, S); give ``t`` and ``s`` when its own last two sizes
        are 1 (a padding mask (B, 1, 1, S) has no T).
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor (True = may attend), got {mask!r:.60}")
        t = mask.shape[-2] if t is None else t
        s = mask.shape[-1] if s is None else s
        _check_sizes(t, block)
        full = _expand_ts(mask, t, s)  # (..., T, S), a view
        position_only = all(d == 1 for d in full.shape[:-2])
        if position_only:
            full = full[(0,) * (full.dim() - 2)]  # (T, S), still a view
        rows = []
        for lo, hi in _spans(t, block):
            seen = full[..., lo : hi + 1, :].reshape(-1, s).any(0)  # (S,) any query of the block
            padded = F.pad(seen, (0, -s % block))  # (S rounded up to whole blocks,)
            rows.append(tuple(padded.view(-1, block).any(1).nonzero().flatten().tolist()))

        def rule(q: Tensor, k: Tensor) -> Tensor:
            return full[..., q, k]  # (..., Tq, Sk)

        def position_rule(q: Tensor, k: Tensor) -> Tensor:
            return full[q, k]  # (Tq, Sk); flex_attention's compiler takes no "..." here

        return cls(
            t, s, block, tuple(rows), position_rule if position_only else rule, position_only
        )


def _check_sizes(t: int, block: int) -> None:
    if t < 1 or block < 1:
        raise ValueError(f"t and block must be at least 1, got t={t}, block={block}")


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    """First and last position of each block."""
    return [(lo, min(lo + block, t) - 1) for lo in range(0, t, block)]


def _near(t: int, block: int, half: int) -> list[tuple[int, int]]:
    """For each query block, the key positions within ``half`` of one of its queries."""
    return [(max(0, lo - half), min(t - 1, hi + half)) for lo, hi in _spans(t, block)]


def _block_ranges(spans: list[tuple[int, int]], block: int) -> tuple[tuple[int, ...], ...]:
    """Key position spans -> the key blocks that cover them."""
    return tuple(tuple(range(lo // block, hi // block + 1)) for lo, hi in spans)


def _expand_ts(x: Tensor, t: int, s: int) -> Tensor:
    """A view of a mask or bias broadcastable to (..., T, S) with its last two sizes T and S."""
    while x.dim() < 2:
        x = x.unsqueeze(0)
    return x.expand(*x.shape[:-2], t, s)  # (..., T, S), no copy


# --8<-- [start:loop]
def _block_attention(
    q_b: Tensor,
    k_i: Tensor,
    v_i: Tensor,
    allowed: Tensor,
    scale: float,
    bias_b: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The reference's steps for one query block (..., Tb, E) and its kept keys (..., Sk, E)."""
    # 1-2. Scores of this query block against its kept keys only, scaled in float32.
    scores = q_b @ k_i.transpose(-2, -1)  # (..., Tb, Sk)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    # 3. The bias of the same (query, key) pairs.
    if bias_b is not None:
        scores = scores + bias_b.to(scores.dtype)  # (..., Tb, Sk)
    # 4. Inside a kept tile the exact mask still holds.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)  # (..., Tb, Sk)
    # 5-6. Softmax over the kept keys; masked keys and fully masked rows get zero weight.
    weights = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)  # (..., Tb, Sk)
    # 7. Dropout (training only).
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)  # (..., Tb, Sk)
    # 8. Weighted sum of the kept values.
    return weights.to(v_i.dtype) @ v_i  # (..., Tb, Ev)


def _kept_keys(layout: BlockLayout, i: int, device: torch.device) -> slice | Tensor:
    """The keys query block i keeps: a slice when they are one run of blocks, else positions."""
    kept = layout.kv_blocks[i]
    if kept[-1] - kept[0] + 1 == len(kept):  # one run of blocks: a view, no copy
        return slice(kept[0] * layout.block, min((kept[-1] + 1) * layout.block, layout.s))
    return layout.key_positions(i, device)  # (Sk,)


def _take(x: Tensor, keys: slice | Tensor) -> Tensor:
    """Rows ``keys`` of x (..., S, E): a view for a slice, a copy for positions. (..., Sk, E)."""
    return x[..., keys, :] if isinstance(keys, slice) else x.index_select(-2, keys)


def block_sparse_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention over the kept tiles only, one query block at a time: the version to read.

    Must match ``reference_attention(q, k, v, layout.dense_mask(), bias=bias)``: the same seven
    steps (``_block_attention``), on the keys one query block keeps instead of all S. Autograd
    keeps each block's weights, (..., block, kept keys): memory grows with T x kept keys, not
    T x S (``block_sparse_attention`` recomputes them in the backward instead).

    Args:
        q: queries, (..., T, E).
        k: keys, (..., S, E), as many heads as ``q`` (see ``block_sparse_attention`` for GQA).
        v: values, (..., S, Ev).
        layout: the kept tiles and the mask inside them.
        bias: additive scores, broadcastable to (..., T, S).
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        dropout_p: probability of dropping an attention weight (training only).

    Returns:
        The output (..., T, Ev) in the dtype of ``v``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    full_bias = None if bias is None else _expand_ts(bias, layout.t, layout.s)  # (..., T, S)
    outs = []
    for i, kept in enumerate(layout.kv_blocks):
        lo, hi = i * layout.block, min((i + 1) * layout.block, layout.t)
        if not kept:  # no key in reach: zeros, like the reference's fully masked rows
            outs.append(v.new_zeros(*q.shape[:-2], hi - lo, v.shape[-1]))  # (..., Tb, Ev)
            continue
        q_pos = torch.arange(lo, hi, device=q.device)  # (Tb,)
        k_pos = layout.key_positions(i, q.device)  # (Sk,)
        keys = _kept_keys(layout, i, q.device)
        k_i, v_i = _take(k, keys), _take(v, keys)  # (..., Sk, E), (..., Sk, Ev)
        bias_b = None if full_bias is None else full_bias[..., q_pos[:, None], k_pos[None, :]]
        allowed = layout.rule(q_pos[:, None], k_pos[None, :])  # (..., Tb, Sk)
        outs.append(_block_attention(q[..., lo:hi, :], k_i, v_i, allowed, scale, bias_b, dropout_p))
    return torch.cat(outs, dim=-2)  # (..., T, Ev)


# --8<-- [end:loop]


class _RecomputedBlocks(torch.autograd.Function):
    """``block_sparse_loop`` (no bias, no dropout) keeping only q, k and v for the backward.

    Autograd through the loop keeps every block's weights, T x (kept keys) x H numbers twice
    over (the softmax's output and the masked weights): 2 x 16384 x 320 x 8 float32 = 320 MiB
    for a window of 256 keys in blocks of 64 at T = 16384, 8 heads. Here the backward recomputes
    one block's scores at a time (as FlashAttention does) and adds its gradients into dq, dk, dv
    in place (autograd's slicing would add a zero-filled copy of the whole of q, k or v per
    block). Must match ``block_sparse_loop``, outputs and gradients.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: BlockLayout,
        scale: float | None,
    ) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.layout, ctx.scale = layout, scale  # type: ignore[attr-defined]
        return block_sparse_loop(q, k, v, layout, scale=scale)  # (..., T, Ev)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v = ctx.saved_tensors  # type: ignore[attr-defined]
        layout: BlockLayout = ctx.layout  # type: ignore[attr-defined]
        scale = q.shape[-1] ** -0.5 if ctx.scale is None else ctx.scale  # type: ignore[attr-defined]
        grad_q, grad_k, grad_v = (torch.zeros_like(x) for x in (q, k, v))
        for i, kept in enumerate(layout.kv_blocks):
            if not kept:  # zeros out, zero gradients
                continue
            rows = slice(i * layout.block, min((i + 1) * layout.block, layout.t))
            q_pos = torch.arange(rows.start, rows.stop, device=q.device)  # (Tb,)
            allowed = layout.rule(q_pos[:, None], layout.key_positions(i, q.device)[None, :])
            keys = _kept_keys(layout, i, q.device)
            with torch.enable_grad():
                q_b = q[..., rows, :].detach().requires_grad_()  # (..., Tb, E)
                k_i, v_i = (_take(x, keys).detach().requires_grad_() for x in (k, v))
                out = _block_attention(q_b, k_i, v_i, allowed, scale)  # (..., Tb, Ev)
                d_q, d_k, d_v = torch.autograd.grad(out, (q_b, k_i, v_i), grad_out[..., rows, :])
            grad_q[..., rows, :] = d_q
            if isinstance(keys, slice):
                grad_k[..., keys, :] += d_k
                grad_v[..., keys, :] += d_v
            else:
                grad_k.index_add_(-2, keys, d_k)
                grad_v.index_add_(-2, keys, d_v)
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grads = (
            g if need else None for g, need in zip((grad_q, grad_k, grad_v), needs[:3], strict=True)
        )
        return *grads, None, None


def flex_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float | None = None
) -> Tensor:
    """The same attention through ``flex_attention``'s compiled kernel: q (B, H, T, E) and
    k, v (B, K, S, E). The ``BlockMask`` comes from the layout's block lists (no T x S tensor);
    the kernel skips the other tiles and applies ``layout.rule`` inside the kept ones. Must
    match ``block_sparse_loop``; a query that sees no key gets zeros there too."""
    from torch.nn.attention.flex_attention import BlockMask

    n_kv = -(-layout.s // layout.block)
    counts = torch.tensor([len(row) for row in layout.kv_blocks], dtype=torch.int32)  # (Nq,)
    indices = torch.zeros(len(layout.kv_blocks), n_kv, dtype=torch.int32)  # (Nq, Nkv)
    for i, row in enumerate(layout.kv_blocks):
        indices[i, : len(row)] = torch.tensor(row, dtype=torch.int32)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return layout.rule(q_idx, kv_idx)

    block_mask = BlockMask.from_kv_blocks(
        counts[None, None].to(q.device),  # (1, 1, Nq): one pattern for every batch and head
        indices[None, None].to(q.device),  # (1, 1, Nq, Nkv)
        BLOCK_SIZE=layout.block,
        mask_mod=mask_mod,
        seq_lengths=(layout.t, layout.s),
    )
    grouped = q.shape[-3] != k.shape[-3]
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=grouped)
    assert isinstance(out, Tensor)
    return out  # (B, H, T, Ev)


@functools.cache
def _compiled_flex() -> Callable[..., object]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _flex_failure(device: str, dtype: torch.dtype, block: int) -> str | None:
    """Why flex cannot run here (None if it can): one small check against the loop, once per
    device, dtype and block size."""
    gen = torch.Generator().manual_seed(0)
    t = 2 * block + 3  # a last block shorter than the others
    q, k, v = (torch.randn(1, 2, t, 16, generator=gen).to(device, dtype) for _ in range(3))
    layout = BlockLayout.sliding_window(t, block, block)
    try:
        got = flex_block_sparse(q, k, v, layout)
    except Exception as error:  # any failure to build or compile the kernel means "cannot run"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    want = block_sparse_loop(q, k, v, layout)
    if not torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2):
        return f"its output differs from the loop's by {(got - want).abs().max().item():.2g}"
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    logger.warning(
        "block-sparse attention: flex_attention cannot run (%s); using the blockwise PyTorch "
        "loop (block_sparse_loop) instead",
        reason,
    )


def _flex_or_why_not(q: Tensor, k: Tensor, layout: BlockLayout, grad: bool) -> str | None:
    if q.dim() != 4:
        return f"it needs 4-D (B, H, T, E) inputs, got {q.dim()}-D"
    if not layout.position_only:
        return "the mask differs between batches or heads"
    if grad and q.device.type == "cpu":
        return f"torch {torch.__version__} has no flex_attention backward on the CPU"
    return _flex_failure(str(q.device), q.dtype, layout.block)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    impl: Literal["auto", "loop", "flex"] = "auto",
) -> Tensor:
    """Attention computed on the tiles ``layout`` keeps: never a (T, S) tensor.

    Args:
        q: queries, (..., T, E); (B, H, T, E) with H a multiple of K for grouped-query attention.
        k: keys, (..., S, E) or (B, K, S, E).
        v: values, (..., S, Ev) or (B, K, S, Ev).
        layout: e.g. ``BlockLayout.longformer(T, window=256, global_tokens=[0])``.
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        impl: ``"loop"`` (block_sparse_loop), ``"flex"`` (flex_block_sparse; falls back to the
            loop with a logged warning where it cannot run) or ``"auto"``: flex on CUDA only.

    Returns:
        The output (..., T, Ev), equal to ``reference_attention(q, k, v, layout.dense_mask())``.

    Example:
        >>> q = torch.randn(1, 4, 100, 8)  # (B, H, T, E)
        >>> k = v = torch.randn(1, 2, 100, 8)  # (B, K, S, E)
        >>> layout = BlockLayout.longformer(100, window=8, global_tokens=[0], block=16)
        >>> block_sparse_attention(q, k, v, layout).shape
        torch.Size([1, 4, 100, 8])
    """
    check_attention_inputs(q, k, v)
    if (q.shape[-2], k.shape[-2]) != (layout.t, layout.s):
        raise ValueError(
            f"the layout is for T={layout.t} queries and S={layout.s} keys, but q has "
            f"{q.shape[-2]} and k has {k.shape[-2]}; build the layout for these lengths"
        )
    if impl not in ("auto", "loop", "flex"):
        raise ValueError(f"impl must be 'auto', 'loop' or 'flex', got {impl!r}")
    if impl == "flex" or (impl == "auto" and q.device.type == "cuda"):
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        why_not = _flex_or_why_not(q, k, layout, grad)
        if why_not is None:
            return flex_block_sparse(q, k, v, layout, scale=scale)
        _warn_fallback(why_not)
    n_rep = q.shape[-3] // k.shape[-3] if q.dim() >= 4 else 1
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, E)
    out = _RecomputedBlocks.apply(q, k, v, layout, scale)  # block_sparse_loop, lean backward
    assert isinstance(out, Tensor)
    return out  # (..., T, Ev)


# The block size of the registered backend: 64 positions a tile.
BACKEND_BLOCK = 64


def block_sparse_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
) -> tuple[Tensor, None]:
    """``impl="block_sparse"``: the tiles of the dense ``mask`` (BACKEND_BLOCK positions a side)
    that hold any True, computed by ``block_sparse_attention`` (the loop when there is a bias or
    dropout). Must match ``reference_attention``."""
    t, s = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones((), dtype=torch.bool, device=q.device)  # every tile, no T x S copy
    layout = BlockLayout.from_mask(mask, BACKEND_BLOCK, t=t, s=s)
    if bias is None and dropout_p == 0.0:
        return block_sparse_attention(q, k, v, layout, scale=scale), None
    return block_sparse_loop(q, k, v, layout, bias=bias, scale=scale, dropout_p=dropout_p), None


register_backend("block_sparse", block_sparse_backend)
