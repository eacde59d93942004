"""Learned absolute position embeddings: one trained vector per position.

    x_t = TokenEmbedding(token_t) + P[t]          P is a trainable (max_len, D) matrix

Gehring et al., "Convolutional Sequence to Sequence Learning", 2017 (arXiv:1705.03122);
used by BERT (arXiv:1810.04805) and GPT-2. Vaswani et al., 2017 (arXiv:1706.03762), section 3.5,
found it works about as well as the fixed sinusoids.

Instead of a fixed formula (``sinusoidal.py``), the model learns what each position should add
to its token. The price: the table has a row for each of ``max_len`` positions only, and a model
has never learned anything about a position beyond the longest sequence it was trained on.

Shape legend: B batch · T positions · D model width.
"""

from __future__ import annotations

from torch import Tensor, nn

from qkv.positional._positions import check_position_ids

__all__ = ["LearnedPositionalEmbedding"]


# --8<-- [start:learned]
class LearnedPositionalEmbedding(nn.Module):
    """A trainable vector for each position, looked up and added to the token embeddings.

    Args:
        max_len: how many positions have a vector.
        d_model: D, the embedding width.
        offset: position t reads row t + offset; the first ``offset`` rows are never read.
            BART's checkpoints use 2 (fairseq counted positions from ``pad_token_id + 1``).

    Attributes:
        emb: the ``nn.Embedding(max_len + offset, d_model)``; initialised from N(0, 0.02²) as
            in GPT-2 and BERT.

    Example:
        >>> import torch
        >>> pe = LearnedPositionalEmbedding(max_len=16, d_model=8)
        >>> pe(torch.arange(5)).shape, pe(torch.arange(5).expand(2, 5)).shape
        (torch.Size([5, 8]), torch.Size([2, 5, 8]))
    """

    def __init__(self, max_len: int, d_model: int, *, offset: int = 0) -> None:
        super().__init__()
        if offset < 0:
            raise ValueError(f"offset must be non-negative, got {offset}")
        self.max_len, self.d_model, self.offset = max_len, d_model, offset
        self.emb = nn.Embedding(max_len + offset, d_model)  # weight (max_len + offset, D)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, position_ids: Tensor) -> Tensor:
        """The embeddings of ``position_ids``.

        Args:
            position_ids: integer positions, (T,) or (B, T), each in [0, max_len).

        Returns:
            (T, D) or (B, T, D), in the dtype of the weights.
        """
        check_position_ids(position_ids, self.max_len, "max_len")
        if self.offset:
            position_ids = position_ids + self.offset  # (T,) or (B, T): the rows to read
        return self.emb(position_ids)  # (..., T, D)


# --8<-- [end:learned]
