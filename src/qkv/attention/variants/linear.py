"""Linear attention: a feature map in place of the softmax, so the T x S scores never form.

    out_t = Σ_s φ(q_t)·φ(k_s) v_s / Σ_s φ(q_t)·φ(k_s)
          = φ(q_t)^T (Σ_s φ(k_s) v_s^T) / φ(q_t)^T (Σ_s φ(k_s)),      φ(x) = elu(x) + 1

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention", 2020 (arXiv:2006.16236), sections 3.2 (the feature map) and 3.4 (the RNN view).

Softmax needs every score exp(q·k) because the exponential does not factor. A kernel φ(q)·φ(k)
does: compute φ(K)^T V first (M x Ev, whatever T and S are) and multiply each φ(q_t) by it, and
the cost falls from O(T S E) to O((T + S) M Ev). This is a different attention, not an
approximation of softmax: its weights φ(q)·φ(k) / Σ φ(q)·φ(k) are tested against its own dense
form, never against ``reference_attention``. (``performer.py`` picks a φ that does approximate
softmax, and reuses everything here.)

Five forms of one function, each tested against the first:
    ``dense_kernel_attention``   the one to read: φ(Q) φ(K)^T (T x S), masked, rows normalised.
    ``kernel_attention``         φ(Q) (φ(K)^T V): no mask, or a key padding mask.
    ``causal_kernel_attention``  prefix sums of φ(k_s) v_s^T, a chunk at a time: causal.
    ``causal_scan``              the same chunks from q and k, with φ applied a chunk at a time
                                 and recomputed in the backward: memory O(T E), not O(T M).
    ``LinearAttentionState``     the prefix sum as a recurrent state: O(1) work per new token.

The backend ``"linear"`` (``impl="linear"``, ``attn_impl="linear"``) accepts what the fast forms
can apply without forming T x S scores: no mask, a key padding mask (``masks.padding``, (B, 1,
1, S)), causal attention (``is_causal=True``, or a ``masks.causal`` mask; bottom-right aligned),
or the two together. It is registered with ``causal=True``: a model's ``is_causal`` arrives as a
flag and no (T, S) tensor is ever built or read. A mask with T rows is read to tell which kind it
is (``split_mask``); any other mask, any bias and any dropout are a clear ValueError. ``scale``
is ignored: elu + 1 has no temperature, and the paper applies φ to the unscaled projections.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim · Ev value head dim · M features of φ (E for elu + 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention.backends import AttentionBackend, register_backend

__all__ = [
    "LinearAttentionState",
    "causal_kernel_attention",
    "causal_scan",
    "dense_kernel_attention",
    "elu_feature_map",
    "fast_kernel_attention",
    "kernel_attention",
    "linear_attention",
    "reject_bias_and_dropout",
    "split_mask",
]


def elu_feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise: every similarity φ(q)·φ(k) is positive. (..., E)."""
    return F.elu(x) + 1.0  # (..., E)


def _nonzero(den: Tensor) -> Tensor:
    """0 -> 1: a query that sees no key has a zero sum (features are positive) and outputs 0."""
    return den.masked_fill(den == 0, 1.0)


