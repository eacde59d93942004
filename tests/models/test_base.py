"""The family registry: subclassing a family does not take its place."""

from __future__ import annotations

from qkv.models import GPT
from qkv.models.base import FAMILIES


def test_a_subclass_of_a_family_does_not_replace_it() -> None:
    class Tweaked(GPT):  # inherits family = "gpt"
        pass

    assert FAMILIES["gpt"] is GPT
    assert Tweaked.family == "gpt"


def test_a_subclass_that_names_its_family_registers() -> None:
    class Renamed(GPT):
        family = "test-renamed-gpt"

    try:
        assert FAMILIES["test-renamed-gpt"] is Renamed
    finally:
        del FAMILIES["test-renamed-gpt"]
