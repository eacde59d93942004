"""The positional package: its public names and the runnable examples in its docstrings."""

from __future__ import annotations

import doctest
import importlib

import pytest

import qkv.positional

MODULES = ["sinusoidal", "learned", "rope", "alibi", "relative_bias", "relative_keys"]


def test_public_names_are_exported() -> None:
    expected = {
        "sinusoidal_table",
        "SinusoidalPositionalEncoding",
        "LearnedPositionalEmbedding",
        "rope_frequencies",
        "rotate_half",
        "apply_rotary",
        "RotaryEmbedding",
        "alibi_slopes",
        "alibi_bias",
        "ALiBi",
        "t5_relative_bucket",
        "T5RelativeBias",
        "ShawRelativeKeys",
    }
    assert set(qkv.positional.__all__) == expected
    for name in expected:
        assert getattr(qkv.positional, name).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", [*MODULES, "_positions"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"qkv.positional.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"qkv.positional.{name} has no runnable example"
    assert result.failed == 0