# --8<-- [start:dense]
def dense_kernel_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Kernelised attention with its T x S weights formed: the version to read. Any mask.

    Args:
        phi_q: query features φ(q), (..., T, M).
        phi_k: key features φ(k), (..., S, M), as many heads as ``phi_q``.
        v: values, (..., S, Ev).
        mask: boolean, True = may attend, broadcastable to (..., T, S).

    Returns:
        The output (..., T, Ev) and the weights (..., T, S); a query that sees no key gets zeros.
    """
    # 1. Similarity of each query with each key: a dot product of features (no exp).
    sim = phi_q @ phi_k.transpose(-2, -1)  # (..., T, S)
    # 2. A hidden key contributes nothing: similarity 0.
    if mask is not None:
        sim = sim.masked_fill(~mask, 0.0)  # (..., T, S)
    # 3. Each row divided by its sum: weights that sum to 1 (a row with no key stays 0).
    weights = sim / _nonzero(sim.sum(-1, keepdim=True))  # (..., T, S)
    # 4. The weighted sum of the values.
    return weights @ v, weights  # (..., T, Ev), (..., T, S)


# --8<-- [end:dense]


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1]: the normaliser Σ φ(q)·φ(k) is the numerator with every value replaced by 1, so
    one product yields both (numerator: first Ev columns, normaliser: the last one)."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # (..., S, Ev + 1)


def _normalise(num_den: Tensor) -> Tensor:
    """Numerator / normaliser from the (..., T, Ev + 1) product with ``_with_ones(v)``."""
    return num_den[..., :-1] / _nonzero(num_den[..., -1:])  # (..., T, Ev)


def _hide_keys(phi_k: Tensor, key_mask: Tensor | None) -> Tensor:
    """Zero the features of padding keys: a key with φ(k) = 0 adds nothing to any sum."""
    if key_mask is None:
        return phi_k
    return phi_k * key_mask.transpose(-2, -1).to(phi_k.dtype)  # (..., S, M)


# --8<-- [start:kernel]
def kernel_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, key_mask: Tensor | None = None
) -> Tensor:
    """φ(Q) (φ(K)^T V) / φ(Q) (φ(K)^T 1): ``dense_kernel_attention`` reassociated, no T x S.

    Args:
        phi_q: (..., T, M). phi_k: (..., S, M). v: (..., S, Ev). Leading dimensions broadcast.
        key_mask: boolean (..., 1, S), True = a real key; None = every key is real.

    Returns:
        The output (..., T, Ev).
    """
    phi_k = _hide_keys(phi_k, key_mask)  # (..., S, M)
    state = phi_k.transpose(-2, -1) @ _with_ones(v)  # (..., M, Ev + 1): Σ_s φ(k_s) [v_s, 1]^T
    return _normalise(phi_q @ state)  # (..., T, Ev)


# --8<-- [end:kernel]


# --8<-- [start:causal]
def _causal_chunk(phi_q: Tensor, phi_k: Tensor, vo: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of C queries and their C newest keys (key i is the last one query i sees).

    The queries read ``state`` = Σ φ(k_s) [v_s, 1]^T over the keys before the chunk, plus their
    own chunk's keys through a C x C causal product; then those keys join the state.

    Returns:
        Numerator and normaliser (..., C, Ev + 1), and the state after the chunk (..., M, Ev + 1).
    """
    within = (phi_q @ phi_k.transpose(-2, -1)).tril()  # (..., C, C): this chunk's keys, causal
    num_den = phi_q @ state + within @ vo  # (..., C, Ev + 1): earlier chunks + this one
    return num_den, state + phi_k.transpose(-2, -1) @ vo  # (..., M, Ev + 1)


def causal_kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> Tensor:
    """Causal ``kernel_attention``: query t reads the prefix sum Σ_{s ≤ t} φ(k_s) [v_s, 1]^T.

    Positions align bottom-right (as ``masks.causal``): query t sees keys s ≤ t + S - T. When
    S > T, the first S - T keys (a cache's past) start the sum; when T > S, the first T - S
    queries see no key and output zeros.

    The plain way, ``torch.cumsum`` of φ(k_s) v_s^T over positions, keeps every prefix state at
    once, a (..., T, M, Ev) tensor: fine for small M and Ev, but T times the state's size. Here
    the queries go ``chunk_size`` (C) at a time (``_causal_chunk``): a chunk reads the state of
    the chunks before it, plus its own keys through a C x C causal product
    (``dense_kernel_attention`` in small), then adds its keys to the state. Memory is
    O(C^2 + M Ev) per head and chunk (autograd keeps each chunk's state for the backward).

    Args:
        phi_q: (..., T, M). phi_k: (..., S, M). v: (..., S, Ev). Leading dimensions broadcast.
        key_mask: boolean (..., 1, S), True = a real key; None = every key is real.
        chunk_size: queries per chunk, C.

    Returns:
        The output (..., T, Ev).
    """
    _check_chunk_size(chunk_size)
    t, s = phi_q.shape[-2], phi_k.shape[-2]
    offset = s - t  # query i sees keys j <= i + offset
    phi_k, vo = _hide_keys(phi_k, key_mask), _with_ones(v)  # (..., S, M), (..., S, Ev + 1)
    past = max(offset, 0)  # keys that every query sees (a cache's past)
    first = max(-offset, 0)  # the first query that sees a key
    state = phi_k[..., :past, :].transpose(-2, -1) @ vo[..., :past, :]  # (..., M, Ev + 1)
    lead = torch.broadcast_shapes(phi_q.shape[:-2], state.shape[:-2])
    chunks = [phi_q.new_zeros(*lead, first, vo.shape[-1])]  # (..., T - S, Ev + 1) when T > S
    for start in range(first, t, chunk_size):
        stop = min(start + chunk_size, t)
        keys = slice(start + offset, stop + offset)  # key i + offset is query i's newest
        num_den, state = _causal_chunk(
            phi_q[..., start:stop, :], phi_k[..., keys, :], vo[..., keys, :], state
        )  # (..., C, Ev + 1), (..., M, Ev + 1)
        chunks.append(num_den)
    return _normalise(torch.cat(chunks, dim=-2))  # (..., T, Ev)


# --8<-- [end:causal]


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


FeatureMap = Callable[[Tensor], Tensor]
"""Queries or keys (..., N, E) -> their features (..., N, M), row by row."""

# Queries per chunk of the fast causal form. Larger chunks mean fewer, larger products (each
# Python step costs the same however small its tensors); the C x C products grow with C.
CHUNK_SIZE = 128


def _scan_chunk(
    features: tuple[FeatureMap, FeatureMap],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """``_causal_chunk`` from raw queries and keys: φ, the hidden keys, [v, 1], normalised."""
    feature_q, feature_k = features
    phi_k = _hide_keys(feature_k(k), key_mask)  # (..., C, M)
    num_den, state = _causal_chunk(feature_q(q), phi_k, _with_ones(v), state)
    return _normalise(num_den), state  # (..., C, Ev), (..., M, Ev + 1)


class _RecomputedScan(torch.autograd.Function):
    """The chunk loop of ``causal_kernel_attention`` on aligned queries and keys (key i is query
    i's newest), keeping for the backward only q, k, v and each chunk's starting state.

    Autograd through the plain loop would keep every chunk's features φ(q), φ(k) (T x M each:
    128 MiB a tensor for Performer's M = 256 at T = 16384, 8 heads) and C x C products. Here the
    backward runs the chunks in reverse, recomputes each one from its inputs and its saved
    state (as FlashAttention recomputes its scores), and passes the gradient of the state back
    to the chunk before: the state after chunk n is the state before it plus its keys, so
    d(loss)/d(state before) = d(loss)/d(state after) + what the chunk's queries read from it.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_mask: Tensor | None,
        state: Tensor,
        features: tuple[FeatureMap, FeatureMap],
        chunk_size: int,
    ) -> Tensor:
        out, states = None, []
        for start in range(0, q.shape[-2], chunk_size):
            rows = slice(start, start + chunk_size)
            mask_c = None if key_mask is None else key_mask[..., rows]  # (..., 1, C)
            states.append(state)
            out_c, state = _scan_chunk(
                features, q[..., rows, :], k[..., rows, :], v[..., rows, :], mask_c, state
            )  # (..., C, Ev), (..., M, Ev + 1)
            if out is None:  # written in place, chunk by chunk: no list of chunks to concatenate
                out = out_c.new_empty(*out_c.shape[:-2], q.shape[-2], out_c.shape[-1])
            out[..., rows, :] = out_c  # (..., T, Ev)
        ctx.save_for_backward(q, k, v, *states)
        ctx.features, ctx.chunk_size = features, chunk_size  # type: ignore[attr-defined]
        ctx.key_mask = key_mask  # type: ignore[attr-defined]
        assert out is not None  # T >= 1: at least one chunk
        return out  # (..., T, Ev)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, *states = ctx.saved_tensors  # type: ignore[attr-defined]
        features, chunk_size = ctx.features, ctx.chunk_size  # type: ignore[attr-defined]
        key_mask = ctx.key_mask  # type: ignore[attr-defined]
        grads = [torch.empty_like(x) for x in (q, k, v)]  # (..., T, E), (..., T, E), (..., T, Ev)
        grad_state = torch.zeros_like(states[0])  # the last state is read by no query
        for n in reversed(range(len(states))):
            rows = slice(n * chunk_size, (n + 1) * chunk_size)
            mask_c = None if key_mask is None else key_mask[..., rows]  # (..., 1, C)
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q[..., rows, :], k[..., rows, :])]
                leaves += [x.detach().requires_grad_() for x in (v[..., rows, :], states[n])]
                q_c, k_c, v_c, state_c = leaves
                out, state = _scan_chunk(features, q_c, k_c, v_c, mask_c, state_c)
                *chunk_grads, grad_state = torch.autograd.grad(
                    (out, state), leaves, (grad_out[..., rows, :], grad_state)
                )
            for grad, chunk_grad in zip(grads, chunk_grads, strict=True):
                grad[..., rows, :] = chunk_grad
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_q, grad_k, grad_v = (
            g if need else None for g, need in zip(grads, needs, strict=False)
        )
        return grad_q, grad_k, grad_v, None, grad_state, None, None


def causal_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    *,
    features: tuple[FeatureMap, FeatureMap],
    chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """``causal_kernel_attention(feature_q(q), feature_k(k), v, key_mask)``, never holding the
    features of more than one chunk: the fast causal form the backends run.

    Args:
        q: (..., T, E). k: (..., S, E). v: (..., S, Ev). Leading dimensions broadcast.
        key_mask: boolean (..., 1, S), True = a real key; None = every key is real.
        features: (feature_q, feature_k), each applied to a chunk of rows at a time (so a
            key feature map must not depend on the other keys of the chunk).
        chunk_size: queries per chunk, C.

    Returns:
        The output (..., T, Ev). Memory beyond the inputs, output and gradients: the N = T / C
        states (..., M, Ev + 1) and one chunk's tensors.
    """
    _check_chunk_size(chunk_size)
    t, s = q.shape[-2], k.shape[-2]
    past, first = max(s - t, 0), max(t - s, 0)  # a cache's past keys; queries that see none
    # The past keys start the state (plain autograd: S - T keys, a decoding step's cache).
    past_mask = None if key_mask is None else key_mask[..., :past]  # (..., 1, S - T)
    phi_past = _hide_keys(features[1](k[..., :past, :]), past_mask)  # (..., S - T, M)
    state = phi_past.transpose(-2, -1) @ _with_ones(v[..., :past, :])  # (..., M, Ev + 1)
    if past:  # (sliced only when needed: a slice's gradient is a zero-filled copy of the whole)
        k, v = k[..., past:, :], v[..., past:, :]  # (..., T, E), (..., T, Ev)
        key_mask = None if key_mask is None else key_mask[..., past:]  # (..., 1, T)
    out = _RecomputedScan.apply(
        q[..., first:, :] if first else q, k, v, key_mask, state, features, chunk_size
    )  # (..., min(T, S), Ev)
    if first:
        out = torch.cat([out.new_zeros(*out.shape[:-2], first, out.shape[-1]), out], dim=-2)
    return out  # (..., T, Ev)


# --8<-- [start:state]
@dataclass
class LinearAttentionState:
    """Causal linear attention as a recurrent network: decoding costs O(M Ev) per token.

    After s tokens the state holds kv = Σ φ(k_i) v_i^T (..., M, Ev) and k_sum = Σ φ(k_i)
    (..., M), and token s + 1 outputs φ(q)^T kv / φ(q)^T k_sum: the same numbers as
    ``causal_kernel_attention`` at that position, without keeping any key or value.

    Example:
        >>> import torch
        >>> state = LinearAttentionState()
        >>> q, k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
        >>> outs = torch.stack([state.step(q[t], k[t], v[t]) for t in range(3)])
        >>> outs.shape  # (T, B, Ev)
        torch.Size([3, 2, 8])
    """

    feature_map: Callable[[Tensor], Tensor] = elu_feature_map
    kv: Tensor | None = None  # (..., M, Ev)
    k_sum: Tensor | None = None  # (..., M)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Add one key and value, then answer one query: q, k (..., E), v (..., Ev) -> (..., Ev).

        Computed in float32 at least; returned in the dtype of ``v``. Heads must match (for
        grouped keys and values, repeat them with ``qkv.repeat_kv`` first)."""
        dtype = torch.promote_types(v.dtype, torch.float32)
        phi_q, phi_k = self.feature_map(q.to(dtype)), self.feature_map(k.to(dtype))  # (..., M)
        kv = phi_k.unsqueeze(-1) * v.to(dtype).unsqueeze(-2)  # (..., M, Ev): φ(k) v^T
        self.kv = kv if self.kv is None else self.kv + kv  # (..., M, Ev)
        self.k_sum = phi_k if self.k_sum is None else self.k_sum + phi_k  # (..., M)
        num = (phi_q.unsqueeze(-2) @ self.kv).squeeze(-2)  # (..., Ev)
        den = (phi_q * self.k_sum).sum(-1, keepdim=True)  # (..., 1), > 0: k itself is in it
        return (num / den).to(v.dtype)  # (..., Ev)


# --8<-- [end:state]


def split_mask(
    mask: Tensor | None, t: int, s: int, *, is_causal: bool = False
) -> tuple[str, Tensor | None]:
    """Tell which mask the fast forms can apply: ``"none"``, ``"key"`` (padding) or ``"causal"``.

    ``is_causal=True`` adds the causal mask (``masks.causal(T, S)``, bottom-right aligned; also
    for T > S, where the first T - S queries see no key) to ``mask``. A mask with one row,
    (..., 1, S) such as ``masks.padding``'s (B, 1, 1, S), is key padding by its shape: no (T, S)
    tensor is built or read. A mask with T rows is read: under a bottom-right causal mask the
    last query sees every key, so its last row is the key padding; the mask is key padding when
    every row equals that row, and causal when it equals that row & the causal mask. (That check
    costs O(T S) comparisons, a few rows at a time, and waits for the device.)

    Returns:
        The kind and the key padding (..., 1, S), True = a real key (None when there is none).

    Raises:
        ValueError: any other mask (sliding window, prefix-LM, random, ...).
    """
    if mask is None:
        return ("causal" if is_causal else "none"), None
    while mask.dim() < 2:
        mask = mask.unsqueeze(0)  # (1, S) or (1, 1)
    if mask.shape[-2] == 1:
        key_mask = mask if mask.shape[-1] == s else mask.expand(*mask.shape[:-1], s)  # (..., 1, S)
        return ("causal" if is_causal else "key"), key_mask
    key_mask = mask[..., -1:, :].expand(*mask.shape[:-2], 1, s)  # (..., 1, S)
    is_key = is_causal_mask = True
    for lo in range(0, t, _ROWS):
        rows = mask[..., lo : lo + _ROWS, :]  # (..., R, S)
        causal = torch.ones(rows.shape[-2], s, dtype=torch.bool, device=mask.device)  # (R, S)
        causal = causal.tril(s - t + lo)  # rows lo .. lo + R - 1 of masks.causal(T, S)
        is_key = is_key and bool((rows == key_mask).all())
        is_causal_mask = is_causal_mask and bool((rows == (key_mask & causal)).all())
        if not (is_key or is_causal_mask):
            raise ValueError(
                "linear attention applies no mask, a causal mask (masks.causal or is_causal), a "
                "key padding mask (masks.padding) or the two combined with &; the mask of shape "
                f"{tuple(mask.shape)} is none of these (for any other mask use impl='reference' "
                "or 'sdpa')"
            )
    return ("key" if is_key and not is_causal else "causal"), key_mask


_ROWS = 256  # mask rows compared at a time by split_mask: temporaries of (..., 256, S) booleans


def reject_bias_and_dropout(name: str, bias: Tensor | None, dropout_p: float) -> None:
    """A clear error for what a kernelised backend ``name`` cannot do: a bias or dropout."""
    if bias is not None:
        raise ValueError(
            f"impl={name!r} never forms the scores, so it cannot add a bias to them (ALiBi, "
            "relative positions); use impl='reference' or 'sdpa'"
        )
    if dropout_p > 0.0:
        raise ValueError(
            f"impl={name!r} never forms the attention weights, so it cannot drop them: "
            f"got dropout_p={dropout_p}; set the attention dropout to 0 (e.g. dropout=0.0 in "
            "the model's config)"
        )


def fast_kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    feature_q: FeatureMap,
    key_feature_map: Callable[[Tensor], FeatureMap],
    is_causal: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """q, k, v -> output, by the fast form that ``mask`` and ``is_causal`` allow (``split_mask``).

    ``feature_q`` maps rows of queries to their features; ``key_feature_map(k)`` gives the map
    for rows of these keys (Performer's depends on all of them, see ``performer.py``). The
    causal form applies both a chunk at a time (``causal_scan``).

    Grouped-query attention: with q (B, H, T, E) and k, v (B, K, S, ...), the query heads are
    viewed as (B, K, H / K, T, E) so that each key/value head's φ(K)^T V is computed once and
    shared by its H / K query heads (no ``repeat_kv`` copies).

    Computed in float32 at least (float64 stays float64), since its sums run over every key;
    returns the output (..., T, Ev) in the dtype of ``v``.
    """
    out_dtype, dtype = v.dtype, torch.promote_types(v.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # no copy when already in dtype
    kind, key_mask = split_mask(mask, q.shape[-2], k.shape[-2], is_causal=is_causal)
    grouped = q.dim() >= 4 and q.shape[-3] != k.shape[-3]
    if grouped:
        n_heads, n_kv = q.shape[-3], k.shape[-3]
        q = q.unflatten(-3, (n_kv, n_heads // n_kv))  # (B, K, H / K, T, E)
        k, v = k.unsqueeze(-3), v.unsqueeze(-3)  # (B, K, 1, S, E), (B, K, 1, S, Ev)
        if key_mask is not None:
            key_mask = key_mask.reshape((1,) * (q.dim() - 1 - key_mask.dim()) + key_mask.shape)
            key_mask = (  # (B, K or 1, H / K or 1, 1, S)
                key_mask.unsqueeze(-3)
                if key_mask.shape[-3] == 1
                else key_mask.unflatten(-3, (n_kv, n_heads // n_kv))
            )
    feature_k = key_feature_map(k)
    if kind == "causal":
        features = (feature_q, feature_k)
        out = causal_scan(q, k, v, key_mask, features=features, chunk_size=chunk_size)
    else:
        out = kernel_attention(feature_q(q), feature_k(k), v, key_mask)  # (..., T, Ev)
    out = out.flatten(-4, -3) if grouped else out  # (..., T, Ev)
    return out.to(out_dtype)  # (..., T, Ev)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """Linear attention with φ = elu + 1 (Katharopoulos et al. 2020), by its fast forms.

    Args:
        q: queries (..., T, E). k: keys (..., S, E). v: values (..., S, Ev); 4-D k and v may
            have fewer heads than q (grouped-query attention).
        mask: None, key padding, causal or both (see ``split_mask``), True = may attend.
        is_causal: also apply the causal mask (bottom-right aligned), without building it.
        chunk_size: queries per chunk of the causal form.

    Returns:
        The output (..., T, Ev) in the dtype of ``v``, computed in float32 at least.
    """
    return fast_kernel_attention(
        q,
        k,
        v,
        mask,
        feature_q=elu_feature_map,
        key_feature_map=lambda keys: elu_feature_map,
        is_causal=is_causal,
        chunk_size=chunk_size,
    )  # (..., T, Ev)


KernelAttention = Callable[[Tensor, Tensor, Tensor, Tensor | None, float | None, bool], Tensor]
"""``(q, k, v, mask, scale, is_causal) -> output``: kernelised attention, as a backend calls it."""


def kernel_backend(name: str, attention: KernelAttention) -> AttentionBackend:
    """``attention`` under the backend signature, for ``impl=name`` (register it with
    ``grouped_kv=True, causal=True``). It never forms the scores or the weights: a bias or
    dropout is a clear error (``reject_bias_and_dropout``)."""

    def backend(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        *,
        bias: Tensor | None,
        scale: float | None,
        dropout_p: float,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        reject_bias_and_dropout(name, bias, dropout_p)
        return attention(q, k, v, mask, scale, is_causal), None

    return backend


# ``scale`` is ignored: elu + 1 has no temperature (module docstring).
linear_backend = kernel_backend(
    "linear",
    lambda q, k, v, mask, scale, is_causal: linear_attention(q, k, v, mask, is_causal=is_causal),
)
register_backend("linear", linear_backend, grouped_kv=True, causal=True)
