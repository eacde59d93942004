"""``build_data``: from a ``DataConfig`` to a tokenizer and a data source, cached on disk.

    kind      corpus                                   source
    lm, mlm   python-docs, python-code, path/glob  ->  TokenWindows over memory-mapped token files
    seq2seq   copy, reverse, sort, dates           ->  Seq2SeqSource drawing task examples
    seq2seq   a .tsv or .jsonl file of pairs       ->  Seq2SeqSource over the file's pairs
    images    digits                               ->  DigitsImages (no tokenizer)
    classify  python-topics                        ->  TopicParagraphs (paragraphs, labels)

Tokenizers are built from the training data: a character vocabulary from the whole corpus (it
is an alphabet, not learned statistics, so validation text has no unknown characters), BPE and
WordPiece only from the training split (their merges are statistics of the data, so held-out
text stays held out). Trained tokenizers are cached under ``cache_dir/tokenizers/`` by the
corpus's content hash and the settings, token files under ``cache_dir/tokens/``, and content
hashes of unchanged files under ``cache_dir/corpus-index/`` (see ``TextCorpus.scan``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from qkv._io import atomic_write
from qkv.data.config import DataConfig, DataSource, step_generator
from qkv.data.corpora import CorpusInfo, TextCorpus, resolve_text_corpus
from qkv.data.images import DigitsImages
from qkv.data.parallel import PARALLEL_SUFFIXES, read_parallel
from qkv.data.seq2seq import Seq2SeqSource
from qkv.data.tasks import SYNTHETIC_TASKS, longest_date_source, sample_example, task_alphabet
from qkv.data.tokenizers import (
    char_tokenizer,
    load_tokenizer,
    special_ids,
    train_bpe,
    train_wordpiece,
)
from qkv.data.tokens import Progress, TokenFiles, tokenize_to_file, val_start
from qkv.data.topics import TopicParagraphs, in_validation, topic_examples
from qkv.data.windows import TokenWindows

__all__ = ["DEFAULT_NUM_EXAMPLES", "DEFAULT_VOCAB_SIZE", "build_data", "build_tokenizer"]

logger = logging.getLogger(__name__)

TRAINED_KINDS = ("char", "bpe", "wordpiece")
DEFAULT_VOCAB_SIZE = {"bpe": 4096, "wordpiece": 4096}
DEFAULT_NUM_EXAMPLES = 500  # synthetic tasks' validation set
TOPICS_CORPUS = "python-topics"  # the only classification corpus (qkv.data.topics)
_REJECTION_TRIES = 50  # draws of a training pair that avoid the validation sources


def _cached(
    cache_dir: Path, kind: str, key: dict[str, Any], build: Callable[[], Tokenizer]
) -> Tokenizer:
    """The tokenizer cached under ``key``, or ``build()`` saved there and read back."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / "tokenizers" / f"{kind}-{digest}.json"
    if not path.is_file():
        tokenizer = build()
        atomic_write(path, lambda tmp: tokenizer.save(tmp))
        size = tokenizer.get_vocab_size()
        logger.info("trained a %s tokenizer of %d tokens: %s", kind, size, path)
    # Always the saved copy, so a fresh and a cached build hash to the same token files.
    return load_tokenizer(path)


def build_tokenizer(
    kind: str,
    texts: Callable[[], Any],
    *,
    vocab_size: int = 0,
    cache_dir: Path | None = None,
    cache_key: dict[str, Any] | None = None,
) -> Tokenizer:
    """A tokenizer by kind (``char``, ``bpe``, ``wordpiece``) trained on ``texts()``, or loaded
    from a path; cached when ``cache_dir`` and ``cache_key`` are given.

    Args:
        kind: ``"char"``, ``"bpe"``, ``"wordpiece"``, or a path to a tokenizer.json.
        texts: returns a fresh iterable of training texts (called only when training).
        vocab_size: for bpe and wordpiece; 0 picks ``DEFAULT_VOCAB_SIZE``.
        cache_dir: where trained tokenizers are kept.
        cache_key: what identifies the training text (e.g. its content hash).
    """
    if kind not in TRAINED_KINDS:
        return load_tokenizer(kind)
    size = vocab_size or DEFAULT_VOCAB_SIZE.get(kind, 0)

    def build() -> Tokenizer:
        if kind == "char":
            return char_tokenizer(texts())
        if kind == "bpe":
            return train_bpe(texts(), size)
        return train_wordpiece(texts(), size)

    if cache_dir is None or cache_key is None:
        return build()
    key = {**cache_key, "kind": kind, "vocab_size": 0 if kind == "char" else size, "format": 1}
    return _cached(cache_dir, kind, key, build)


