"""Language-model windows from build_data: determinism, coverage of the validation split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.data import DataConfig, DataSource, TokenWindows, build_data
from qkv.data.corpora import python_docs_text, resolve_text_corpus


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def lm(cache: Path) -> TokenWindows:
    source, _ = build_data(DataConfig(seq_len=64), cache)
    assert isinstance(source, TokenWindows)
    return source


def test_lm_source_follows_the_protocol(lm: TokenWindows) -> None:
    assert isinstance(lm, DataSource)
    assert lm.kind == "lm"
    # python-docs' characters and five special tokens; the text is the running Python's own,
    # so its alphabet is counted here rather than taken from one interpreter.
    assert lm.vocab_size == len(set(python_docs_text())) + 5
    assert (lm.pad_id, lm.unk_id, lm.bos_id, lm.eos_id, lm.mask_id) == (0, 1, 2, 3, 4)


def test_train_batch_is_a_pure_function_of_seed_and_step(lm: TokenWindows) -> None:
    a = lm.train_batch(step=7, batch_size=8, seed=3)["input_ids"]
    torch.manual_seed(12345)  # global random state must not matter
    b = lm.train_batch(step=7, batch_size=8, seed=3)["input_ids"]
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, lm.train_batch(step=8, batch_size=8, seed=3)["input_ids"])
    assert not torch.equal(a, lm.train_batch(step=7, batch_size=8, seed=4)["input_ids"])


def test_train_windows_are_consecutive_training_tokens(lm: TokenWindows) -> None:
    train = np.asarray(lm.train_tokens, dtype=np.int64)
    haystack = train.tobytes()
    for row in lm.train_batch(step=0, batch_size=4, seed=0)["input_ids"].numpy():
        assert row.tobytes() in haystack  # a contiguous slice of the training ids


def test_val_windows_cover_the_validation_split_in_order(lm: TokenWindows) -> None:
    val = torch.from_numpy(np.asarray(lm.val_tokens, dtype=np.int64))
    batches = list(lm.val_batches(batch_size=16))
    windows = torch.cat([b["input_ids"] for b in batches])  # (N, T)
    t = 64
    n = (len(val) - 1) // (t - 1)  # windows of T sharing one token
    assert windows.shape == (n, t)
    for i in range(n):
        assert torch.equal(windows[i], val[i * (t - 1) : i * (t - 1) + t])
    # Every validation token after the first is a target exactly once (up to the remainder).
    targets = torch.cat([w[1:] for w in windows])
    assert torch.equal(targets, val[1 : 1 + len(targets)])
    assert len(val) - 1 - len(targets) < t - 1
    # Fixed order, every call; max_batches stops early.
    again = torch.cat([b["input_ids"] for b in lm.val_batches(batch_size=16)])
    assert torch.equal(windows, again)
    assert len(list(lm.val_batches(batch_size=16, max_batches=2))) == 2


def test_mlm_wordpiece_windows_are_framed_by_cls_and_sep(cache: Path) -> None:
    config = DataConfig(kind="mlm", tokenizer="wordpiece", vocab_size=1000, seq_len=32)
    source, tok = build_data(config, cache)
    assert isinstance(source, TokenWindows) and tok is not None
    batch = source.train_batch(step=0, batch_size=4, seed=0)
    ids = batch["input_ids"]
    assert ids.shape == (4, 32)
    assert torch.equal(batch["attention_mask"], torch.ones_like(ids))
    assert (ids[:, 0] == source.cls_id).all() and (ids[:, -1] == source.sep_id).all()
    assert source.mask_id == tok.token_to_id("[MASK]")
    assert set(source.special_ids) == {0, 1, 2, 3, 4}
    # Validation windows do not overlap: 30 corpus tokens each, back to back.
    val = torch.from_numpy(np.asarray(source.val_tokens, dtype=np.int64))
    inner = torch.cat([b["input_ids"][:, 1:-1] for b in source.val_batches(8)]).flatten()
    assert torch.equal(inner, val[: len(inner)])
    assert len(val) - len(inner) < 30


def test_mlm_char_windows_are_plain(cache: Path) -> None:
    source, _ = build_data(DataConfig(kind="mlm", seq_len=16), cache)
    batch = source.train_batch(step=0, batch_size=2, seed=0)
    assert batch["input_ids"].shape == (2, 16)
    assert isinstance(source, TokenWindows) and source.mask_id == 4


def test_lm_bpe_build_is_cached(cache: Path) -> None:
    calls: list[tuple[int, int]] = []
    config = DataConfig(tokenizer="bpe", vocab_size=500, seq_len=32)
    first, tok1 = build_data(config, cache, progress=lambda d, t: calls.append((d, t)))
    assert calls
    calls.clear()
    second, tok2 = build_data(config, cache, progress=lambda d, t: calls.append((d, t)))
    assert calls == []  # the tokenizer and the token files both came from the cache
    assert tok1 is not None and tok2 is not None
    assert tok1.to_str() == tok2.to_str()
    assert torch.equal(
        first.train_batch(1, 2, 0)["input_ids"], second.train_batch(1, 2, 0)["input_ids"]
    )


def test_seq_len_longer_than_the_validation_split(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("x" * 1000, encoding="utf-8")
    config = DataConfig(corpus=str(tmp_path / "small.txt"), seq_len=200)
    # 100 characters and the end-of-text token after the document.
    with pytest.raises(ValueError, match=r"validation split has 101 tokens.*lower seq_len"):
        build_data(config, tmp_path / "cache")


def test_mlm_needs_a_mask_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text("a b " * 500, encoding="utf-8")
    config = DataConfig(
        kind="mlm", corpus=str(tmp_path / "c.txt"), tokenizer=str(tmp_path), seq_len=8
    )
    with pytest.raises(ValueError, match="no mask token"):
        build_data(config, tmp_path / "cache")


def test_lm_source_carries_the_fingerprint_of_its_text(lm: TokenWindows, cache: Path) -> None:
    text = python_docs_text()
    fingerprint = lm.fingerprint
    assert fingerprint["corpus"] == "python-docs"
    assert fingerprint["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert fingerprint["characters"] == len(text)
    assert fingerprint["bytes"] == len(text.encode("utf-8"))
    assert fingerprint["distinct_characters"] == len(set(text))
    # A cut corpus is another text, with another fingerprint.
    cut, _ = build_data(DataConfig(seq_len=64, max_bytes=10_000), cache)
    assert isinstance(cut, TokenWindows)
    assert cut.fingerprint["sha256"] == hashlib.sha256(text.encode()[:10_000]).hexdigest()
    assert cut.fingerprint["max_bytes"] == 10_000 and cut.fingerprint["bytes"] == 10_000


def test_fingerprint_is_remembered_by_the_scan_index(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 50, encoding="utf-8")
    corpus = resolve_text_corpus(str(tmp_path / "a.txt"))
    index = tmp_path / "index"
    first = corpus.scan(index)
    os.utime(tmp_path / "a.txt", (0, 0))  # old enough for the index to trust it
    first = corpus.scan(index)
    [entry] = index.glob("*.json")
    assert '"text_sha256"' in entry.read_text(encoding="utf-8")
    again = corpus.scan(index)  # from the index, without reading the text
    assert again == first == corpus.scan()  # read back with every field
    assert first.characters == 12 * 50 and first.distinct_characters == len(set("héllo wörld\n"))
