"""Tokenizers: round trips, vocabulary layout, special ids, loading and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import qkv
from qkv.data.corpora import python_docs_text
from qkv.data.tokenizers import (
    BPE_SPECIAL_TOKENS,
    CHAR_SPECIAL_TOKENS,
    char_tokenizer,
    load_tokenizer,
    special_ids,
    train_bpe,
    train_wordpiece,
)
from qkv.models import GPT, GPTConfig

TRICKY = [
    "",
    " ",
    "\n\n\t  x",
    "héllo wörld",
    "😀🙂👍🏽 family: 👨‍👩‍👧",
    "日本語のテキスト、中文字符",
    "control \x00\x01\x07\x1b[0m \x7f \u200b end",
    "  leading and trailing  ",
    "\r\nwindows\r\n",
]


@pytest.fixture(scope="module")
def docs_text() -> str:
    return python_docs_text()


@pytest.fixture(scope="module")
def bpe(docs_text: str) -> Tokenizer:
    return train_bpe([docs_text[:100_000]], vocab_size=600)


def test_char_round_trip_on_python_docs(docs_text: str) -> None:
    tok = char_tokenizer([docs_text])
    ids = tok.encode(docs_text).ids
    assert len(ids) == len(docs_text)  # one id per character, non-ASCII included
    assert any(ord(c) > 127 for c in docs_text)
    assert tok.decode(ids) == docs_text


def test_char_vocabulary_layout_and_unknown_characters() -> None:
    tok = char_tokenizer(["banana", "cab\n"])
    vocab = tok.get_vocab()
    # Specials first, pad = 0, then the characters in code-point order.
    assert [vocab[t] for t in CHAR_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert sorted((vocab[c], c) for c in "\nabcn") == [
        (5, "\n"),
        (6, "a"),
        (7, "b"),
        (8, "c"),
        (9, "n"),
    ]
    assert tok.get_vocab_size() == 10
    # "z" was never seen: it encodes to <unk>, which decode drops like every special token.
    assert tok.encode("zab").ids == [1, 6, 7]
    assert tok.decode(tok.encode("zab").ids) == "ab"
    assert tok.decode(tok.encode("zab").ids, skip_special_tokens=False) == "<unk>ab"


def test_char_tokenizer_rejects_bad_specials() -> None:
    with pytest.raises(ValueError, match="unk_token"):
        char_tokenizer(["ab"], special_tokens=("<pad>",), unk_token="<unk>")
    with pytest.raises(ValueError, match="repeat"):
        char_tokenizer(["ab"], special_tokens=("<unk>", "<unk>"))


def test_char_tokenizer_saves_next_to_a_checkpoint_and_loads_back(tmp_path: Path) -> None:
    tok = char_tokenizer(["the cat sat"])
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), d_model=16, n_layers=1, n_heads=2))
    qkv.save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    _, loaded = qkv.from_pretrained(tmp_path / "ckpt", return_tokenizer=True)
    assert loaded.encode("a cat").ids == tok.encode("a cat").ids
    assert loaded.decode(loaded.encode("a cat").ids) == "a cat"


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip_on_tricky_strings(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text).ids) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200))
def test_bpe_round_trip_on_any_string(bpe: Tokenizer, text: str) -> None:
    # The one documented exception: a special token's literal text encodes as that token.
    assume(not any(special in text for special in BPE_SPECIAL_TOKENS))
    assert bpe.decode(bpe.encode(text).ids) == text


def test_literal_special_token_text_encodes_as_the_special_token(bpe: Tokenizer) -> None:
    ids = bpe.encode("a<eos>b").ids
    assert special_ids(bpe).eos in ids
    assert bpe.decode(ids) == "ab"
    assert bpe.decode(ids, skip_special_tokens=False) == "a<eos>b"


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(
            codec="utf-8",
            categories=("Cc", "Cf", "Lo", "So", "Zs", "Mn"),  # control, CJK, emoji, spaces
        ),
        max_size=50,
    )
)
def test_bpe_round_trip_on_control_cjk_and_symbols(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text).ids) == text


def test_bpe_vocabulary_size_and_specials(bpe: Tokenizer) -> None:
    assert bpe.get_vocab_size() == 600
    vocab = bpe.get_vocab()
    assert [vocab[t] for t in BPE_SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = special_ids(bpe)
    assert (ids.pad, ids.bos, ids.eos, ids.mask, ids.unk) == (0, 1, 2, 3, None)
    assert ids.all == (0, 1, 2, 3)
    # Merges compress the text: fewer ids than bytes on training-like text.
    sample = "The return statement leaves the current function call"
    assert len(bpe.encode(sample).ids) < len(sample.encode()) / 2


def test_bpe_trains_from_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta gamma\n" * 50, encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta gamma delta\n" * 50, encoding="utf-8")
    tok = train_bpe([tmp_path / "a.txt", tmp_path / "b.txt"], vocab_size=300)
    assert "Ġgamma" in tok.get_vocab()  # a whole word became one piece
    assert tok.decode(tok.encode("delta alpha").ids) == "delta alpha"


def test_bpe_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="empty"):
        train_bpe([], vocab_size=300)
    with pytest.raises(TypeError, match="not a single str"):
        train_bpe("some text", vocab_size=300)  # type: ignore[arg-type]


def test_wordpiece_is_bert_style(docs_text: str) -> None:
    tok = train_wordpiece([docs_text[:100_000]], vocab_size=800)
    ids = special_ids(tok)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (0, 1, 2, 3, 4)
    enc = tok.encode("The Exception handler")
    assert enc.ids[0] == ids.cls and enc.ids[-1] == ids.sep
    assert tok.decode(enc.ids) == "the exception handler"  # lowercased, specials dropped
    assert any(t.startswith("##") for t in tok.encode("unconventionality").tokens)
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        train_wordpiece(["abc"], vocab_size=100, special_tokens=("[UNK]", "[SEP]"))


def test_load_tokenizer_from_file_or_folder(tmp_path: Path, bpe: Tokenizer) -> None:
    bpe.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(where)
        assert loaded.encode("hello 🙂").ids == bpe.encode("hello 🙂").ids
    # Padding and truncation settings in a file are switched off.
    padded = json.loads(bpe.to_str())
    padded["truncation"] = {
        "direction": "Right",
        "max_length": 3,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    (tmp_path / "t.json").write_text(json.dumps(padded), encoding="utf-8")
    assert len(load_tokenizer(tmp_path / "t.json").encode("a b c d e f").ids) > 3


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_special_ids_of_a_gpt2_style_vocabulary() -> None:
    tok = train_bpe(["hello world"] * 5, vocab_size=300, special_tokens=("<|endoftext|>",))
    ids = special_ids(tok)
    assert ids.bos == ids.eos == 0  # GPT-2 uses one token for both
    assert (ids.pad, ids.mask, ids.cls, ids.sep) == (None, None, None, None)
