"""Fixtures of the training tests: one tokenized-corpus cache for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache shared by the tests (the corpora are tokenized once)."""
    return tmp_path_factory.mktemp("qkv-data-cache")
