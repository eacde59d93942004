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

Four forms of one function, each tested against the first:
    ``dense_kernel_attention``   the one to read: φ(Q) φ(K)^T (T x S), masked, rows normalised.
    ``kernel_attention``         φ(Q) (φ(K)^T V): no mask, or a key padding mask.
    ``causal_kernel_attention``  prefix sums of φ(k_s) v_s^T, a chunk at a time: causal.
    ``LinearAttentionState``     the prefix sum as a recurrent state: O(1) work per new token.

The backend ``"linear"`` (``impl="linear"``, ``attn_impl="linear"``) accepts what the fast forms
can apply without forming T x S scores: no mask, a key padding mask (``masks.padding``), a causal
mask (``masks.causal``, bottom-right aligned), or the last two combined with ``&``. It looks at
the mask it is given to tell which (``split_mask``); any other mask, any bias and any dropout
are a clear ValueError. ``scale`` is ignored: elu + 1 has no temperature, and the paper applies
φ to the unscaled projections.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim · Ev value head dim · M features of φ (E for elu + 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from qkv.attention.backends import register_backend

__all__ = [
    "LinearAttentionState",
    "causal_kernel_attention",
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
    the queries go ``chunk_size`` (C) at a time: a chunk reads the state of the chunks before
    it, plus its own keys through a C x C causal product (``dense_kernel_attention`` in small),
    then adds its keys to the state. Memory is O(C^2 + M Ev) per head.

    Args:
        phi_q: (..., T, M). phi_k: (..., S, M). v: (..., S, Ev). Leading dimensions broadcast.
        key_mask: boolean (..., 1, S), True = a real key; None = every key is real.
        chunk_size: queries per chunk, C.

    Returns:
        The output (..., T, Ev).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
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
        q_c = phi_q[..., start:stop, :]  # (..., C, M)
        k_c = phi_k[..., start + offset : stop + offset, :]  # (..., C, M): key i + offset
        v_c = vo[..., start + offset : stop + offset, :]  # (..., C, Ev + 1)
        within = (q_c @ k_c.transpose(-2, -1)).tril()  # (..., C, C): this chunk's keys, causal
        chunks.append(q_c @ state + within @ v_c)  # (..., C, Ev + 1): earlier + this chunk
        state = state + k_c.transpose(-2, -1) @ v_c  # (..., M, Ev + 1)
    return _normalise(torch.cat(chunks, dim=-2))  # (..., T, Ev)


# --8<-- [end:causal]


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


def split_mask(mask: Tensor | None, t: int, s: int) -> tuple[str, Tensor | None]:
    """Tell which mask the fast forms can apply: ``"none"``, ``"key"`` (padding) or ``"causal"``.

    Under a bottom-right causal mask the last query sees every key, so the mask's last row is
    its key padding. The mask is key padding when every row equals that row, and causal when it
    equals that row & the causal mask (``masks.causal(T, S)``; also for T > S, where the first
    T - S queries see no key). (The check reads the boolean mask: it costs
    O(T S) comparisons and waits for the device, no float scores.)

    Returns:
        The kind and the key padding (..., 1, S), True = a real key (None only for no mask).

    Raises:
        ValueError: any other mask (sliding window, prefix-LM, random, ...).
    """
    if mask is None:
        return "none", None
    key_mask = mask[..., -1:, :]  # (..., 1, S)
    if mask.shape[-2] == 1 or bool((mask == key_mask).all()):
        return "key", key_mask
    causal = torch.ones(t, s, dtype=torch.bool, device=mask.device).tril(s - t)  # (T, S)
    if bool((mask == (key_mask & causal)).all()):
        return "causal", key_mask
    raise ValueError(
        f"linear attention applies no mask, a causal mask (masks.causal), a key padding mask "
        f"(masks.padding) or the two combined with &; the mask of shape {tuple(mask.shape)} is "
        "none of these (for any other mask use impl='reference' or 'sdpa')"
    )


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
    phi_q: Tensor, phi_k: Tensor, v: Tensor, mask: Tensor | None, *, chunk_size: int = 64
) -> Tensor:
    """φ(Q), φ(K), V -> output, by the fast form that ``mask`` allows (see ``split_mask``).

    Grouped-query attention: with φ(Q) (B, H, T, M) and φ(K), V (B, K, S, ...), the query heads
    are viewed as (B, K, H / K, T, M) so that each key/value head's φ(K)^T V is computed once
    and shared by its H / K query heads (no ``repeat_kv`` copies).
    """
    kind, key_mask = split_mask(mask, phi_q.shape[-2], phi_k.shape[-2])
    grouped = phi_q.dim() >= 4 and phi_q.shape[-3] != phi_k.shape[-3]
    if grouped:
        n_heads, n_kv = phi_q.shape[-3], phi_k.shape[-3]
        phi_q = phi_q.unflatten(-3, (n_kv, n_heads // n_kv))  # (B, K, H / K, T, M)
        phi_k, v = phi_k.unsqueeze(-3), v.unsqueeze(-3)  # (B, K, 1, S, M), (B, K, 1, S, Ev)
        if key_mask is not None:
            key_mask = key_mask.reshape((1,) * (phi_q.dim() - 1 - key_mask.dim()) + key_mask.shape)
            key_mask = (  # (B, K or 1, H / K or 1, 1, S)
                key_mask.unsqueeze(-3)
                if key_mask.shape[-3] == 1
                else key_mask.unflatten(-3, (n_kv, n_heads // n_kv))
            )
    if kind == "causal":
        out = causal_kernel_attention(phi_q, phi_k, v, key_mask, chunk_size=chunk_size)
    else:
        out = kernel_attention(phi_q, phi_k, v, key_mask)  # (..., T, Ev)
    return out.flatten(-4, -3) if grouped else out  # (..., T, Ev)


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, chunk_size: int = 64
) -> Tensor:
    """Linear attention with φ = elu + 1 (Katharopoulos et al. 2020), by its fast forms.

    Args:
        q: queries (..., T, E). k: keys (..., S, E). v: values (..., S, Ev); 4-D k and v may
            have fewer heads than q (grouped-query attention).
        mask: None, key padding, causal or both (see ``split_mask``), True = may attend.
        chunk_size: queries per chunk of the causal form.

    Returns:
        The output (..., T, Ev) in the dtype of ``v``, computed in float32 at least.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    phi_q, phi_k = elu_feature_map(q.to(dtype)), elu_feature_map(k.to(dtype))  # (..., T|S, E)
    out = fast_kernel_attention(phi_q, phi_k, v.to(dtype), mask, chunk_size=chunk_size)
    return out.to(v.dtype)  # (..., T, Ev)


def linear_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    bias: Tensor | None,
    scale: float | None,
    dropout_p: float,
) -> tuple[Tensor, None]:
    """``linear_attention`` under the backend signature; ``scale`` is ignored (see above)."""
    reject_bias_and_dropout("linear", bias, dropout_p)
    return linear_attention(q, k, v, mask), None


register_backend("linear", linear_backend, grouped_kv=True)
