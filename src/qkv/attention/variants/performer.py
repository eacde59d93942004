"""Performer (FAVOR+): softmax attention approximated by positive random features.

    exp(q·k) = E_w[ exp(w·q - |q|²/2) · exp(w·k - |k|²/2) ],      w ~ N(0, I_E)

so M random vectors w_1 .. w_M (the rows of W, (M, E)) give the features

    φ(x) = exp(W x - |x|²/2) / sqrt(M)  (M,),      φ(q)·φ(k) ≈ exp(q·k),

positive, like the softmax's exp. Put into linear attention (``linear.py``: the same dense form,
fast forms and masks, shared, not copied), they approximate softmax(q k^T * scale) V at
O((T + S) M Ev) cost; q and k are first multiplied by sqrt(scale) each (E^-1/4 by default).

Choromanski et al., "Rethinking Attention with Performers", 2020 (arXiv:2009.14794): Lemma 1
(positive random features) and section 2.4 (orthogonal random features: the w_i drawn exactly
orthogonal in blocks of E, with Gaussian lengths, estimate with less variance than independent
ones). The error falls like 1/sqrt(M); ``performer_error_curve`` measures it.

Numerical stability: exp(W x - |x|²/2) overflows for long x, so a constant c is subtracted
before the exp. It must cancel in out_t = φ(q_t)^T Σ_s φ(k_s) v_s^T / φ(q_t)^T Σ_s φ(k_s):
    * for a query, any c of its own row cancels (it scales numerator and normaliser alike):
      c = its largest log-feature, so its largest feature is exactly 1;
    * for keys, a c that differed from key to key would reweight them: one c for all the keys
      of a sequence (and head), their largest log-feature, so it cancels for every query.
A key whose log-features all lie more than about 87 below that maximum (float32) rounds to
zero features and drops out of the sums: inputs whose keys differ widely in length lose
accuracy (as in the paper's implementation). Under a causal mask c also reads future keys, but
it cancels: outputs depend on them only through rounding.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim · Ev value head dim · M random features.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from qkv.attention.backends import register_backend
from qkv.attention.core import reference_attention
from qkv.attention.variants.linear import (
    CHUNK_SIZE,
    FeatureMap,
    dense_kernel_attention,
    fast_kernel_attention,
    kernel_backend,
)

__all__ = [
    "DEFAULT_FEATURES",
    "cached_random_features",
    "draw_random_features",
    "key_shift",
    "performer_attention",
    "performer_error_curve",
    "performer_features",
    "performer_reference",
]

DEFAULT_FEATURES = 256  # M of the registered backend "performer"


# --8<-- [start:draw]
def draw_random_features(
    head_dim: int,
    n_features: int,
    *,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
) -> Tensor:
    """W (M, E), float64 on the CPU: each row w ~ N(0, I_E) on its own.

    With ``orthogonal=True`` the rows come in blocks of E mutually orthogonal directions (Q of
    the QR of a Gaussian matrix, its columns' signs fixed by R's diagonal so that Q is
    uniformly random), each row then given the length of a Gaussian vector (chi-distributed
    with E degrees of freedom): every row is still N(0, I_E), but the rows are not independent.
    """
    if n_features < 1:
        raise ValueError(
            f"Performer needs at least one random feature, got n_features={n_features}"
        )

    def gaussian(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    if not orthogonal:
        return gaussian(n_features, head_dim)  # (M, E)
    n_blocks = math.ceil(n_features / head_dim)
    q, r = torch.linalg.qr(gaussian(n_blocks, head_dim, head_dim))  # (n_blocks, E, E) each
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # column signs fixed
    directions = q.transpose(-2, -1).reshape(-1, head_dim)[:n_features]  # (M, E) unit rows
    lengths = gaussian(n_features, head_dim).norm(dim=-1)  # (M,) chi(E) distributed
    return directions * lengths.unsqueeze(-1)  # (M, E)


# --8<-- [end:draw]


@functools.lru_cache(maxsize=32)
def cached_random_features(
    head_dim: int,
    n_features: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    orthogonal: bool = True,
) -> Tensor:
    """``draw_random_features`` from ``seed``, drawn once and kept: (M, E) in ``dtype``.

    Drawn in float64 on the CPU and then converted, so one seed gives the same features (up
    to rounding) on every device and in every dtype, and repeated calls give identical outputs.
    """
    generator = torch.Generator().manual_seed(seed)
    w = draw_random_features(head_dim, n_features, generator=generator, orthogonal=orthogonal)
    return w.to(device=device, dtype=dtype)  # (M, E)


# --8<-- [start:features]
def performer_features(
    x: Tensor, w: Tensor, *, is_query: bool, shift: Tensor | None = None
) -> Tensor:
    """φ(x) = exp(W x - |x|²/2 - c) / sqrt(M), with the stabiliser c of the module docstring.

    Args:
        x: queries or keys, already multiplied by sqrt(scale), (..., N, E).
        w: random features W, (M, E).
        is_query: c per row (queries) or one per sequence, over all N rows (keys).
        shift: c itself, (..., 1, 1), for keys given a chunk at a time (``key_shift``).

    Returns:
        φ(x), (..., N, M), positive (keys far below the largest may round to 0).
    """
    log_phi = x @ w.T - (x * x).sum(-1, keepdim=True) / 2  # (..., N, M)
    if shift is None:
        dims = (-1,) if is_query else (-2, -1)
        shift = log_phi.amax(dim=dims, keepdim=True).detach()  # (..., N, 1) or (..., 1, 1)
    return torch.exp(log_phi - shift) / math.sqrt(w.shape[0])  # (..., N, M)


# --8<-- [end:features]


def key_shift(k: Tensor, w: Tensor, *, root: float = 1.0, rows: int = 1024) -> Tensor:
    """The keys' stabiliser c, (..., 1, 1): the largest log-feature of the keys k * ``root``,
    read ``rows`` keys at a time (no (S, M) tensor) and without gradient (it cancels)."""

    def largest(k_c: Tensor) -> Tensor:
        x = k_c * root  # (..., R, E)
        log_phi = x @ w.T - (x * x).sum(-1, keepdim=True) / 2  # (..., R, M)
        return log_phi.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)

    with torch.no_grad():
        return functools.reduce(torch.maximum, map(largest, k.split(rows, dim=-2)))


def _scaled_maps(
    q: Tensor, w: Tensor, scale: float | None
) -> tuple[FeatureMap, Callable[[Tensor], FeatureMap]]:
    """The feature maps of ``fast_kernel_attention``: x -> φ(x sqrt(scale)) for queries, and
    for keys the same with their shared stabiliser c (module docstring)."""
    root = _root_scale(q, w, scale)

    def feature_q(x: Tensor) -> Tensor:
        return performer_features(x * root, w, is_query=True)  # (..., N, M)

    def key_feature_map(k: Tensor) -> FeatureMap:
        shift = key_shift(k, w, root=root)  # (..., 1, 1)

        def feature_k(x: Tensor) -> Tensor:
            return performer_features(x * root, w, is_query=False, shift=shift)  # (..., N, M)

        return feature_k

    return feature_q, key_feature_map


def _root_scale(q: Tensor, w: Tensor, scale: float | None) -> float:
    """sqrt(scale), after checking W and the scale: exp(scale q·k) = exp((√scale q)·(√scale k))."""
    if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] != q.shape[-1]:
        raise ValueError(
            f"random features must be (M, E) with M >= 1 and E = {q.shape[-1]} (the head dim), "
            f"got shape {tuple(w.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale <= 0:
        raise ValueError(f"Performer approximates exp(scale q·k) and needs scale > 0, got {scale}")
    return scale**0.5  # E^-1/4 by default


def _scaled(q: Tensor, k: Tensor, w: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """φ(q * sqrt(scale)), φ(k * sqrt(scale)): exp(scale q·k) = exp((√scale q)·(√scale k))."""
    root = _root_scale(q, w, scale)
    return performer_features(q * root, w, is_query=True), performer_features(
        k * root, w, is_query=False
    )  # (..., T, M), (..., S, M)


def performer_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    features: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Performer's attention with its T x S weights formed (``dense_kernel_attention``): the
    version to read or plot. Any mask; k and v with as many heads as q.

    Returns:
        The output (..., T, Ev) and the approximate softmax weights (..., T, S).
    """
    phi_q, phi_k = _scaled(q, k, features.to(q.dtype), scale)  # (..., T, M), (..., S, M)
    return dense_kernel_attention(phi_q, phi_k, v, mask)


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    scale: float | None = None,
    n_features: int = DEFAULT_FEATURES,
    seed: int = 0,
    orthogonal: bool = True,
    features: Tensor | None = None,
    is_causal: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Tensor:
    """softmax(q k^T * scale, masked) v, approximated with M positive random features.

    Args:
        q: queries (..., T, E). k: keys (..., S, E). v: values (..., S, Ev); 4-D k and v may
            have fewer heads than q (grouped-query attention).
        mask: None, key padding, causal or both (``linear.split_mask``), True = may attend.
        scale: the softmax's scale; defaults to 1 / sqrt(E).
        n_features: M, when ``features`` is not given; drawn once per (E, M, device, dtype,
            seed, orthogonal) and cached.
        seed: the seed of those features.
        orthogonal: orthogonal random features (FAVOR+) rather than independent ones.
        features: W (M, E) to use instead (e.g. from ``draw_random_features``); it gets no
            gradient (random features are drawn, not learned).
        is_causal: also apply the causal mask (bottom-right aligned), without building it.
        chunk_size: queries per chunk of the causal form.

    Returns:
        The output (..., T, Ev) in the dtype of ``v``, computed in float32 at least.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    if features is None:
        if n_features < 1:
            raise ValueError(f"Performer needs at least one random feature, got {n_features}")
        w = cached_random_features(q.shape[-1], n_features, q.device, dtype, seed, orthogonal)
    else:
        w = features.detach().to(device=q.device, dtype=dtype)  # (M, E)
    feature_q, key_feature_map = _scaled_maps(q, w, scale)
    return fast_kernel_attention(
        q,
        k,
        v,
        mask,
        feature_q=feature_q,
        key_feature_map=key_feature_map,
        is_causal=is_causal,
        chunk_size=chunk_size,
    )  # (..., T, Ev), computed in float32 at least


# M = 256, seed 0, orthogonal features.
performer_backend = kernel_backend(
    "performer",
    lambda q, k, v, mask, scale, is_causal: performer_attention(
        q, k, v, mask, scale=scale, is_causal=is_causal
    ),
)
register_backend("performer", performer_backend, grouped_kv=True, causal=True)


def performer_error_curve(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    n_features: Sequence[int] = (16, 64, 256, 1024),
    seeds: Iterable[int] = range(8),
    orthogonal: bool = True,
) -> list[tuple[int, float]]:
    """How close Performer comes to softmax attention as M grows.

    For each M: the mean absolute difference between Performer's output and
    ``reference_attention``'s, averaged over the random features of each seed. The error
    depends strongly on the inputs: an estimate of exp(q·k) has relative variance about
    (exp(|q' + k'|²) - 1) / M with q' = q sqrt(scale) (Lemma 1 of the paper), so long queries
    and keys need many more features.

    Returns:
        [(M, mean absolute error), ...] in the order of ``n_features``.
    """
    exact, _ = reference_attention(q, k, v, mask)  # (..., T, Ev)
    seeds = list(seeds)
    curve = []
    for m in n_features:
        errors = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            w = draw_random_features(q.shape[-1], m, generator=gen, orthogonal=orthogonal)
            out = performer_attention(q, k, v, mask, features=w)  # (..., T, Ev)
            errors.append((out - exact).abs().mean().item())
        curve.append((m, sum(errors) / len(errors)))
    return curve
