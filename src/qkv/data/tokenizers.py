"""Tokenizers: text to integer ids and back, through the Hugging Face ``tokenizers`` library.

A model sees integers. A tokenizer fixes a vocabulary of V pieces and turns text into the ids of
those pieces; ``decode`` turns ids back into text. Three ways to choose the pieces:

    character   every character of the training text is a piece. Small V, long sequences, and
                nothing to learn: the easiest to read and to debug.
    byte BPE    start from the 256 byte values and repeatedly merge the most frequent adjacent
                pair into a new piece until V pieces exist (Sennrich et al., "Neural Machine
                Translation of Rare Words with Subword Units", 2016, arXiv:1508.07909; on bytes
                as in GPT-2). Any string is representable, so decode(encode(s)) == s always.
    WordPiece   BERT's subwords: a word is split into the longest pieces of the vocabulary,
                continuation pieces marked "##" (Wu et al., 2016, arXiv:1609.08144). Text is
                lowercased and spaces are normalised, so decoding gives back normalised text.

Every tokenizer here is a real ``tokenizers.Tokenizer``: it saves to one ``tokenizer.json``
that ``qkv.from_pretrained(..., return_tokenizer=True)`` loads next to a checkpoint.

Special tokens (padding, begin/end of sequence, mask) are registered as *special* added tokens:
``decode`` drops them by default (``skip_special_tokens=True``), and their literal text in an
input (``"<eos>"``) is encoded as the special token, not as characters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "CHAR_SPECIAL_TOKENS",
    "WORDPIECE_SPECIAL_TOKENS",
    "SpecialIds",
    "char_tokenizer",
    "load_tokenizer",
    "special_ids",
    "train_bpe",
    "train_wordpiece",
]

# Ids 0..4 of every character vocabulary, in this order (padding is id 0).
CHAR_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")
# Byte-level BPE needs no unknown token: every byte is in the base vocabulary.
BPE_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>")
# BERT's specials, in the order of the original vocabulary files' first entries.
WORDPIECE_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

TextSource = Iterable[str] | Sequence[os.PathLike[str]]


def _special(tokens: Iterable[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


# --8<-- [start:char]
def char_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str] = CHAR_SPECIAL_TOKENS,
    unk_token: str = "<unk>",
) -> Tokenizer:
    """A character-level tokenizer whose vocabulary is every character of ``texts``.

    Ids: the special tokens first (``<pad>`` = 0, ``<unk>``, ``<bos>``, ``<eos>``, ``<mask>``),
    then the characters in code-point order. A character that was not in ``texts`` encodes to
    ``unk_token``, which ``decode`` drops like every special token; so ``decode(encode(s)) == s``
    for any ``s`` made of seen characters.

    Args:
        texts: the training text, in pieces of any size (read once).
        special_tokens: the special tokens, given the first ids in this order.
        unk_token: the token for unseen characters; must be one of ``special_tokens``.

    Returns:
        A ``tokenizers.Tokenizer`` (word-level model over single characters).

    Example:
        >>> tok = char_tokenizer(["hello"])
        >>> tok.encode("hole").ids
        [6, 8, 7, 5]
        >>> tok.decode(tok.encode("hole").ids)
        'hole'
    """
    if unk_token not in special_tokens:
        raise ValueError(f"unk_token {unk_token!r} must be one of the special tokens")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens {list(special_tokens)} repeat a token")
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for ch in sorted(seen):
        vocab.setdefault(ch, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    # Every character is its own pre-token ([\s\S] matches any character, newlines included).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join the pieces with nothing between them
    tokenizer.add_special_tokens(_special(special_tokens))
    return tokenizer


# --8<-- [end:char]


def _split_source(source: TextSource) -> tuple[list[str], Iterator[str] | None]:
    """Files (path-like items) or an iterator of texts (str items); peeks at the first item."""
    if isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "pass a list of paths (pathlib.Path) or an iterable of texts, not a single "
            f"{type(source).__name__}"
        )
    items: Iterator[Any] = iter(source)
    first = next(items, None)
    if first is None:
        raise ValueError("the training text is empty: pass at least one file or text")
    if isinstance(first, os.PathLike):
        files = [os.fspath(first), *(os.fspath(p) for p in items)]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"tokenizer training file {f} does not exist")
        return files, None
    if not isinstance(first, str):
        raise TypeError(f"training items must be str texts or paths, got {type(first).__name__}")
    return [], chain([first], items)


def _train(tokenizer: Tokenizer, source: TextSource, trainer: trainers.Trainer) -> None:
    files, texts = _split_source(source)
    if texts is None:
        tokenizer.train(files, trainer)
    else:
        tokenizer.train_from_iterator(texts, trainer)


# --8<-- [start:bpe]
def train_bpe(
    source: TextSource,
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = BPE_SPECIAL_TOKENS,
    *,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer, GPT-2 style, on files or texts.

    Text is first split into words by GPT-2's pattern (no space added in front), each word's
    UTF-8 bytes are mapped to 256 printable stand-in characters, and merges are learned over
    those; the byte-level decoder maps them back. ``decode(encode(s)) == s`` for every string
    (empty, emoji, CJK, control characters), as long as ``s`` does not contain a special
    token's literal text.

    Args:
        source: ``pathlib.Path`` items are files to read; ``str`` items are texts.
        vocab_size: V, including the 256 byte pieces and the special tokens.
        special_tokens: added first, ids 0, 1, ... in this order.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        A ``tokenizers.Tokenizer``.

    Example:
        >>> tok = train_bpe(["low lower lowest"] * 10, vocab_size=300)
        >>> tok.decode(tok.encode("lowest 🙂").ids)
        'lowest 🙂'
    """
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
            f"{minimum} (256 bytes + {len(special_tokens)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _train(tokenizer, source, trainer)
    return tokenizer


