"""Attention in NumPy: the same equation with no PyTorch at all.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias, masked) V

For learners, a version whose every operation is plain array arithmetic; for the tests, an
independent oracle computed in float64 that the PyTorch paths must agree with.

Shape legend: T query positions · S key/value positions · E head dim; "..." is any leading
dimensions, e.g. (B, H). Query heads may outnumber key/value heads (grouped-query attention) in
the third-from-last dimension.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["scaled_dot_product_attention", "softmax"]


# --8<-- [start:numpy]
def softmax(x: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    """exp(x) / sum(exp(x)), shifted by the row maximum so that exp never overflows."""
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    scale: float | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Attention in float64 NumPy; returns (output (..., T, Ev), weights (..., T, S)).

    ``mask`` is boolean, True = may attend; a query with no visible key gets zero weights and a
    zero output.

    >>> import numpy as np
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.eye(2)
    >>> out, w = scaled_dot_product_attention(q, k, v, scale=1.0)
    >>> np.round(w, 4)
    array([[0.7311, 0.2689]])
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:  # grouped-query: share each key/value head
        n_rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, n_rep, axis=-3), np.repeat(v, n_rep, axis=-3)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * scale  # (..., T, S)
    if bias is not None:
        scores = scores + np.asarray(bias, dtype=np.float64)
    if mask is None:
        weights = softmax(scores)
    else:
        allowed = np.broadcast_to(np.asarray(mask, dtype=bool), scores.shape)
        scores = np.where(allowed, scores, -np.inf)
        any_key = allowed.any(axis=-1, keepdims=True)
        # Rows with no visible key: softmax over an all -inf row is undefined; define it as zeros.
        safe = np.where(any_key, scores, 0.0)
        weights = np.where(allowed, softmax(safe), 0.0)
    return weights @ v, weights  # (..., T, Ev), (..., T, S)


# --8<-- [end:numpy]
