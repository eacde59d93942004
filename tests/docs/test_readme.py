"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.optional import require_what_text_needs

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README shows no Python example"
    require_what_text_needs("\n".join(blocks))
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    namespace: dict[str, object] = {}
    for i, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"README.md python block {i} failed: {type(e).__name__}: {e}")
    assert (tmp_path / "my-gpt" / "model.safetensors").is_file()


def test_readme_commands_are_the_makefile_targets() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci
