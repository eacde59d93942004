"""Text corpora: where training text comes from, read as a stream of bounded chunks.

A corpus is an ordered list of documents (files, or text held in memory) read as UTF-8 bytes in
chunks that end at a line break where possible, so that a corpus larger than memory can be
hashed, used to train a tokenizer and tokenized without ever being held whole. ``max_bytes``
keeps only the first bytes of the stream (cut at a character boundary).

Built-in corpora need no download:

    python-docs   the text of Python's own help topics (``pydoc_data.topics``, about 465 KB),
                  joined in sorted key order so it is the same on every run; it is the text of
                  the Python that runs qkv, so it differs between Python versions
    python-code   the standard library's ``.py`` sources (tens of MB; cap it with max_bytes),
                  sorted by path; site-packages and files that are not UTF-8 are left out

Any other name is a path: a text file, a folder (every non-hidden file below it, sorted), or a
glob pattern (``data/*.txt``, ``**`` allowed). Files must be UTF-8.

A corpus is identified by a hash of its contents, which takes one full read; ``scan`` can
remember that hash by the files' sizes and modification times, so that an unchanged large
folder is not read again just to be recognised. The same read counts the characters and the
alphabet: ``CorpusInfo.fingerprint`` is what a training run records about its text, so that
two runs can tell whether they saw the same data (the SHA-256 of the text stream, its bytes,
characters and distinct characters).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qkv._io import atomic_write_json

__all__ = [
    "BUILTIN_TEXT_CORPORA",
    "CorpusInfo",
    "Document",
    "TextCorpus",
    "char_boundary",
    "resolve_text_corpus",
]

BUILTIN_TEXT_CORPORA: tuple[str, ...] = ("python-docs", "python-code")
CHUNK_BYTES = 1 << 20  # read size; chunks end at the last line break inside a read
STAT_SAFETY_S = 2.0  # files modified this recently are read again rather than trusted
_GLOB_CHARS = frozenset("*?[")
_INFO_FIELDS = ("digest", "total_bytes", "text_sha256", "characters", "distinct_characters")


def char_boundary(data: bytes, n: int) -> int:
    """The largest index ``<= n`` that does not fall inside a UTF-8 multi-byte character."""
    n = min(n, len(data))
    while 0 < n < len(data) and (data[n] & 0xC0) == 0x80:  # 10xxxxxx: a continuation byte
        n -= 1
    return n


def _line_chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """Chunks of ``stream`` that end just after a line break; a line longer than a few reads
    is cut at a character boundary instead, so a chunk never exceeds about 4 * size bytes."""
    carry = b""
    while block := stream.read(size):
        buf = carry + block
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) < 4 * size:
                carry = buf
                continue
            cut = char_boundary(buf, len(buf) - 1) or len(buf)
        yield buf[:cut]
        carry = buf[cut:]
    if carry:
        yield carry


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a file, or UTF-8 bytes held in memory."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")


@dataclass(frozen=True)
class CorpusInfo:
    """What one full read of a corpus found: its content hashes and its size."""

    digest: str  # SHA-256 over the documents' contents (and where each document ends)
    total_bytes: int
    text_sha256: str = ""  # SHA-256 of the text as one stream of UTF-8 bytes (what is read)
    characters: int = 0  # Unicode characters in the text
    distinct_characters: int = 0  # the size of its alphabet (a char tokenizer's vocabulary)

    def fingerprint(self, name: str) -> dict[str, Any]:
        """What identifies the text a run trained on, for its metadata and for comparing runs.

        A built-in corpus can differ between machines: ``python-docs`` is the help text of
        the Python that runs qkv, and it changes between Python versions. Two runs trained
        on the same text have the same ``sha256``.
        """
        return {
            "corpus": name,
            "sha256": self.text_sha256,
            "bytes": self.total_bytes,
            "characters": self.characters,
            "distinct_characters": self.distinct_characters,
        }


@dataclass(frozen=True)
class TextCorpus:
    """An ordered list of documents, read as one stream of bounded chunks."""

    name: str
    documents: tuple[Document, ...]
    max_bytes: int = 0  # 0: everything
    skip_undecodable: bool = False  # leave out documents that are not UTF-8 (python-code)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """``(document index, bytes)`` pairs in order; every chunk decodes as UTF-8 on its own.

        Raises:
            ValueError: a document is not UTF-8 text.
        """
        remaining = self.max_bytes or float("inf")
        for index, doc in enumerate(self.documents):
            with doc.open() as f:
                if self.skip_undecodable:
                    data = f.read()
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    pieces: Iterator[bytes] = _line_chunks(io.BytesIO(data), size)
                else:
                    pieces = _line_chunks(f, size)
                for piece in pieces:
                    _check_utf8(piece, doc)
                    if len(piece) >= remaining:
                        piece = piece[: char_boundary(piece, int(remaining))]
                        if piece:
                            yield index, piece
                        return
                    remaining -= len(piece)
                    yield index, piece

    def texts(self, stop: int | None = None) -> Iterator[str]:
        """The corpus as decoded text pieces, optionally only its first ``stop`` bytes."""
        seen = 0
        for _, piece in self.chunks():
            if stop is not None and seen + len(piece) >= stop:
                yield piece[: char_boundary(piece, stop - seen)].decode("utf-8")
                return
            seen += len(piece)
            yield piece.decode("utf-8")

    def scan(self, index_dir: str | os.PathLike[str] | None = None) -> CorpusInfo:
        """Read the whole corpus once: its content hash and size (and a UTF-8 check).

        With ``index_dir``, the result is remembered under a key of every file's path, size
        and modification time, and reused while those stay the same, so a large folder is not
        read again on every build. Like git's index, a result is trusted only if every file
        was last modified at least ``STAT_SAFETY_S`` seconds before the result was recorded:
        a file changed after that gets a newer time (and a new key) even where timestamps are
        coarse, so a same-size edit is never missed.

        Raises:
            ValueError: the corpus is empty, or a document is not UTF-8 text.
        """
        if index_dir is None:
            return self._read_and_hash()
        key, newest = self._stat_key()
        entry = Path(index_dir) / f"{key}.json"
        if entry.is_file():
            record = json.loads(entry.read_text(encoding="utf-8"))
            if record["recorded_at"] - newest >= STAT_SAFETY_S:
                return CorpusInfo(**{f: record[f] for f in _INFO_FIELDS})
        recorded_at = time.time()
        info = self._read_and_hash()
        if recorded_at - newest >= STAT_SAFETY_S:
            record = dataclasses.asdict(info)
            atomic_write_json(entry, {**record, "recorded_at": recorded_at, "corpus": self.name})
        return info

    def _stat_key(self) -> tuple[str, float]:
        """A hash of what identifies the documents without reading them, and the newest
        modification time among the files (seconds since the epoch)."""
        h = hashlib.sha256(f"v2:{self.max_bytes}:{self.skip_undecodable}\n".encode())
        newest = 0.0
        for doc in self.documents:
            if doc.data is not None:
                h.update(b"data:" + hashlib.sha256(doc.data).digest())
                continue
            assert doc.path is not None
            st = doc.path.stat()
            h.update(f"file:{doc.path.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            newest = max(newest, st.st_mtime_ns / 1e9)
        return h.hexdigest()[:32], newest

    def _read_and_hash(self) -> CorpusInfo:
        outer = hashlib.sha256(f"max_bytes={self.max_bytes}\n".encode())
        stream = hashlib.sha256()
        inner, current, total, characters = None, -1, 0, 0
        alphabet: set[str] = set()
        for index, piece in self.chunks():
            if index != current:
                if inner is not None:
                    outer.update(inner.digest())
                inner, current = hashlib.sha256(), index
            assert inner is not None
            inner.update(piece)
            stream.update(piece)
            total += len(piece)
            text = piece.decode("utf-8")  # whole characters: chunks end at a boundary
            characters += len(text)
            alphabet.update(text)
        if inner is not None:
            outer.update(inner.digest())
        if total == 0:
            raise ValueError(f"corpus {self.name!r} is empty: it has no text to train on")
        return CorpusInfo(
            digest=outer.hexdigest(), total_bytes=total, text_sha256=stream.hexdigest(),
            characters=characters, distinct_characters=len(alphabet),
        )  # fmt: skip


def _check_utf8(piece: bytes, doc: Document) -> None:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{doc.name} is not UTF-8 text (bad byte near offset {e.start} of a chunk): "
            "convert it, or select only text files with a glob such as 'folder/**/*.txt'"
        ) from None


def python_docs_text() -> str:
    """The text of Python's help topics, joined in sorted key order (deterministic)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError(
            "this Python has no pydoc_data module (some distributions package it separately); "
            "use corpus='python-code' or a path to text files"
        ) from None
    return "\n".join(topics[key] for key in sorted(topics))


