"""Token files: dtype, the validation cut, cache hits and misses, crash safety."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qkv.data.corpora import resolve_text_corpus
from qkv.data.tokenizers import char_tokenizer, train_bpe
from qkv.data.tokens import token_dtype, tokenize_to_file


class Counter:
    """A progress callback that remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def test_dtype_fits_the_largest_id() -> None:
    assert token_dtype(100) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0 .. 65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32
    with pytest.raises(ValueError, match="positive"):
        token_dtype(0)


def test_large_vocabulary_is_stored_as_uint32(tmp_path: Path) -> None:
    # 70,000 distinct characters (surrogates excluded): ids go past 65535.
    chars = "".join(chr(c) for c in range(0x100, 0x100 + 72_000) if not 0xD800 <= c < 0xE000)
    assert len(set(chars)) > 65_600
    tok = char_tokenizer([chars])
    (tmp_path / "big.txt").write_text(chars[::-1][:70_000], encoding="utf-8")
    files = tokenize_to_file(resolve_text_corpus(str(tmp_path / "big.txt")), tok, tmp_path)
    assert files.train.dtype == np.uint32 and files.meta["dtype"] == "uint32"
    assert int(files.train.max()) > 65535
    assert tok.decode(files.train.tolist()) + tok.decode(files.val.tolist()) == chars[::-1][:70_000]


def test_small_vocabulary_is_stored_as_uint16(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world\n" * 100, encoding="utf-8")
    tok = char_tokenizer(["hello world\n"])
    files = tokenize_to_file(resolve_text_corpus(str(tmp_path / "t.txt")), tok, tmp_path)
    assert files.train.dtype == np.uint16
    assert (tmp_path / "tokens").is_dir()
    assert isinstance(files.train, np.memmap)
    assert (files.directory / "train.bin").stat().st_size == 2 * len(files.train)


def test_validation_is_the_last_fraction_of_the_text(tmp_path: Path) -> None:
    corpus = resolve_text_corpus("python-docs")
    text = "".join(corpus.texts())
    tok = char_tokenizer([text])
    files = tokenize_to_file(corpus, tok, tmp_path, val_fraction=0.1)
    val_text = tok.decode(files.val.tolist())
    train_text = tok.decode(files.train.tolist())
    assert train_text + val_text == text
    assert text.endswith(val_text)
    # 10% of the bytes, measured in bytes (the cut is on a character boundary).
    assert abs(len(val_text.encode()) - 0.1 * len(text.encode())) <= 4
    assert files.meta["val_start_byte"] == len(train_text.encode())


def test_second_build_is_a_cache_hit_and_a_change_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox\n" * 200, encoding="utf-8")
    tok = char_tokenizer(["the quick brown fox jumps\n"])
    first = Counter()
    a = tokenize_to_file(resolve_text_corpus(str(path)), tok, tmp_path / "cache", progress=first)
    assert first.calls and first.calls[-1] == (4000, 4000)
    again = Counter()
    b = tokenize_to_file(resolve_text_corpus(str(path)), tok, tmp_path / "cache", progress=again)
    assert again.calls == []  # nothing tokenized the second time
    assert b.directory == a.directory
    np.testing.assert_array_equal(a.train, b.train)
    # Same size, new content (mtime may not even change): a new entry.
    path.write_text("the quick brown fax\n" * 200, encoding="utf-8")
    changed = Counter()
    c = tokenize_to_file(resolve_text_corpus(str(path)), tok, tmp_path / "cache", progress=changed)
    assert changed.calls and c.directory != a.directory
    # Another tokenizer or another split: also new entries.
    d = tokenize_to_file(resolve_text_corpus(str(path)), tok, tmp_path / "cache", val_fraction=0.2)
    other = char_tokenizer(["the quick brown fax jumps!\n"])
    e = tokenize_to_file(resolve_text_corpus(str(path)), other, tmp_path / "cache")
    assert len({a.directory, c.directory, d.directory, e.directory}) == 4


def test_documents_end_with_the_end_of_text_token(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab", encoding="utf-8")
    (tmp_path / "b.txt").write_text("cd", encoding="utf-8")
    tok = char_tokenizer(["abcd"])
    eos = tok.token_to_id("<eos>")
    files = tokenize_to_file(resolve_text_corpus(str(tmp_path)), tok, tmp_path, val_fraction=0.25)
    ids = files.train.tolist() + files.val.tolist()
    assert ids == [*tok.encode("ab").ids, eos, *tok.encode("cd").ids, eos]
    assert tok.decode(files.val.tolist()) == "d"  # the last 25% of four bytes


def test_bpe_tokens_decode_back_to_the_corpus(tmp_path: Path) -> None:
    corpus = resolve_text_corpus("python-code", max_bytes=200_000)
    text = "".join(corpus.texts())
    tok = train_bpe(corpus.texts(), vocab_size=1000)
    files = tokenize_to_file(corpus, tok, tmp_path)
    eot = tok.token_to_id("<eos>")
    ids = [i for i in files.train.tolist() + files.val.tolist() if i != eot]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2.5


def test_a_crash_leaves_no_cache_entry(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("some text\n" * 100, encoding="utf-8")
    corpus = resolve_text_corpus(str(tmp_path / "t.txt"))
    tok = char_tokenizer(corpus.texts())

    def crash(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_file(corpus, tok, tmp_path, progress=crash)
    # The files were written, but the entry is never renamed into place; its folder is gone.
    assert list((tmp_path / "tokens").iterdir()) == []
    counter = Counter()
    tokenize_to_file(corpus, tok, tmp_path, progress=counter)
    assert counter.calls  # tokenized afresh, not a half-written entry reused


def test_bad_split_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("abc", encoding="utf-8")
    corpus = resolve_text_corpus(str(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match="between 0 and 1"):
        tokenize_to_file(corpus, char_tokenizer(["abc"]), tmp_path, val_fraction=1.0)