# --8<-- [end:bpe]


def train_wordpiece(
    source: TextSource,
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = WORDPIECE_SPECIAL_TOKENS,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer on files or texts.

    BERT's normaliser (control characters removed, spaces around CJK characters, optional
    lowercasing), its pre-tokenizer (split on whitespace and punctuation), "##" continuation
    pieces, and ``[CLS] text [SEP]`` added by ``encode`` (pass ``add_special_tokens=False`` to
    leave them out).

    Args:
        source: ``pathlib.Path`` items are files to read; ``str`` items are texts.
        vocab_size: V, including the special tokens.
        special_tokens: must contain ``[UNK]``, ``[CLS]`` and ``[SEP]``.
        lowercase: lowercase and strip accents, as the uncased BERT models do.
        min_frequency: a piece must occur this often to be kept.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    for needed in ("[UNK]", "[CLS]", "[SEP]"):
        if needed not in special_tokens:
            raise ValueError(f"WordPiece special tokens must include {needed}")
    if vocab_size <= len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for pieces after "
            f"{len(special_tokens)} special tokens"
        )
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special(special_tokens),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    _train(tokenizer, source, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one inside a directory), without padding or truncation.

    Raises:
        FileNotFoundError: nothing is at ``path``, or the directory has no tokenizer.json.
        ValueError: the file is not a tokenizer the library can read.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer file at {p}; pass a tokenizer.json or its folder")
    try:
        tokenizer = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{p} is not a valid tokenizer.json ({first_line})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """The tokenizer's canonical JSON, for cache keys (same tokenizer, same string)."""
    return json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)


# Names each role goes by in common vocabularies (qkv's own first).
_ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
}


@dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """The ids of a tokenizer's special tokens by role (None where it has no such token)."""

    pad: int | None
    unk: int | None
    bos: int | None
    eos: int | None
    mask: int | None
    cls: int | None
    sep: int | None
    all: tuple[int, ...]  # every special added token, sorted


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Find the padding, unknown, begin, end, mask, CLS and SEP ids by their usual names.

    Example:
        >>> special_ids(char_tokenizer(["ab"])).eos
        3
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)

    def find(role: str) -> int | None:
        for name in _ROLE_NAMES[role]:
            if name in vocab:
                return vocab[name]
        return None

    added = tokenizer.get_added_tokens_decoder()
    return SpecialIds(
        pad=find("pad"),
        unk=find("unk"),
        bos=find("bos"),
        eos=find("eos"),
        mask=find("mask"),
        cls=find("cls"),
        sep=find("sep"),
        all=tuple(sorted(i for i, t in added.items() if t.special)),
    )
