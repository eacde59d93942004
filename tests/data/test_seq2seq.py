"""Sequence-to-sequence data: synthetic tasks, dates, parallel files, and the batch layout."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import torch

from qkv.data import DataConfig, DataSource, Seq2SeqSource, build_data, read_parallel
from qkv.data.tasks import (
    DATE_FORMATS,
    LETTERS,
    format_date,
    longest_date_source,
    sample_example,
)


def build(tmp_path: Path, **kwargs: object) -> Seq2SeqSource:
    source, tok = build_data(DataConfig(kind="seq2seq", **kwargs), tmp_path)  # type: ignore[arg-type]
    assert isinstance(source, Seq2SeqSource) and tok is not None
    return source


def decode_rows(source: Seq2SeqSource, ids: torch.Tensor) -> list[str]:
    rows = [[i for i in row if i >= 0] for row in ids.tolist()]
    return source.tokenizer.decode_batch(rows)


def test_batch_layout_padding_labels_and_masks(tmp_path: Path) -> None:
    source = build(tmp_path, corpus="reverse", seq_len=12)
    assert isinstance(source, DataSource)
    assert (source.pad_id, source.eos_id) == (0, 3)
    batch = source.train_batch(step=0, batch_size=32, seed=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels, dmask = batch["labels"], batch["decoder_attention_mask"]
    assert ids.dtype == labels.dtype == torch.int64
    assert ids.shape == mask.shape and labels.shape == dmask.shape and len(ids) == 32
    for i in range(32):
        n_src = int(mask[i].sum())
        assert (ids[i, n_src:] == source.pad_id).all() and (ids[i, :n_src] > 4).all()
        assert (mask[i, :n_src] == 1).all()
        n_lab = int(dmask[i].sum())
        assert labels[i, n_lab - 1] == source.eos_id  # the target ends with eos
        assert (labels[i, n_lab:] == -100).all() and (labels[i, : n_lab - 1] > 4).all()
        assert n_lab == n_src + 1  # reversing keeps the length
    # Padded to the longest row of the batch, no further.
    assert int(mask.sum(1).max()) == ids.shape[1]
    assert int(dmask.sum(1).max()) == labels.shape[1]
    assert labels.shape[1] <= 12 and ids.shape[1] <= 11


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_letter_tasks_have_correct_targets(tmp_path: Path, task: str) -> None:
    source = build(tmp_path, corpus=task, seq_len=10)
    batch = source.train_batch(step=3, batch_size=64, seed=1)
    sources = decode_rows(source, batch["input_ids"])
    targets = decode_rows(source, batch["labels"])
    expected = {"copy": lambda s: s, "reverse": lambda s: s[::-1], "sort": sorted}[task]
    for s, t in zip(sources, targets, strict=True):
        assert 1 <= len(s) <= 9 and set(s) <= set(LETTERS)
        assert t == "".join(expected(s))
    assert len(set(sources)) > 50  # fresh random examples


def _parse_date(text: str) -> tuple[dt.date, str]:
    """Read a human date independently of the code under test (strptime); also the pattern."""
    text = re.sub(r"(\d+)(st|nd|rd|th),", r"\1,", text)
    patterns = [
        "%B %d, %Y",
        "%d %b %Y",
        "%d %B %Y",
        "%b %d %Y",
        "%A, %B %d, %Y",
        "%d.%m.%Y",
        "%Y %B %d",
    ]
    for pattern in patterns:
        try:
            parsed = dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
        if pattern.startswith("%A"):  # the weekday written must be the date's
            assert text.split(",")[0] == parsed.strftime("%A").lower()
        return parsed, pattern
    raise AssertionError(f"unparseable date {text!r}")


def test_dates_targets_are_the_iso_dates_of_the_sources(tmp_path: Path) -> None:
    source = build(tmp_path, corpus="dates", seq_len=32)
    pairs = source.val_examples()
    batch = source.train_batch(step=0, batch_size=64, seed=0)
    pairs += list(
        zip(
            decode_rows(source, batch["input_ids"]),
            decode_rows(source, batch["labels"]),
            strict=True,
        )
    )
    patterns = set()
    for human, iso in pairs:
        date = dt.date.fromisoformat(iso)
        assert iso == date.isoformat() and len(iso) == 10
        parsed, pattern = _parse_date(human)
        assert parsed == date
        patterns.add(pattern)
    assert len(pairs) == 500 + 64
    assert len(patterns) == 7  # every way of writing a date shows up


def test_every_date_format_round_trips_through_strptime() -> None:
    day = dt.date(1997, 3, 3)
    written = [format_date(day, i) for i in range(len(DATE_FORMATS))]
    assert "march 3, 1997" in written and "3 mar 1997" in written and "march 3rd, 1997" in written
    assert all(_parse_date(w)[0] == day for w in written)
    assert longest_date_source() == len("wednesday, september 29, 2021")


def test_dates_need_room_for_the_longest_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"set seq_len >= 29"):
        build(tmp_path, corpus="dates", seq_len=16)


def test_validation_set_is_fixed_and_apart_from_training(tmp_path: Path) -> None:
    source = build(tmp_path, corpus="copy", seq_len=8, num_examples=200)
    val = source.val_examples()
    assert len(val) == 200 and len({s for s, _ in val}) == 200
    assert val == build(tmp_path, corpus="copy", seq_len=8, num_examples=200).val_examples()
    assert val != build(tmp_path, corpus="copy", seq_len=8, num_examples=200, seed=1).val_examples()
    val_sources = {s for s, _ in val}
    for step in range(20):
        batch = source.train_batch(step=step, batch_size=64, seed=0)
        assert not val_sources & set(decode_rows(source, batch["input_ids"]))
    # Validation batches follow val_examples, in order, every call.
    first = next(iter(source.val_batches(batch_size=4)))
    assert decode_rows(source, first["input_ids"]) == [s for s, _ in val[:4]]
    batches = list(source.val_batches(batch_size=64))
    assert [len(b["input_ids"]) for b in batches] == [64, 64, 64, 8]


def test_train_batches_are_deterministic(tmp_path: Path) -> None:
    source = build(tmp_path, corpus="sort", seq_len=8)
    a = source.train_batch(step=5, batch_size=16, seed=2)
    b = source.train_batch(step=5, batch_size=16, seed=2)
    c = source.train_batch(step=6, batch_size=16, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert decode_rows(source, a["input_ids"]) != decode_rows(source, c["input_ids"])


def test_sample_example_depends_only_on_the_generator() -> None:
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert [sample_example("dates", g1, 5) for _ in range(5)] == [
        sample_example("dates", g2, 5) for _ in range(5)
    ]
    with pytest.raises(ValueError, match="unknown synthetic task"):
        sample_example("shuffle", g1, 5)


PAIRS = [(f"ein satz {i}", f"a sentence {i}") for i in range(20)]


def test_tsv_and_jsonl_parallel_text(tmp_path: Path) -> None:
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS) + "\n\n", encoding="utf-8")
    headed = tmp_path / "headed.tsv"
    rows = ["id\ttarget\tsource", *(f"{i}\t{t}\t{s}" for i, (s, t) in enumerate(PAIRS))]
    headed.write_text("\n".join(rows), encoding="utf-8")
    jsonl = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"source": s, "target": t, "extra": 1}) for s, t in PAIRS]
    jsonl.write_text("\n".join(lines), encoding="utf-8")
    for path in (tsv, headed, jsonl):
        assert read_parallel(path) == PAIRS
    source = build(tmp_path / "cache", corpus=str(jsonl), seq_len=32, val_fraction=0.2)
    assert source.val_examples() == PAIRS[-4:]  # the last 20% of the pairs
    batch = source.train_batch(step=0, batch_size=8, seed=0)
    train_sources = set(decode_rows(source, batch["input_ids"]))
    assert train_sources <= {s for s, _ in PAIRS[:-4]}
    targets = dict(PAIRS)
    labels = decode_rows(source, batch["labels"])
    assert all(
        targets[s] == t
        for s, t in zip(decode_rows(source, batch["input_ids"]), labels, strict=True)
    )


def test_parallel_text_with_bpe_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    long = [("x" * 50, "y" * 50), *PAIRS]
    path.write_text("\n".join(f"{s}\t{t}" for s, t in long), encoding="utf-8")
    source = build(tmp_path / "cache", corpus=str(path), tokenizer="bpe", vocab_size=300, seq_len=8)
    batch = source.collate([long[0]])
    assert batch["input_ids"].shape[1] <= 8 and batch["labels"].shape[1] <= 8
    assert batch["labels"][0, -1] == source.eos_id  # cut to seq_len - 1, then eos


def test_parallel_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no parallel text file"):
        read_parallel(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2 has 1 tab-separated field"):
        read_parallel(bad)
    keys = tmp_path / "keys.jsonl"
    keys.write_text('{"src": "a", "tgt": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"keys.jsonl:1 needs string values.*keys found"):
        read_parallel(keys)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"source": "a", "target": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        read_parallel(broken)
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no"):
        read_parallel(empty)
    other = tmp_path / "pairs.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"neither \.tsv nor \.jsonl"):
        read_parallel(other)
    few = tmp_path / "few.tsv"
    few.write_text("a\tb\nc\td\n", encoding="utf-8")
    with pytest.raises(ValueError, match="both need at least one"):
        build(tmp_path / "cache", corpus=str(few))


def test_seq2seq_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set tokenizer='char'"):
        build(tmp_path, corpus="copy", tokenizer="bpe")
    with pytest.raises(ValueError, match="needs a task"):
        build(tmp_path, corpus="python-docs")
    with pytest.raises(ValueError, match="set kind='seq2seq'"):
        build_data(DataConfig(kind="lm", corpus="copy"), tmp_path)
    with pytest.raises(ValueError, match="padding and an end-of-sequence"):
        (tmp_path / "p.tsv").write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS))
        build(tmp_path / "c", corpus=str(tmp_path / "p.tsv"), tokenizer="wordpiece", vocab_size=100)
