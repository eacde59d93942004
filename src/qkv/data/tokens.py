"""Token files: a corpus tokenized once into memory-mapped arrays of ids, cached on disk.

Tokenizing is slow next to reading ids back, so a corpus is tokenized once, streamed chunk by
chunk (memory stays bounded), into two flat files of ids::

    cache_dir/tokens/<key>/train.bin   ids of the first (1 - val_fraction) of the text's bytes
    cache_dir/tokens/<key>/val.bin     ids of the last val_fraction: the held-out validation text
    cache_dir/tokens/<key>/meta.json   dtype, token counts, where the text was cut

Ids are stored as uint16 when every id fits (V <= 65536), else uint32, and read back with
``numpy.memmap``: the operating system pages in only the windows a batch touches, so corpora
larger than memory work. After each document the tokenizer's end-of-text token (``<eos>``,
``</s>``, ``<|endoftext|>``, or ``[SEP]`` for WordPiece) is appended, when it has one.

The ``<key>`` hashes the corpus *contents* (one full read, which ``TextCorpus.scan`` may
remember by the files' sizes and modification times; a changed file always gets a new entry),
the tokenizer's JSON and the split; a repeated build with the same inputs reads the cached
files and tokenizes nothing. An entry is written into a temporary folder and renamed into
place when complete, so a crash leaves no half-written entry behind (after a hard kill, only
a ``.qkv-tmp-*`` folder that is never read and may be deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from qkv._io import TMP_PREFIX, atomic_write_json
from qkv.data.corpora import CorpusInfo, TextCorpus, char_boundary
from qkv.data.tokenizers import special_ids, tokenizer_fingerprint

__all__ = ["TokenFiles", "token_dtype", "tokenize_to_file", "val_start"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Text handed to the tokenizer at once, in pieces it encodes in parallel. The library's
# per-token records cost about 100 bytes each while a batch is encoded, so this bounds memory.
ENCODE_BATCH_BYTES = 1 << 20
PIECE_BYTES = 128 << 10

Progress = Callable[[int, int], None]


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id ``0 .. vocab_size - 1`` fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit in 32-bit token ids")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def val_start(total_bytes: int, val_fraction: float) -> int:
    """The byte where the validation text starts: the last ``val_fraction`` is held out."""
    return total_bytes - round(val_fraction * total_bytes)


@dataclass(frozen=True)
class TokenFiles:
    """The two memory-mapped id arrays of a tokenized corpus, and their metadata."""

    directory: Path
    train: np.ndarray[Any, Any]  # (N_train,) uint16 or uint32, read-only memmap
    val: np.ndarray[Any, Any]  # (N_val,)
    meta: dict[str, Any]


def _id_space(tokenizer: Tokenizer) -> int:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def _open(directory: Path) -> TokenFiles:
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def load(name: str, count: int) -> np.ndarray[Any, Any]:
        if count == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=dtype)
        return np.memmap(directory / name, dtype=dtype, mode="r", shape=(count,))

    train = load("train.bin", meta["train_tokens"])
    val = load("val.bin", meta["val_tokens"])
    return TokenFiles(directory=directory, train=train, val=val, meta=meta)


# --8<-- [start:tokenize]
def tokenize_to_file(
    corpus: TextCorpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
    info: CorpusInfo | None = None,
) -> TokenFiles:
    """Tokenize ``corpus`` into ``train.bin`` / ``val.bin`` under ``cache_dir``, or reuse them.

    Args:
        corpus: the text (see ``qkv.data.corpora.resolve_text_corpus``).
        tokenizer: encodes the text; its special tokens are not added around chunks.
        cache_dir: where token files are cached (``cache_dir/tokens/<key>/``).
        val_fraction: the last fraction of the text's bytes becomes the validation split.
        progress: called as ``progress(bytes_done, bytes_total)`` while tokenizing; never
            called when the files come from the cache.
        info: the corpus's ``scan()`` result, when the caller already has it.

    Returns:
        The memory-mapped token files.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    info = info or corpus.scan()
    key_text = json.dumps(
        {
            "format": FORMAT_VERSION,
            "corpus": info.digest,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    root = Path(cache_dir) / "tokens"
    directory = root / key
    if (directory / "meta.json").is_file():
        logger.info("token files of %s found in the cache at %s", corpus.name, directory)
        return _open(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        meta = _write_tokens(corpus, tokenizer, tmp, info, val_fraction, progress)
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (directory / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "tokenized %s: %d train and %d validation tokens in %s",
        corpus.name,
        meta["train_tokens"],
        meta["val_tokens"],
        directory,
    )
    return _open(directory)


# --8<-- [end:tokenize]


def _write_tokens(
    corpus: TextCorpus,
    tokenizer: Tokenizer,
    directory: Path,
    info: CorpusInfo,
    val_fraction: float,
    progress: Progress | None,
) -> dict[str, Any]:
    if tokenizer.padding is not None or tokenizer.truncation is not None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy we may change
        tokenizer.no_padding()
        tokenizer.no_truncation()
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    dtype = token_dtype(_id_space(tokenizer))
    ids = special_ids(tokenizer)
    end_of_text = ids.eos if ids.eos is not None else ids.sep
    total = info.total_bytes
    cut = val_start(total, val_fraction)  # first byte of the validation text
    counts = {"train": 0, "val": 0}
    done = 0
    # Pending text pieces: (split, text, append end-of-text after it).
    pending: list[tuple[str, str, bool]] = []
    pending_bytes = 0

    with open(directory / "train.bin", "wb") as train_f, open(directory / "val.bin", "wb") as val_f:
        files = {"train": train_f, "val": val_f}

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            encodings = encode([t for _, t, _ in pending], add_special_tokens=False)
            for (split, _, ends), enc in zip(pending, encodings, strict=True):
                row = list(enc.ids)
                if ends and end_of_text is not None:
                    row.append(end_of_text)
                np.asarray(row, dtype=dtype).tofile(files[split])
                counts[split] += len(row)
            pending, pending_bytes = [], 0
            if progress is not None:
                progress(done, total)

        position = 0  # bytes of the corpus read so far
        for piece, is_last_piece in _pieces_with_ends(corpus):
            parts: list[tuple[str, bytes]] = []
            if position < cut < position + len(piece):
                at = char_boundary(piece, cut - position)
                parts = [("train", piece[:at]), ("val", piece[at:])]
            else:
                parts = [("train" if position < cut else "val", piece)]
            position += len(piece)
            for n, (split, data) in enumerate(parts):
                last = is_last_piece and n == len(parts) - 1
                if data or last:
                    pending.append((split, data.decode("utf-8"), last))
                    pending_bytes += len(data)
            done = position
            if pending_bytes >= ENCODE_BATCH_BYTES:
                flush()
        flush()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())

    return {
        "format": FORMAT_VERSION,
        "corpus": corpus.name,
        "corpus_digest": info.digest,
        "total_bytes": total,
        "val_start_byte": cut,
        "val_fraction": val_fraction,
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "end_of_text_id": end_of_text,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
    }


def _pieces_with_ends(corpus: TextCorpus) -> Iterator[tuple[bytes, bool]]:
    """``(bytes, whether a document ends with them)`` in pieces of about PIECE_BYTES."""
    previous: tuple[int, bytes] | None = None
    for index, piece in corpus.chunks(PIECE_BYTES):
        if previous is not None:
            yield previous[1], previous[0] != index
        previous = (index, piece)
    if previous is not None:
        yield previous[1], True