# --8<-- [start:build]
def build_data(
    config: DataConfig,
    cache_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> tuple[DataSource, Tokenizer | None]:
    """Build (or load from ``cache_dir``) the tokenizer and the data source of ``config``.

    Args:
        config: what to train on.
        cache_dir: where tokenizers and token files are cached.
        progress: called as ``progress(bytes_done, bytes_total)`` while a corpus is tokenized
            (not at all when the token files come from the cache).

    Returns:
        ``(source, tokenizer)``; the tokenizer is None for images.

    Example:
        >>> import tempfile
        >>> source, tok = build_data(DataConfig(kind="seq2seq", corpus="reverse", seq_len=8),
        ...                          tempfile.mkdtemp())
        >>> batch = source.train_batch(step=0, batch_size=4, seed=0)
        >>> batch["input_ids"].shape[0], batch["labels"].shape[0]
        (4, 4)
    """
    cache = Path(cache_dir).expanduser()
    corpus = config.corpus
    if config.kind == "images" or corpus == "digits":
        if config.kind != "images" or corpus != "digits":
            raise ValueError(
                "images come only from corpus='digits', and it needs kind='images' "
                f"(got kind={config.kind!r}, corpus={corpus!r})"
            )
        images = DigitsImages(
            val_fraction=config.val_fraction, seed=config.seed, augment=config.augment
        )
        return images, None
    if config.kind == "seq2seq":
        return _build_seq2seq(config, cache)
    if config.kind == "classify" or corpus == TOPICS_CORPUS:
        return _build_topics(config, cache)
    if corpus in SYNTHETIC_TASKS or Path(corpus).suffix.lower() in PARALLEL_SUFFIXES:
        raise ValueError(f"corpus {corpus!r} holds (source, target) pairs: set kind='seq2seq'")
    text = resolve_text_corpus(corpus, config.max_bytes)
    info = text.scan(index_dir=cache / "corpus-index")
    tokenizer = _text_tokenizer(config, text, info, cache)
    files = tokenize_to_file(
        text, tokenizer, cache, val_fraction=config.val_fraction, progress=progress, info=info
    )
    windows = _token_windows(config, files, tokenizer, info.fingerprint(corpus))
    return windows, tokenizer


# --8<-- [end:build]


def _token_windows(
    config: DataConfig, files: TokenFiles, tokenizer: Tokenizer, fingerprint: dict[str, Any]
) -> TokenWindows:
    return TokenWindows(
        files,
        kind=config.kind,
        seq_len=config.seq_len,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        specials=special_ids(tokenizer),
        fingerprint={**fingerprint, "max_bytes": config.max_bytes},
    )


def _text_tokenizer(
    config: DataConfig, text: TextCorpus, info: CorpusInfo, cache: Path
) -> Tokenizer:
    # A character vocabulary reads the whole corpus; learned vocabularies only the train split.
    stop = None if config.tokenizer == "char" else val_start(info.total_bytes, config.val_fraction)
    key = {"corpus": info.digest, "train_bytes": stop}
    return build_tokenizer(
        config.tokenizer,
        lambda: text.texts(stop),
        vocab_size=config.vocab_size,
        cache_dir=cache,
        cache_key=key,
    )


def _build_topics(config: DataConfig, cache: Path) -> tuple[TopicParagraphs, Tokenizer]:
    """The python-topics classification task; a trained tokenizer sees only training text."""
    if config.kind != "classify" or config.corpus != TOPICS_CORPUS:
        raise ValueError(
            f"text classification reads only corpus={TOPICS_CORPUS!r} with kind='classify' "
            f"(got kind={config.kind!r}, corpus={config.corpus!r})"
        )
    examples = topic_examples()
    train_texts = [e.text for e in examples if not in_validation(e.text, config.val_fraction)]
    digest = hashlib.sha256("\n\n".join(train_texts).encode()).hexdigest()
    tokenizer = build_tokenizer(
        config.tokenizer,
        lambda: iter(train_texts),
        vocab_size=config.vocab_size,
        cache_dir=cache,
        cache_key={"corpus": TOPICS_CORPUS, "train_sha256": digest},
    )
    source = TopicParagraphs(
        tokenizer, specials=special_ids(tokenizer), seq_len=config.seq_len,
        val_fraction=config.val_fraction, examples=examples,
    )  # fmt: skip
    return source, tokenizer


def _synthetic_val_pairs(task: str, n: int, seed: int, max_len: int) -> list[tuple[str, str]]:
    """``n`` pairs with distinct sources from a stream of their own (not the training one)."""
    g = step_generator(seed, 0, stream=f"val-{task}")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(20 * n):
        if len(pairs) == n:
            break
        source, target = sample_example(task, g, max_len)
        if source not in seen:
            seen.add(source)
            pairs.append((source, target))
    if len(pairs) < n:
        logger.info(
            "task %s with sources up to %d long has only about %d distinct examples; the "
            "validation set has %d and training examples will repeat them",
            task,
            max_len,
            len(pairs),
            len(pairs),
        )
    return pairs


def _build_seq2seq(config: DataConfig, cache: Path) -> tuple[Seq2SeqSource, Tokenizer]:
    corpus = config.corpus
    if corpus in SYNTHETIC_TASKS:
        if config.tokenizer != "char":
            raise ValueError(
                f"the synthetic task {corpus!r} uses a character vocabulary: set tokenizer='char'"
            )
        if corpus == "dates" and config.seq_len < longest_date_source():
            raise ValueError(
                f"the dates task writes sources of up to {longest_date_source()} characters: "
                f"set seq_len >= {longest_date_source()} (got {config.seq_len})"
            )
        tokenizer = char_tokenizer([task_alphabet(corpus)])
        max_len = config.seq_len - 1  # a letter task's target and its eos fit in seq_len
        n_val = config.num_examples or DEFAULT_NUM_EXAMPLES
        val_pairs = _synthetic_val_pairs(corpus, n_val, config.seed, max_len)
        val_sources = {s for s, _ in val_pairs}

        def sample(g: torch.Generator) -> tuple[str, str]:
            # Redraw a pair whose source is in the validation set (a few tries at most, so a
            # task with few distinct examples still trains).
            for _ in range(_REJECTION_TRIES):
                pair = sample_example(corpus, g, max_len)
                if pair[0] not in val_sources:
                    break
            return pair

        fingerprint: dict[str, Any] = {
            "corpus": corpus,
            "synthetic": True,
            "validation_examples": n_val,
        }
    else:
        path = Path(corpus).expanduser()
        if path.suffix.lower() not in PARALLEL_SUFFIXES:
            raise ValueError(
                f"kind='seq2seq' needs a task ({', '.join(SYNTHETIC_TASKS)}) or a .tsv / .jsonl "
                f"file of (source, target) pairs, not {corpus!r}"
            )
        pairs = read_parallel(path)
        n_val = round(config.val_fraction * len(pairs))
        if n_val < 1 or n_val >= len(pairs):
            raise ValueError(
                f"{path} has {len(pairs)} pairs: val_fraction={config.val_fraction} leaves "
                f"{n_val} for validation and {len(pairs) - n_val} for training; both need at "
                "least one (add pairs or change val_fraction)"
            )
        train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        tokenizer = build_tokenizer(
            config.tokenizer,
            lambda: (text for pair in train_pairs for text in pair),
            vocab_size=config.vocab_size,
            cache_dir=cache,
            cache_key={"parallel": digest, "val_pairs": n_val},
        )

        def sample(g: torch.Generator) -> tuple[str, str]:
            return train_pairs[int(torch.randint(0, len(train_pairs), (1,), generator=g))]

        fingerprint = {"corpus": corpus, "sha256": digest, "pairs": len(pairs)}
    source = Seq2SeqSource(
        tokenizer,
        sample_pair=sample,
        val_pairs=val_pairs,
        seq_len=config.seq_len,
        specials=special_ids(tokenizer),
        fingerprint=fingerprint,
    )
    return source, tokenizer
