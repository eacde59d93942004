"""Sentence embeddings of passages and questions, and a cache of them on disk.

A sentence encoder turns a text into one vector whose direction carries its meaning:
all-MiniLM-L6-v2 (a 6-layer BERT, page 6) runs over the word pieces, and the vectors of the
real tokens are averaged and scaled to length 1 (Sentence-BERT, Reimers & Gurevych 2019,
arXiv:1908.10084)::

    e = normalize( (1/|real|) Σ_{t real} h_t )          h_t: the last layer's state at t

so that the dot product of two embeddings is their cosine similarity. This is exactly what the
sentence-transformers library computes for this model: its pooling module averages with the
attention mask, its Normalize module divides by the L2 norm, and it cuts every text at
``MAX_TOKENS = 256`` word pieces (``sentence_bert_config.json``; the tokenizer file says 128,
which sentence-transformers overrides). ``tests/rag`` holds the two to 1e-5.

Embedding all of Python's help topics takes a minute or more on a CPU, so the embeddings of a
passage list are saved as safetensors under a key that names both what was embedded and by
what: a SHA-256 over the encoder's fingerprint (every weight, the tokenizer, the length limit)
and the passages' texts. A changed passage, model or limit is a new key, never a stale file.

Shape legend: B batch · T positions · D model width · N passages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from qkv._io import atomic_write
from qkv.interop.pretrained import from_pretrained
from qkv.models.bert import Bert, BertConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["MAX_TOKENS", "Encoder", "default_cache_dir", "embed_passages"]

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
BATCH_SIZE = 32
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Where passage embeddings are cached: ``~/.cache/qkv/retrieval``."""
    return Path.home() / ".cache" / "qkv" / "retrieval"


class Encoder:
    """A BERT sentence encoder with its tokenizer: texts in, unit vectors (N, D) out.

    Args:
        model: a ``Bert`` (``qkv.from_pretrained("minilm")``), used in eval mode.
        tokenizer: its ``tokenizers.Tokenizer``.
        max_tokens: texts are cut to this many word pieces, [CLS] and [SEP] included.
    """

    def __init__(self, model: Bert, tokenizer: Tokenizer, max_tokens: int = MAX_TOKENS) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = cast(BertConfig, model.config).d_model  # D, the width of an embedding
        self._fingerprint: str | None = None
        self._set_lengths()

    def _set_lengths(self) -> None:
        """No padding (batches pad themselves), texts cut at ``max_tokens``: set before every
        use, as the tokenizer may be shared with code that sets otherwise."""
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)

    @classmethod
    def load(cls, name: str | os.PathLike[str] = "minilm", max_tokens: int = MAX_TOKENS) -> Encoder:
        """The encoder of a checkpoint name or directory (default: the packaged MiniLM)."""
        model, tokenizer = from_pretrained(name, return_tokenizer=True)
        if not isinstance(model, Bert):
            raise ValueError(
                f"{name} holds a {type(model).__name__}; a sentence encoder is a BERT "
                "(pass 'minilm' or the directory of a BERT checkpoint)"
            )
        return cls(model, tokenizer, max_tokens)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over every weight, the tokenizer and the length limit: what the vectors
        depend on. Computed once (it reads every weight)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"max_tokens={self.max_tokens}\n".encode())
            self._set_lengths()  # the tokenizer's settings are part of its text
            h.update(self.tokenizer.to_str().encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # --8<-- [start:embed]
    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> Tensor:
        """Unit-length embeddings of ``texts``, (N, D) float32, in the order given.

        Texts are embedded in batches of similar length (sorted by word-piece count), so that
        little of each batch is padding; the result is put back in the original order.
        """
        if not texts:
            return torch.zeros(0, self.dim)  # (0, D)
        self._set_lengths()
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = torch.empty(len(texts), self.dim)  # (N, D)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), 0 = [PAD]
            attention_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):
                ids = encodings[i].ids
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention_mask[r, : len(ids)] = 1
            # Mean of the real tokens' last states, scaled to length 1 (bert.sentence_embedding).
            out[rows] = self.model.embed(input_ids, attention_mask).float()  # (B, D)
        return out

    # --8<-- [end:embed]


def _cache_key(encoder: Encoder, texts: Sequence[str]) -> str:
    h = hashlib.sha256(f"format={CACHE_FORMAT}\nencoder={encoder.fingerprint}\n".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)  # lengths keep the boundaries
    return h.hexdigest()[:32]


# --8<-- [start:embed_passages]
def embed_passages(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = BATCH_SIZE,
) -> Tensor:
    """The embeddings of ``texts`` (N, D), read from ``cache_dir`` when they were made before.

    Args:
        encoder: the sentence encoder.
        texts: the passages' texts, in order.
        cache_dir: where embeddings are kept (``<key>.safetensors``); None: no cache.
        batch_size: texts per forward pass.
    """
    if cache_dir is None:
        return encoder.embed(texts, batch_size)
    path = Path(cache_dir) / f"passages-{_cache_key(encoder, texts)}.safetensors"
    if path.is_file():
        embeddings = load_file(path)["embeddings"]  # (N, D)
        if embeddings.shape[0] == len(texts):
            log.info("read %d passage embeddings from %s", len(texts), path)
            return embeddings
    embeddings = encoder.embed(texts, batch_size)  # (N, D)
    meta: dict[str, Any] = {"passages": len(texts), "encoder": encoder.fingerprint}
    atomic_write(
        path,
        lambda tmp: save_file(
            {"embeddings": embeddings.contiguous()}, tmp, metadata={"qkv": json.dumps(meta)}
        ),
    )
    log.info("embedded %d passages, cached in %s", len(texts), path)
    return embeddings


# --8<-- [end:embed_passages]
