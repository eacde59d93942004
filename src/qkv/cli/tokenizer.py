"""``qkv tokenizer train``: train a tokenizer on a corpus and write its tokenizer.json."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from qkv._io import atomic_write

SAMPLE_CHARS = 80  # how much of the corpus the sample encoding shows


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar over bytes; yields the ``progress(done, total)`` callback that
    ``qkv.data.build_data`` and ``tokenize_to_file`` take."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _training_texts(corpus: str, max_bytes: int) -> tuple[Callable[[], Iterator[str]], str]:
    """Texts to train on (a fresh iterator per call) and a sample of them."""
    from qkv.data.corpora import resolve_text_corpus
    from qkv.data.parallel import PARALLEL_SUFFIXES, read_parallel
    from qkv.data.tasks import SYNTHETIC_TASKS, task_alphabet

    if corpus in SYNTHETIC_TASKS:
        alphabet = task_alphabet(corpus)
        return lambda: iter([alphabet]), alphabet
    if Path(corpus).suffix.lower() in PARALLEL_SUFFIXES:
        pairs = read_parallel(corpus)
        return lambda: (text for pair in pairs for text in pair), pairs[0][0]
    text = resolve_text_corpus(corpus, max_bytes)
    text.scan()  # fails early, in one sentence, on an empty corpus or a non-UTF-8 file
    sample = next(text.texts(stop=4 * SAMPLE_CHARS), "")
    return lambda: text.texts(), sample


def cmd_train(args: argparse.Namespace) -> int:
    """Train a tokenizer on a corpus, save it, and show how it encodes a sample."""
    from qkv.data.build import DEFAULT_VOCAB_SIZE, build_tokenizer

    console = Console(highlight=False)
    try:
        texts, sample = _training_texts(args.corpus, args.max_bytes)
        with console.status(f"training a {args.kind} tokenizer on {args.corpus} ..."):
            tokenizer = build_tokenizer(args.kind, texts, vocab_size=args.vocab_size)
    except (OSError, ValueError, ImportError) as e:
        print(f"qkv tokenizer train: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    path = out if out.suffix == ".json" else out / "tokenizer.json"
    atomic_write(path, lambda tmp: tokenizer.save(tmp))
    sample = " ".join(sample.split())[:SAMPLE_CHARS] or "hello"
    encoding = tokenizer.encode(sample, add_special_tokens=False)
    asked = args.vocab_size or DEFAULT_VOCAB_SIZE.get(args.kind, 0)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    note = f" (asked for {asked}; the corpus supports no more)" if asked and size < asked else ""
    console.print(f"wrote {path}: a {args.kind} tokenizer of {size} tokens{note}", soft_wrap=True)
    console.print(f"sample:  {sample!r}", soft_wrap=True)
    console.print(f"pieces:  {encoding.tokens}", soft_wrap=True)
    console.print(f"ids:     {encoding.ids}", soft_wrap=True)
    console.print(f"decoded: {tokenizer.decode(encoding.ids)!r}", soft_wrap=True)
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``qkv tokenizer train`` to the command's subparsers."""
    tok = sub.add_parser("tokenizer", help="train tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tok_sub.add_parser(
        "train",
        help="train a tokenizer on a corpus and write tokenizer.json",
        description="Train a character, byte-level BPE or WordPiece tokenizer on a built-in "
        "corpus (python-docs, python-code, copy, reverse, sort, dates), a text file, folder or "
        "glob, or a .tsv/.jsonl file of pairs, and write its tokenizer.json.",
    )
    train.add_argument("--corpus", required=True, help="built-in name, path, folder or glob")
    train.add_argument("--kind", choices=("bpe", "wordpiece", "char"), default="bpe")
    train.add_argument(
        "--vocab-size",
        type=_non_negative,
        default=0,
        help="tokens in the vocabulary for bpe/wordpiece (default 4096)",
    )
    train.add_argument(
        "--max-bytes",
        type=_non_negative,
        default=0,
        help="read only the first N bytes of the corpus (default: all)",
    )
    train.add_argument("--out", required=True, help="a .json file, or a folder for tokenizer.json")
    train.set_defaults(func=cmd_train)