def python_code_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path below the library root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not files:
        raise ValueError(f"found no .py files under the standard library at {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _files_in(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def resolve_text_corpus(corpus: str, max_bytes: int = 0) -> TextCorpus:
    """A built-in corpus by name, or the text files at a path, folder or glob.

    Raises:
        FileNotFoundError: the path does not exist, or the glob matches no file.
        ValueError: the folder holds no files.
    """
    if corpus == "python-docs":
        data = python_docs_text().encode("utf-8")
        return TextCorpus(corpus, (Document("python-docs", data=data),), max_bytes)
    if corpus == "python-code":
        docs = tuple(Document(str(p), path=p) for p in python_code_files())
        return TextCorpus(corpus, docs, max_bytes, skip_undecodable=True)
    if _GLOB_CHARS & set(corpus):
        matches = sorted(p for p in glob.glob(os.path.expanduser(corpus), recursive=True))
        files = [Path(p) for p in matches if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"the pattern {corpus!r} matches no files; check the glob")
        return TextCorpus(corpus, tuple(Document(str(p), path=p) for p in files), max_bytes)
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = _files_in(path)
        if not files:
            raise ValueError(f"the folder {path} holds no files to read")
        return TextCorpus(corpus, tuple(Document(str(p), path=p) for p in files), max_bytes)
    if path.is_file():
        return TextCorpus(corpus, (Document(str(path), path=path),), max_bytes)
    raise FileNotFoundError(
        f"corpus {corpus!r} is neither a built-in name ({', '.join(BUILTIN_TEXT_CORPORA)}) "
        "nor an existing file, folder or glob"
    )
