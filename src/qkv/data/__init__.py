"""Data for training: tokenizers, corpora, token files and batch sources.

Read in this order: ``config`` (what to train on, and the ``DataSource`` protocol),
``tokenizers`` (text to ids), ``corpora`` (where text comes from), ``tokens`` (a corpus
tokenized once into memory-mapped files), then one module per kind of batch: ``windows``
(language modelling), ``tasks`` / ``parallel`` / ``seq2seq`` (sequence to sequence),
``images`` (digits for a ViT), ``topics`` (paragraphs of Python's docs to classify); ``build``
puts them together from a ``DataConfig``.
"""

from qkv.data.build import build_data, build_tokenizer
from qkv.data.config import DataConfig, DataSource, step_generator
from qkv.data.corpora import TextCorpus, resolve_text_corpus
from qkv.data.images import DigitsImages
from qkv.data.parallel import read_parallel
from qkv.data.seq2seq import IGNORE_INDEX, Seq2SeqSource
from qkv.data.tasks import SYNTHETIC_TASKS, sample_example
from qkv.data.tokenizers import (
    SpecialIds,
    char_tokenizer,
    load_tokenizer,
    special_ids,
    train_bpe,
    train_wordpiece,
)
from qkv.data.tokens import TokenFiles, token_dtype, tokenize_to_file
from qkv.data.windows import TokenWindows

__all__ = [
    "IGNORE_INDEX",
    "SYNTHETIC_TASKS",
    "DataConfig",
    "DataSource",
    "DigitsImages",
    "Seq2SeqSource",
    "SpecialIds",
    "TextCorpus",
    "TokenFiles",
    "TokenWindows",
    "build_data",
    "build_tokenizer",
    "char_tokenizer",
    "load_tokenizer",
    "read_parallel",
    "resolve_text_corpus",
    "sample_example",
    "special_ids",
    "step_generator",
    "token_dtype",
    "tokenize_to_file",
    "train_bpe",
    "train_wordpiece",
]
