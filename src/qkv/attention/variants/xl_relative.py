"""Transformer-XL's relative attention: content and distance scored apart, over memory + segment.

    score_ij = (q_i + u) · k_j  +  (q_i + v) · r_{i-j}          then scaled by 1/sqrt(E)
               (a) content        (b) position

    q_i = W_q h_i       k_j = W_k h~_j       r_d = W_R R_d       h~ = [SG(m); h]

Dai et al., "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", 2019
(arXiv:1901.02860), section 3.3 (the four terms) and appendix B (the shift).

The paper expands q_i · k_j with absolute positions into four terms and makes three changes:
the key's absolute position becomes the distance i - j, encoded by a fixed sinusoid R_{i-j}
with its own key projection W_R; and the query's absolute position, in the two terms where it
only says "some query", becomes a learned vector per head, u (for content) and v (for
position). Grouped by what the query meets, that is two terms:

    (a) (q_i + u) · k_j        content: how well key j's token fits the query, plus how
                               interesting key j is to any query (u · k_j)
    (b) (q_i + v) · r_{i-j}    position: how much the query likes distance i - j, plus how
                               much any query does (v · r_{i-j})

Keys and values come from h~ = [SG(m); h]: the memory m (the previous segment's states of this
layer, under a stop-gradient) followed by the current segment h, so S = M + T. Query i sits at
position M + i of h~; the causal mask is aligned bottom-right, so it sees all of the memory and
its own segment up to itself; the distances it meets are 0 .. M + i.

Computing (b): scoring every query against every (query, key) pair's vector r_{i-j} gathers a
(T, S, E) tensor per head (``xl_position_scores_reference``, the plain version). Appendix B's
trick instead scores each query once against the S vectors r_{S-1}, ..., r_0, a plain matrix
product, and then slides row i left by T - 1 - i so that each key lands on its distance
(``relative_shift``). The shift is the fast path used here, because it is the paper's own; the
tests hold it equal to the plain version on every position the causal mask keeps.

Shape legend: B batch · T query positions (the segment) · M memory positions ·
S key/value positions (M + T) · D model width · H heads · E head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.attention.core import scaled_dot_product_attention
from qkv.attention.masks import causal as causal_mask
from qkv.positional._positions import aligned_positions
from qkv.positional.sinusoidal import sinusoidal_table

__all__ = [
    "XLRelativeAttention",
    "relative_shift",
    "xl_position_scores",
    "xl_position_scores_reference",
]


# --8<-- [start:shift]
def relative_shift(scores: Tensor) -> Tensor:
    """Appendix B's shift: row i of ``scores`` slides left by T - 1 - i.

    Column k of the input holds distance S - 1 - k (the S distances in falling order, the same
    for every row). Query i sits at position S - T + i, so key j is at distance
    S - T + i - j, which was column j + T - 1 - i: each row must move left by T - 1 - i. A zero
    column in front, then reading the same numbers as (S + 1, T) and dropping the first row,
    does exactly that without an index. Entries for the future (j > S - T + i) get whatever
    the slide brings in; the causal mask hides them::

        T = 2, S = 3 (tens: query, units: distance)     12 11 10   ->   11 10  0
                                                        22 21 20        22 21 20

    Args:
        scores: (..., T, S) with S >= T, column k for distance S - 1 - k.

    Returns:
        (..., T, S): entry (i, j) holds distance S - T + i - j where that is >= 0.

    Example:
        >>> relative_shift(torch.tensor([[12, 11, 10], [22, 21, 20]]))
        tensor([[11, 10,  0],
                [22, 21, 20]])
    """
    *lead, t, s = scores.shape
    padded = F.pad(scores, (1, 0))  # (..., T, S + 1): a zero column in front
    padded = padded.reshape(*lead, s + 1, t)  # (..., S + 1, T): the same numbers, re-cut
    return padded[..., 1:, :].reshape(*lead, t, s)  # (..., T, S): the first T numbers dropped


# --8<-- [end:shift]


def xl_position_scores(q: Tensor, r: Tensor) -> Tensor:
    """Term (b) by the shift: (q_i + v) · r_{i-j}, given ``q`` that already holds q + v.

    Args:
        q: queries plus v, (B, H, T, E).
        r: r[..., d, :] = W_R R_d for the distances d = 0 .. S - 1, (H, S, E).

    Returns:
        (B, H, T, S), unscaled; entries where key j is in query i's future are arbitrary.
    """
    scores = q @ r.flip(-2).transpose(-2, -1)  # (B, H, T, S): column k for distance S - 1 - k
    return relative_shift(scores)  # (B, H, T, S): column j for distance S - T + i - j


def xl_position_scores_reference(q: Tensor, r: Tensor) -> Tensor:
    """Term (b), the plain way: gather r_{i-j} for every pair (i, j), then one dot product each.

    Same arguments and result as ``xl_position_scores``, with the future's entries set to the
    score of distance 0 (the mask hides them either way). Memory O(T · S · E) per head.
    """
    t, s = q.shape[-2], r.shape[-2]
    query_pos, key_pos = aligned_positions(t, s, device=q.device)  # (T, 1), (1, S)
    distance = (query_pos - key_pos).clamp(min=0)  # (T, S): i - j, the future clamped to 0
    r_pairs = r[:, distance]  # (H, T, S, E): the vector r_{i-j} of each pair
    return torch.einsum("bhte,htse->bhts", q, r_pairs)  # (B, H, T, S)


class XLRelativeAttention(nn.Module):
    """Multi-head attention over [memory; segment] with Transformer-XL's relative positions.

    Args:
        d_model: D.
        n_heads: H; E = D / H.
        bias: whether q_proj, k_proj, v_proj and out_proj have biases (the paper's have none).
        dropout: dropout on the attention weights while training.
        attn_impl: the attention backend, see ``qkv.scaled_dot_product_attention``.

    Attributes:
        pos_proj: W_R, the key projection of the sinusoids R_d, per head.
        u_bias: u, (H, E), the query's stand-in in the content term.
        v_bias: v, (H, E), the query's stand-in in the position term.

    Example:
        >>> attn = XLRelativeAttention(d_model=16, n_heads=4)
        >>> x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
        >>> attn(x, memory).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        bias: bool = False,
        dropout: float = 0.0,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if d_model % 2:
            raise ValueError(f"d_model={d_model} must be even: R_d has a sin and a cos per pair")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout, self.attn_impl = dropout, attn_impl
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)  # W_R
        self.u_bias = nn.Parameter(torch.empty(n_heads, self.head_dim))  # u
        self.v_bias = nn.Parameter(torch.empty(n_heads, self.head_dim))  # v
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        nn.init.normal_(self.u_bias, std=0.02)
        nn.init.normal_(self.v_bias, std=0.02)

    def _split_heads(self, x: Tensor) -> Tensor:
        *lead, n, _ = x.shape
        return x.view(*lead, n, self.n_heads, self.head_dim).transpose(-3, -2)  # (..., H, n, E)

    # --8<-- [start:forward]
    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        """Attend from the segment ``x`` to the memory and to itself, causally.

        Args:
            x: the segment, (B, T, D).
            memory: the previous segment's states of this layer, (B, M, D), or None (M = 0);
                no gradient flows into it.

        Returns:
            (B, T, D).
        """
        b, t, _ = x.shape
        # h~ = [SG(m); h]: the memory first, cut from the graph (the paper's stop-gradient).
        context = x if memory is None else torch.cat([memory.detach(), x], dim=1)  # (B, S, D)
        s = context.shape[1]
        q = self._split_heads(self.q_proj(x))  # (B, H, T, E)
        k = self._split_heads(self.k_proj(context))  # (B, H, S, E)
        v = self._split_heads(self.v_proj(context))  # (B, H, S, E)
        # R_d for the distances d = 0 .. S - 1 (the sinusoids of section 3.3), then W_R per head.
        table = sinusoidal_table(s, self.d_model, interleaved=False)  # (S, D)
        r = self._split_heads(self.pos_proj(table.to(x.device, x.dtype)))  # (H, S, E)
        u = self.u_bias.to(q.dtype)[:, None, :]  # (H, 1, E), in q's dtype (autocast)
        v_pos = self.v_bias.to(q.dtype)[:, None, :]  # (H, 1, E)
        scale = self.head_dim**-0.5
        # (b) position: (q_i + v) · r_{i-j}, by the shift; added to the scores as a bias.
        position = xl_position_scores(q + v_pos, r) * scale  # (B, H, T, S)
        # (a) content: (q_i + u) · k_j, by the attention itself; bottom-right causal mask.
        mask = causal_mask(t, s, device=x.device)  # (T, S)
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(
            q + u, k, v, mask, bias=position, scale=scale, dropout_p=dropout_p, impl=self.attn_impl
        )  # (B, H, T, E)
        out = out.transpose(1, 2).reshape(b, t, self.d_model)  # (B, T, D)
        return self.out_proj(out)  # (B, T, D)

    # --8<-- [end:forward]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}"
