"""FlashAttention as Triton kernels: the tiled algorithm of ``tiled.py``, one GPU program per tile.

    O = softmax(Q K^T * scale, masked) V,    L = logsumexp(Q K^T * scale, masked) per query row

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023
(arXiv:2307.08691). Triton: Tillet, Kung and Cox, "Triton: an intermediate language and compiler
for tiled neural network computations", MAPL 2019.

Read ``tiled.py`` first: it is the same loop in PyTorch. What changes here is who runs it. A
Triton kernel is the body of one *program*; the launch grid starts one program per tile of the
output, and the GPU runs them in parallel. Inside a program, ``tl.load`` brings a block of a
tensor from global memory into registers or shared memory, ``tl.dot`` multiplies two blocks on the
tensor cores, and ``tl.store`` writes a block back. The (T, S) scores only ever exist as one
(BLOCK_M, BLOCK_N) block inside one program.

Three kernels, as in FlashAttention-2:
    ``_forward_kernel``  one program per (query block, batch x head): the online softmax over
                         the key blocks; writes O and the log-sum-exp L.
    ``_dkdv_kernel``     one program per (key block, batch x key/value head): walks over the
                         query blocks of every query head sharing that key/value head (GQA) and
                         sums dK, dV in registers, so no two programs write the same rows.
    ``_dq_kernel``       one program per (query block, batch x head): walks over the key
                         blocks and sums dQ.
Both backward kernels recompute P = exp(S - L) and use dS = P * (dP - D), D = rowsum(dO * O).

What the kernels accept (anything else raises a ValueError that points to ``impl="tiled"``):
    * masks they can recognise cheaply and rebuild from a few numbers inside the kernel: none,
      causal (bottom-right aligned, as ``masks.causal``), key padding (one row of S booleans per
      batch entry, any pattern: right or left padding), and causal & key padding;
    * no additive bias and no dropout;
    * float32, float16 and bfloat16 (float32 products are computed in full float32, no TF32).

Triton is optional: this module imports it only when the backend first runs, and registers
``"triton"`` only where it is installed. Without a GPU, Triton's interpreter runs the kernels on
the CPU (slowly, for tests and learning): set TRITON_INTERPRET=1 before anything imports Triton.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · G = H / K query heads per key/value head · E head dim (Ev: of the values).
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from qkv.attention import masks
from qkv.attention.backends import register_backend, register_unavailable

__all__ = ["kernel_mask", "triton_attention"]

# triton.language, bound by ``_kernels()`` when the backend first runs: the kernels below are plain
# functions until then, so that importing qkv neither needs nor imports Triton.
tl: Any = None

_INSTALL = "pip install 'qkv[gpu]' (or pip install triton)"


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, None]:
    """FlashAttention in Triton kernels; must match ``reference_attention``.

    Args:
        q: queries, (..., H, T, E) or (..., T, E).
        k: keys, (..., K, S, E) with H a multiple of K, or (..., S, E).
        v: values, shaped like k with head dim Ev.
        mask: None, causal, key padding or both (see ``kernel_mask``).
        bias: must be None (use impl="tiled" for an additive bias).
        scale: multiplies the scores; defaults to 1 / sqrt(E).
        dropout_p: must be 0 (use impl="tiled" for dropout).
        block_m: query rows per program (default 64 on a GPU, 16 in the interpreter).
        block_n: key columns per loop step (the same defaults).

    Returns:
        The output (..., H, T, Ev) in the dtype of ``v``, and None (no weights are formed).
    """
    if bias is not None:
        raise ValueError("impl='triton' takes no additive bias; use impl='tiled', which does")
    if dropout_p > 0.0:
        raise ValueError("impl='triton' has no dropout; use impl='tiled', which has")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"impl='triton' runs float32, float16 and bfloat16, got {q.dtype}")
    causal, keep = kernel_mask(mask, q.shape, k.shape[-2])  # keep: (N, S) or None
    kernels = _kernels_for(q.device)
    if kernels.interpreted and q.dtype == torch.bfloat16:
        raise TypeError(
            "Triton's interpreter multiplies bfloat16 blocks wrongly (triton-lang/triton#11584): "
            "run bfloat16 on a GPU, or float16/float32 in the interpreter"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5  # 1 / sqrt(d_k)
    # Every input becomes (N, heads, positions, features), N = all batch dimensions together, and
    # contiguous, so that a kernel finds x[n, h, t, e] at ((n * heads + h) * positions + t) * E + e.
    heads_dim = q.dim() >= 4
    t, s, e, ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    h, n_kv = (q.shape[-3], k.shape[-3]) if heads_dim else (1, 1)
    q4 = q.reshape(-1, h, t, e).contiguous()  # (N, H, T, E)
    k4 = k.reshape(-1, n_kv, s, e).contiguous()  # (N, K, S, E)
    v4 = v.reshape(-1, n_kv, s, ev).contiguous()  # (N, K, S, Ev)
    interpreted = kernels.interpreted
    block_m = block_m or (16 if interpreted else 64)
    block_n = block_n or (16 if interpreted else 64)
    out = _FlashAttention.apply(q4, k4, v4, keep, causal, scale, block_m, block_n, kernels)
    return out.reshape(*q.shape[:-1], ev), None  # (..., H, T, Ev)


def kernel_mask(mask: Tensor | None, q_shape: torch.Size, s: int) -> tuple[bool, Tensor | None]:
    """The mask as the kernels take it: (causal?, per-batch key padding (N, S) or None).

    Accepted: None; the causal mask (bottom-right aligned, ``masks.causal(T, S)``); a key padding
    mask that is the same for every head and every query, such as ``masks.padding`` (B, 1, 1, S),
    whatever its pattern; and the two combined with ``&``. The check compares the mask with the
    one rebuilt from these pieces, which costs one pass over the mask and no kernel launch.

    Raises:
        ValueError: for any other mask (per head, sliding window, random, rows that hide keys a
            causal mask would show), naming impl="tiled", which takes every mask.
    """
    if mask is None:
        return False, None
    n_dims, t = len(q_shape), q_shape[-2]
    m = mask.view(*(1,) * (n_dims - mask.dim()), *mask.shape)  # (..., H|1, T|1, S|1)
    unsupported = ValueError(
        f"impl='triton' takes no mask, a causal mask, a key padding mask or both; this mask of "
        f"shape {tuple(mask.shape)} is another kind: use impl='tiled', which takes any mask"
    )
    if n_dims >= 4 and m.shape[-3] != 1:
        raise unsupported  # one mask per head
    # Under a causal mask the last query sees every key, so the last row is the padding alone.
    keys = m[..., -1:, :]  # (..., 1, 1, S|1) or (..., 1, S|1)
    if m.shape[-2] == 1 or bool((m == keys).all()):
        causal = False  # every query sees the same keys
    elif t <= s and bool((m == (masks.causal(t, s, device=m.device) & keys)).all()):
        causal = True
    else:
        raise unsupported
    batch = q_shape[:-3] if n_dims >= 4 else q_shape[:-2]
    keep = keys.reshape(*keys.shape[: -3 if n_dims >= 4 else -2], keys.shape[-1])  # (..., S|1)
    if bool(keep.all()):
        return causal, None
    return causal, keep.expand(*batch, s).reshape(-1, s).to(torch.int8).contiguous()  # (N, S)


class _FlashAttention(torch.autograd.Function):
    """Forward and backward through the three kernels; q (N, H, T, E), k and v (N, K, S, E)."""

    # --8<-- [start:launch]
    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, causal: bool,
        scale: float, block_m: int, block_n: int, kernels: SimpleNamespace,
    ) -> Tensor:  # fmt: skip
        n, h, t, e = q.shape
        n_kv, s, ev = k.shape[1], k.shape[2], v.shape[3]
        # Key padding as the kernels read it: a row of S flags per sequence (any tensor stands in
        # when there is none: HAS_KEEP=False never reads it), and one past its last real key.
        key_end = _key_end(keep, n, s, q.device)  # (N,) int32
        flags = keep if keep is not None else key_end  # (N, S) int8
        sizes = (t, s, h, h // n_kv, e, ev, scale)  # T, S, H, G, E, Ev, scale
        meta = {  # compile-time constants: Triton compiles one kernel per combination
            "CAUSAL": causal, "HAS_KEEP": keep is not None, "BLOCK_M": block_m,
            "BLOCK_N": block_n, "BLOCK_E": _padded(e), "BLOCK_EV": _padded(ev),
            "PRECISION": _precision(q.dtype),
        }  # fmt: skip
        out = q.new_empty(n, h, t, ev)  # (N, H, T, Ev)
        lse = q.new_empty(n, h, t, dtype=torch.float32)  # (N, H, T)
        grid = (_cdiv(t, block_m), n * h)  # one program per (query block, batch x head)
        kernels.forward[grid](q, k, v, out, lse, flags, key_end, *sizes, **meta)
        ctx.save_for_backward(q, k, v, out, lse, flags, key_end)
        ctx.launch = (sizes, meta, kernels)
        return out

    # --8<-- [end:launch]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, flags, key_end = ctx.saved_tensors
        sizes, meta, kernels = ctx.launch
        n, h, t, _ = q.shape
        n_kv, s = k.shape[1], k.shape[2]
        grad_out = grad_out.contiguous()  # (N, H, T, Ev)
        # D = rowsum(dO * O), one number per query row (FlashAttention-2's "preprocess" step).
        delta = (grad_out.float() * out.float()).sum(-1)  # (N, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # One program per (key block, batch x key/value head), then per (query block, batch x head).
        kernels.dkdv[(_cdiv(s, meta["BLOCK_N"]), n * n_kv)](
            q, k, v, grad_out, lse, delta, dk, dv, flags, key_end, *sizes, **meta
        )
        kernels.dq[(_cdiv(t, meta["BLOCK_M"]), n * h)](
            q, k, v, grad_out, lse, delta, dq, flags, key_end, *sizes, **meta
        )
        return dq, dk, dv, None, None, None, None, None, None


# --8<-- [start:forward_kernel]
def _forward_kernel(
    Q, K, V, OUT, LSE, KEEP, KEY_END,  # pointers to the first element of each tensor
    T, S, H, G, E, EV, scale,  # sizes (G query heads per key/value head) and 1 / sqrt(E)
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,  # which mask: known when compiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # tile sizes
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,  # E, Ev rounded up to a power of two
    PRECISION: tl.constexpr,  # "ieee" keeps float32 products in float32 (no TF32)
):  # fmt: skip
    # Which tile is mine? (query block, batch x head), and the key/value head my head reads.
    start_m, nh, n, kv_head = _query_tile(H, G, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) my query positions
    # My queries stay in registers for the whole loop (int64: large tensors overflow 32 bits).
    q = _load_block(Q + nh.to(tl.int64) * T * E, rows, T, E, BLOCK_E)  # (BLOCK_M, BLOCK_E)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # m, the running maximum
    row_sum = tl.zeros((BLOCK_M,), tl.float32)  # l = Σ exp(s - m)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)  # Σ exp(s - m) v

    # Causal block skipping: query i sees keys j <= i + S - T (bottom-right aligned), so no row
    # of this block sees past key start_m + BLOCK_M - 1 + S - T; with key padding, no row sees
    # past the last real key. The loop stops there instead of masking whole blocks.
    end_n = _loop_end(start_m, n, KEY_END, T, S, CAUSAL, HAS_KEEP, BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols, k, v = _key_block(K, V, kv_head, start_n, S, E, EV, BLOCK_N, BLOCK_E, BLOCK_EV)
        # 1. Scores of this tile, (BLOCK_M, BLOCK_N), float32 whatever the input dtype.
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = _visible(rows, cols, n, KEEP, T, S, CAUSAL, HAS_KEEP)
        scores = tl.where(visible, scores, float("-inf"))
        # 2. Online softmax, as in tiled.py: a row that has seen no key keeps m = -inf and
        #    subtracts 0 instead, so its exponentials are exp(-inf) = 0, never NaN.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))  # (BLOCK_M,)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(scores - shift[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp(row_max - shift)  # rescales what was summed under the old maximum
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        # 3. P V on the tensor cores, in the values' dtype, accumulated in float32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    # A row with no visible key: output 0, and L = +inf so that the backward's exp(S - L) is 0.
    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]  # (BLOCK_M, BLOCK_EV)
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("inf"))
    _store_block(OUT + nh.to(tl.int64) * T * EV, out, rows, T, EV, BLOCK_EV)
    tl.store(LSE + nh.to(tl.int64) * T + rows, lse, mask=rows < T)


def _query_tile(H, G, BLOCK_M: tl.constexpr):
    """The tile of a program of the forward and dQ grids: axis 0 numbers the query blocks, axis 1
    (batch x head). Returns its first query, n * H + h, n, and n * K + the key/value head of h."""
    nh = tl.program_id(1)  # n * H + h
    n = nh // H
    return tl.program_id(0) * BLOCK_M, nh, n, n * (H // G) + (nh % H) // G


def _load_block(ptr, rows, N_ROWS, N_COLS, BLOCK_COLS: tl.constexpr):
    """Rows ``rows`` of the row-major (N_ROWS, N_COLS) matrix at ``ptr``: a (len(rows),
    BLOCK_COLS) block, zeros past the matrix's edges. The pointers are computed for the whole
    block at once (broadcasting, like NumPy), and the load masks out what lies outside."""
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows[:, None] < N_ROWS) & (cols[None, :] < N_COLS)
    return tl.load(ptr + rows[:, None] * N_COLS + cols[None, :], mask=inside, other=0.0)


def _store_block(ptr, block, rows, N_ROWS, N_COLS, BLOCK_COLS: tl.constexpr):
    """Write ``block`` to rows ``rows`` of the (N_ROWS, N_COLS) matrix at ``ptr`` (the converse
    of ``_load_block``), in the matrix's dtype; what lies past its edges is not written."""
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows[:, None] < N_ROWS) & (cols[None, :] < N_COLS)
    ptrs = ptr + rows[:, None] * N_COLS + cols[None, :]
    tl.store(ptrs, block.to(ptr.dtype.element_ty), mask=inside)


