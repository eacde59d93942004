"""Sinusoidal position encodings: a fixed wave pattern added to the token embeddings.

    PE[pos, 2i]     = sin(pos / base^(2i / D))
    PE[pos, 2i + 1] = cos(pos / base^(2i / D))          base = 10000

Vaswani et al., "Attention Is All You Need", 2017 (arXiv:1706.03762), section 3.5.

Attention by itself does not know the order of its inputs: permute the tokens and the outputs
are permuted the same way. The original Transformer adds to each token embedding a vector that
depends only on the token's position. Each pair of dimensions (2i, 2i + 1) is a point on a
circle that turns at its own speed, from one radian per position (i = 0) down to
base^(-(D-2)/D) radians per position (the last pair, close to 1/base for large D), so nearby
positions look alike and far-apart ones do not.

Because sin and cos of (pos + k) are sin and cos of pos turned by a fixed angle, PE[pos + k] is
a linear function of PE[pos] (a rotation of each pair) that does not depend on pos: the paper's
reason to hope the model can attend by relative position. There is nothing to learn, and the
table can be computed for positions never seen in training.

Some implementations keep the same numbers in another column order: Marian (Junczys-Dowmunt
et al., "Marian: Fast Neural Machine Translation in C++", 2018, arXiv:1804.00344) puts all the
sines first, then all the cosines (``interleaved=False``). The order of the columns does not
matter to a model trained with it, but a checkpoint expects the one it was trained with.

Shape legend: B batch · T positions · D model width · N positions in the table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.positional._positions import check_position_ids

__all__ = ["SinusoidalPositionalEncoding", "sinusoidal_table"]


# --8<-- [start:table]
def sinusoidal_table(
    n_positions: int, d_model: int, *, base: float = 10000.0, interleaved: bool = True
) -> Tensor:
    """The table of sinusoidal encodings for positions 0 .. N - 1.

    Sines and cosines are interleaved as in the paper: even columns hold sines, odd columns the
    cosines of the same angles. With ``interleaved=False`` (Marian's layout) the first D/2
    columns hold the sines and the last D/2 the cosines, frequencies in the same order.

    Args:
        n_positions: N, how many positions (rows).
        d_model: D, the embedding width; must be even (one sin and one cos per frequency).
        base: sets the slowest wavelength, 2π · base positions.
        interleaved: True for sin, cos, sin, cos, ...; False for sin, ..., sin, cos, ..., cos.

    Returns:
        (N, D) float32.

    Example:
        >>> sinusoidal_table(2, 4)
        tensor([[0.0000, 1.0000, 0.0000, 1.0000],
                [0.8415, 0.5403, 0.0100, 0.9999]])
        >>> sinusoidal_table(2, 4, interleaved=False)
        tensor([[0.0000, 0.0000, 1.0000, 1.0000],
                [0.8415, 0.0100, 0.5403, 0.9999]])
    """
    if d_model % 2:
        raise ValueError(
            f"d_model={d_model} must be even: each frequency fills two columns (sin, cos)"
        )
    if n_positions < 0:
        raise ValueError(f"n_positions must be non-negative, got {n_positions}")
    # Angles in float64 so that large positions keep their accuracy, then stored as float32.
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(-1)  # (N, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (D/2,)
    angles = pos / base ** (two_i / d_model)  # (N, D/2): pos / base^(2i/D)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (N, D/2, 2)
    if not interleaved:
        table = table.transpose(-1, -2)  # (N, 2, D/2): sines first, then cosines
    return table.flatten(-2).float()  # (N, D): sin, cos, sin, cos, ... (or the two halves)


# --8<-- [end:table]


class SinusoidalPositionalEncoding(nn.Module):
    """Looks up the sinusoidal encodings of given positions, to add to the token embeddings.

    The table is a buffer (it follows ``.to(device)``) but is not saved in the ``state_dict``:
    it is recomputed from ``d_model``, ``max_len`` and ``base``.

    Args:
        d_model: D, the embedding width (even).
        max_len: how many positions the table holds.
        base: see ``sinusoidal_table``.
        interleaved: the column order, see ``sinusoidal_table``; False for Marian's checkpoints.

    Example:
        >>> import torch
        >>> pe = SinusoidalPositionalEncoding(d_model=8, max_len=16)
        >>> tok = torch.randn(2, 5, 8)
        >>> x = tok + pe(torch.arange(5))  # (B, T, D) + (T, D)
        >>> x.shape
        torch.Size([2, 5, 8])
    """

    table: Tensor

    def __init__(
        self, d_model: int, max_len: int = 4096, *, base: float = 10000.0, interleaved: bool = True
    ) -> None:
        super().__init__()
        self.d_model, self.max_len, self.base = d_model, max_len, base
        self.interleaved = interleaved
        table = sinusoidal_table(max_len, d_model, base=base, interleaved=interleaved)  # (N, D)
        self.register_buffer("table", table, persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        """The encodings of ``position_ids``.

        Args:
            position_ids: integer positions, (T,) or (B, T), each in [0, max_len).

        Returns:
            (T, D) or (B, T, D), in the table's dtype (float32 unless the module was cast).
        """
        check_position_ids(position_ids, self.max_len, "max_len")
        return self.table[position_ids]  # (..., T, D)

    def extra_repr(self) -> str:
        layout = "" if self.interleaved else ", interleaved=False"
        return f"d_model={self.d_model}, max_len={self.max_len}, base={self.base}{layout}"
