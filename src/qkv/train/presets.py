"""Named training runs: small YAML files in ``qkv/train/presets/``, one per job.

Each preset is a partial ``TrainConfig`` (see ``qkv.train.config``); what it leaves out takes
the dataclasses' defaults, and ``--section.key value`` overrides any of it::

    gpt-char            GPT, characters of Python's documentation (the main job, 3 minutes)
    gpt-code            GPT, byte-level BPE on Python's standard library sources
    gpt2-code           GPT-2 small's shape on the same sources: the preset for a GPU
    llama-char          LLaMA-style decoder on the same characters as gpt-char
    bert-mlm            BERT masked-LM pre-training, WordPiece on Python's documentation
    transformer-dates   the 2017 encoder-decoder rewriting dates as ISO dates
    t5-tasks            T5 on a synthetic task (reverse; copy, sort, dates)
    vit-digits          ViT on 8x8 handwritten digits
    minilm-classify     MiniLM fine-tuned to classify paragraphs of Python's documentation
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from qkv.train.config import ConfigError

__all__ = ["list_presets", "load_preset"]


def _files() -> dict[str, Any]:
    folder = resources.files("qkv.train") / "presets"
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """The names of the built-in presets, sorted.

    Example:
        >>> "gpt-char" in list_presets()
        True
    """
    return sorted(_files())


def load_preset(name: str) -> dict[str, Any]:
    """A preset as plain data (for ``merge_overrides`` and ``config_from_dict``).

    Raises:
        ConfigError: no preset has that name.
    """
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(files))}")
    data = yaml.safe_load(files[name].read_text(encoding="utf-8")) or {}
    return {"preset": name, **data}
