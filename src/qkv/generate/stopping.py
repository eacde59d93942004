"""When a sequence is done: it produced a stop token (the end token among them), or its text
now contains a stop string.

    done_b  =  x_t in stop_ids  or  any(s in decode(y_b) for s in stop_strings)

where x_t is the token just produced and y_b the tokens row b generated so far (the prompt is
not searched, so a stop string inside the prompt does not end generation at once). The token
that completed the stop is kept; what a finished row produces afterwards is replaced by padding.

Shape legend: B batch · N rows (batch, or candidate hypotheses) · t tokens generated so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["StopCondition"]


class StopCondition:
    """Stop token ids and stop strings, checked for a batch of rows at once.

    Args:
        token_ids: ids that end a row (the end-of-sequence id included).
        strings: texts that end a row once its decoded output contains one of them.
        tokenizer: decodes the ids for ``strings`` (required when there are strings).
        device: where the token ids live.

    Example:
        >>> stop = StopCondition([2, 7], [], None, device="cpu")
        >>> stop.token_hits(torch.tensor([7, 3, 2]))
        tensor([ True, False,  True])
    """

    def __init__(
        self,
        token_ids: Sequence[int],
        strings: Sequence[str],
        tokenizer: Tokenizer | None,
        device: torch.device | str,
    ) -> None:
        self.token_ids = tuple(token_ids)
        self.strings = tuple(strings)
        self.tokenizer = tokenizer
        self._ids = torch.tensor(self.token_ids, dtype=torch.long, device=device)  # (n,)
        if self.strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the generated ids")

    @property
    def active(self) -> bool:
        """Whether anything can end a row before the length limit."""
        return bool(self.token_ids or self.strings)

    def token_hits(self, tokens: Tensor) -> Tensor:
        """Which of the tokens just produced (N,) are stop tokens: (N,) bool."""
        if len(self.token_ids) == 1:  # the common case (only EOS): one comparison
            return tokens == self.token_ids[0]  # (N,)
        return torch.isin(tokens, self._ids)  # (N,)

    def string_hits(self, generated: Tensor, rows: Tensor | None = None) -> Tensor:
        """Which rows' decoded text contains a stop string.

        Args:
            generated: (N, t) the ids each row generated so far, newest last.
            rows: (N,) bool, the rows to check (None: all); the others report False.

        Returns:
            (N,) bool.
        """
        hits = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)  # (N,)
        if not self.strings:
            return hits
        assert self.tokenizer is not None
        check = range(generated.shape[0]) if rows is None else rows.nonzero()[:, 0].tolist()
        check = list(check)
        if not check:
            return hits
        texts = self.tokenizer.decode_batch(generated[check].tolist())
        found = [any(s in text for s in self.strings) for text in texts]
        hits[check] = torch.tensor(found, dtype=torch.bool, device=generated.device)
        return hits  # (N,)

    # --8<-- [start:hits]
    def hits(self, tokens: Tensor, generated: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """Stop tokens or stop strings: (N,) bool for the tokens (N,) just appended to
        ``generated`` (N, t); ``generated`` is needed only with stop strings."""
        if self.token_ids:
            done = self.token_hits(tokens)  # (N,)
        else:
            done = torch.zeros_like(tokens, dtype=torch.bool)  # (N,)
        if self.strings:
            assert generated is not None
            open_rows = ~done if rows is None else rows & ~done
            done = done | self.string_hits(generated, open_rows)
        return done  # (N,)

    # --8<-- [end:hits]