def _key_block(
    K, V, kv_head, start_n, S, E, EV,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    """Key positions start_n.. and their keys and values: (BLOCK_N,), (BLOCK_N, BLOCK_E),
    (BLOCK_N, BLOCK_EV). int64 offsets of the head: large tensors overflow 32 bits."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_block(K + kv_head.to(tl.int64) * S * E, cols, S, E, BLOCK_E)
    v = _load_block(V + kv_head.to(tl.int64) * S * EV, cols, S, EV, BLOCK_EV)
    return cols, k, v


# --8<-- [end:forward_kernel]


def _query_rows(
    Q, DO, LSE, DELTA, nh, rows, T, E, EV, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr
):
    """What the backward reads of query rows ``rows`` of head ``nh``: q (BLOCK_M, BLOCK_E),
    dO (BLOCK_M, BLOCK_EV), and L and D (BLOCK_M,)."""
    q = _load_block(Q + nh.to(tl.int64) * T * E, rows, T, E, BLOCK_E)
    do = _load_block(DO + nh.to(tl.int64) * T * EV, rows, T, EV, BLOCK_EV)
    lse = tl.load(LSE + nh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + nh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    return q, do, lse, delta


def _probabilities(
    q, k, lse, rows, cols, n, KEEP, T, S, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The forward's probabilities of one tile, recomputed from L: P = exp(S - L), 0 where the
    mask hides the key; (BLOCK_M, BLOCK_N) in float32."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    visible = _visible(rows, cols, n, KEEP, T, S, CAUSAL, HAS_KEEP)
    return tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)


def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEEP, KEY_END,
    T, S, H, G, E, EV, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # My tile: one block of keys of one (batch, key/value head); I own its rows of dK and dV.
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)  # n * K + key/value head
    n = kv_head // (H // G)
    cols, k, v = _key_block(K, V, kv_head, start_n, S, E, EV, BLOCK_N, BLOCK_E, BLOCK_EV)
    dk = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), tl.float32)

    # Causal: the first query that sees key start_n is start_n - (S - T); start at its block.
    start_m0 = 0
    if CAUSAL:
        start_m0 = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
    end_m = T
    if HAS_KEEP:  # a block of keys past this sequence's last real key gets no gradient
        end_m = tl.where(start_n < tl.load(KEY_END + n), T, 0)
    for g in range(0, G):  # every query head that reads this key/value head (GQA)
        nh = n * H + (kv_head % (H // G)) * G + g  # n * H + h
        for start_m in range(start_m0, end_m, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q, do, lse, delta = _query_rows(
                Q, DO, LSE, DELTA, nh, rows, T, E, EV, BLOCK_E, BLOCK_EV
            )  # (BLOCK_M, BLOCK_E), (BLOCK_M, BLOCK_EV), (BLOCK_M,), (BLOCK_M,)
            # The forward's probabilities, recomputed from L: P = exp(S - L), 0 where hidden.
            p = _probabilities(
                q, k, lse, rows, cols, n, KEEP, T, S, scale, CAUSAL, HAS_KEEP, PRECISION
            )
            # O = P V: dV += P^T dO.   dP = dO V^T,  dS = P * (dP - D):  dK += dS^T Q.
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_block(DK + kv_head.to(tl.int64) * S * E, dk * scale, cols, S, E, BLOCK_E)
    _store_block(DV + kv_head.to(tl.int64) * S * EV, dv, cols, S, EV, BLOCK_EV)


def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEEP, KEY_END,
    T, S, H, G, E, EV, scale,
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # My tile: one block of queries of one (batch, head), as in the forward; I own its dQ rows.
    start_m, nh, n, kv_head = _query_tile(H, G, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, nh, rows, T, E, EV, BLOCK_E, BLOCK_EV)
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)

    end_n = _loop_end(start_m, n, KEY_END, T, S, CAUSAL, HAS_KEEP, BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols, k, v = _key_block(K, V, kv_head, start_n, S, E, EV, BLOCK_N, BLOCK_E, BLOCK_EV)
        p = _probabilities(q, k, lse, rows, cols, n, KEEP, T, S, scale, CAUSAL, HAS_KEEP, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # dS = P * (dP - D)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ += dS K
    _store_block(DQ + nh.to(tl.int64) * T * E, dq * scale, rows, T, E, BLOCK_E)


def _visible(rows, cols, n, KEEP, T, S, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr):
    """The mask of one tile, rebuilt from positions: (BLOCK_M, BLOCK_N) booleans."""
    visible = (rows[:, None] < T) & (cols[None, :] < S)  # inside the tensors
    if CAUSAL:  # bottom-right aligned: query i sees keys j <= i + S - T
        visible = visible & (cols[None, :] <= rows[:, None] + (S - T))
    if HAS_KEEP:  # this sequence's key padding flags
        flags = tl.load(KEEP + n.to(tl.int64) * S + cols, mask=cols < S, other=0)
        visible = visible & (flags[None, :] != 0)
    return visible


def _loop_end(
    start_m, n, KEY_END, T, S, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr
):
    """One past the last key that any query of the block start_m.. may see."""
    end_n = S
    if CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M + S - T)
    if HAS_KEEP:
        end_n = tl.minimum(end_n, tl.load(KEY_END + n))
    return end_n


# The Triton functions that the kernels call; ``_kernels()`` compiles them along with the kernels.
_HELPERS = (
    _query_tile,
    _load_block,
    _store_block,
    _key_block,
    _query_rows,
    _probabilities,
    _visible,
    _loop_end,
)


# -- launching -----------------------------------------------------------------------------------
def _key_end(keep: Tensor | None, n: int, s: int, device: torch.device) -> Tensor:
    """One past each sequence's last real key, (N,) int32: S without padding."""
    if keep is None:
        return torch.full((n,), s, dtype=torch.int32, device=device)
    positions = torch.arange(1, s + 1, device=keep.device, dtype=torch.int32)  # (S,)
    return (keep.to(torch.int32) * positions).amax(-1).to(torch.int32)  # (N,)


def _padded(size: int) -> int:
    """A feature dimension rounded up to a power of two, at least 16 (what tl.dot accepts)."""
    return max(16, 1 << (size - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """float32 products in float32 ("ieee"): TF32 would miss the reference by ~1e-3."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of b cover a."""
    return -(-a // b)


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import Triton and compile-wrap the kernels, once; a clear error if Triton is missing."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError as error:
        message = f"impl='triton' needs Triton, which is not installed: {_INSTALL}"
        raise RuntimeError(message) from error
    tl = triton.language
    # The helpers are Triton functions too: the kernels call them, Triton inlines them.
    for helper in _HELPERS:
        globals()[helper.__name__] = triton.jit(helper)
    kernels = SimpleNamespace(
        forward=triton.jit(_forward_kernel),
        dkdv=triton.jit(_dkdv_kernel),
        dq=triton.jit(_dq_kernel),
    )
    kernels.interpreted = type(kernels.forward).__name__ == "InterpretedFunction"
    return kernels


def _kernels_for(device: torch.device) -> SimpleNamespace:
    """The kernels, once we know they can run on ``device``; a clear error naming what to do."""
    kernels = _kernels()
    if device.type == "cuda" or (device.type == "cpu" and kernels.interpreted):
        return kernels
    if device.type == "cpu":
        raise RuntimeError(
            "impl='triton' runs on a CUDA GPU; for CPU tensors set TRITON_INTERPRET=1 before "
            "Triton is first imported (slow: for tests and learning), or use impl='tiled'"
        )
    raise RuntimeError(f"impl='triton' runs on CUDA GPUs, not on {device.type}; use impl='tiled'")


# Registered only where Triton is installed (found without importing it), so that
# available_backends() lists what can run.
if importlib.util.find_spec("triton") is not None:
    register_backend("triton", triton_attention, grouped_kv=True)
else:
    register_unavailable(
        "triton", "impl='triton' needs Triton: pip install 'qkv[gpu]' (or use impl='tiled')"
    )
