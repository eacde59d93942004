"""Text corpora: built-ins, files, folders and globs, streamed in bounded chunks."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from qkv.data.corpora import (
    Document,
    TextCorpus,
    _line_chunks,
    char_boundary,
    python_code_files,
    python_docs_text,
    resolve_text_corpus,
)


def read_all(corpus: TextCorpus) -> str:
    return "".join(corpus.texts())


def test_python_docs_is_the_help_topics_in_sorted_order() -> None:
    from pydoc_data.topics import topics

    text = read_all(resolve_text_corpus("python-docs"))
    assert text == "\n".join(topics[k] for k in sorted(topics))
    assert text == python_docs_text()  # the same on every call
    assert 300_000 < len(text.encode()) < 2_000_000


def test_python_code_is_sorted_stdlib_sources_capped_by_max_bytes() -> None:
    files = python_code_files()
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    corpus = resolve_text_corpus("python-code", max_bytes=50_000)
    text = read_all(corpus)
    assert len(text.encode()) == corpus.scan().total_bytes <= 50_000
    assert len(text.encode()) > 49_000  # cut at a character boundary just below the cap
    assert text.startswith(files[0].read_text(encoding="utf-8")[:1000])


def test_python_code_leaves_out_files_that_are_not_utf8(tmp_path: Path) -> None:
    good, bad = tmp_path / "a.py", tmp_path / "b.py"
    good.write_text("x = 1\n", encoding="utf-8")
    bad.write_bytes("y = 'é'\n".encode("latin-1"))
    corpus = TextCorpus("code", (Document("a", path=good), Document("b", path=bad)), 0, True)
    assert read_all(corpus) == "x = 1\n"
    strict = TextCorpus("code", (Document("a", path=good), Document("b", path=bad)))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_all(strict)


def test_file_folder_and_glob(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "sub" / "c.md").write_text("third\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("secret\n", encoding="utf-8")
    assert read_all(resolve_text_corpus(str(tmp_path / "a.txt"))) == "first\n"
    folder = resolve_text_corpus(str(tmp_path))
    assert [Path(d.name).name for d in folder.documents] == ["a.txt", "b.txt", "c.md"]
    assert read_all(folder) == "first\nsecond\nthird\n"
    pattern = resolve_text_corpus(str(tmp_path / "**" / "*.md"))
    assert read_all(pattern) == "third\n"


def test_max_bytes_never_splits_a_character(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("aé😀b", encoding="utf-8")  # 1 + 2 + 4 + 1 bytes
    cuts = {n: read_all(resolve_text_corpus(str(tmp_path / "t.txt"), n)) for n in range(1, 9)}
    assert cuts == {1: "a", 2: "a", 3: "aé", 4: "aé", 5: "aé", 6: "aé", 7: "aé😀", 8: "aé😀b"}


def test_chunks_end_at_line_breaks_and_stay_bounded() -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000)) + b"x" * 5000 + "é".encode() * 3000
    chunks = list(_line_chunks(io.BytesIO(data), 256))
    assert b"".join(chunks) == data
    assert all(len(c) <= 4 * 256 + 256 for c in chunks)
    assert all(c.endswith(b"\n") for c in chunks[:10])
    for c in chunks:
        c.decode("utf-8")  # every chunk is whole characters


def test_char_boundary() -> None:
    data = "aé😀".encode()  # a | c3 a9 | f0 9f 98 80
    assert [char_boundary(data, n) for n in range(8)] == [0, 1, 1, 3, 3, 3, 3, 7]


def test_scan_hashes_contents_and_document_boundaries(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ab", encoding="utf-8")
    (tmp_path / "b.txt").write_text("c", encoding="utf-8")
    two = resolve_text_corpus(str(tmp_path)).scan()
    assert two.total_bytes == 3
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "b.txt").write_text("bc", encoding="utf-8")
    moved = resolve_text_corpus(str(tmp_path)).scan()
    assert moved.total_bytes == 3 and moved.digest != two.digest  # same bytes, other documents
    capped = resolve_text_corpus(str(tmp_path), max_bytes=2).scan()
    assert capped.total_bytes == 2 and capped.digest != moved.digest


def test_errors_are_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a built-in name"):
        resolve_text_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_text_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        resolve_text_corpus(str(tmp_path / "empty_folder"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        resolve_text_corpus(str(tmp_path / "empty.txt")).scan()
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match=r"binary.bin is not UTF-8 text"):
        resolve_text_corpus(str(tmp_path / "binary.bin")).scan()


def test_scan_index_skips_reading_unchanged_old_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("an old file\n" * 10, encoding="utf-8")
    old = time.time() - 60
    os.utime(path, (old, old))
    index = tmp_path / "index"
    first = resolve_text_corpus(str(path)).scan(index_dir=index)
    assert first == resolve_text_corpus(str(path)).scan()  # the same answer as a full read
    assert len(list(index.iterdir())) == 1

    def no_reading(self: TextCorpus) -> None:
        raise AssertionError("read the corpus although the index knew it")

    with monkeypatch.context() as m:
        m.setattr(TextCorpus, "_read_and_hash", no_reading)
        assert resolve_text_corpus(str(path)).scan(index_dir=index) == first
    # Same size, new content, another modification time: read again, new digest.
    path.write_text("an odd file\n" * 10, encoding="utf-8")
    os.utime(path, (old + 1, old + 1))
    changed = resolve_text_corpus(str(path)).scan(index_dir=index)
    assert changed.total_bytes == first.total_bytes and changed.digest != first.digest


def test_scan_index_never_trusts_recently_modified_files(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("fresh\n", encoding="utf-8")
    index = tmp_path / "index"
    a = resolve_text_corpus(str(path)).scan(index_dir=index)
    assert not index.exists() or list(index.iterdir()) == []  # nothing recorded
    mtime = path.stat().st_mtime_ns
    path.write_text("fresk\n", encoding="utf-8")
    os.utime(path, ns=(mtime, mtime))  # even an edit within the same timestamp is seen
    assert resolve_text_corpus(str(path)).scan(index_dir=index).digest != a.digest
