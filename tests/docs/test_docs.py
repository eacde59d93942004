"""The docs run: their code blocks execute, their includes resolve, and the site builds strictly.

Conventions the docs follow (and these tests enforce):
    * A ```python fence holding only a snippet line, ``--8<-- "path:section"``, shows source code
      included from ``path`` between ``# --8<-- [start:section]`` and ``# --8<-- [end:section]``.
    * Every other ```python fence is runnable. The fences of one page run in order, in one fresh
      namespace, so a later block may use names from an earlier one.
    * A line starting with ``qkv `` in a ```bash fence is a command that must exit with status 0;
      it runs as ``python -m qkv ...`` with the interpreter running these tests.
    * Each page of docs/learn/ has a "## One thing to run" section, a runnable block, and at least
      one include.
    * ``mkdocs build --strict`` succeeds, and the built pages show the included source.
"""

from __future__ import annotations

import html
import linecache
import os
import re
import shlex
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.optional import require, require_what_text_needs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LEARN_PAGES = sorted((DOCS / "learn").glob("*.md"))

FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})[ \t]*(?P<lang>[\w+-]*)")
SNIPPET_LINE = re.compile(r'^\s*-+8<-+\s+"(?P<target>[^"]+)"\s*$')
SECTION_NAME = re.compile(r"[a-z][-_0-9a-z]*", re.IGNORECASE)


@dataclass(frozen=True)
class Fence:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def is_include(self) -> bool:
        """A fence whose only content is snippet lines shows included source; it is not run."""
        lines = [x for x in self.code.splitlines() if x.strip()]
        return bool(lines) and all(SNIPPET_LINE.match(x) for x in lines)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fences(page: Path) -> list[Fence]:
    """The fenced code blocks of ``page``, in order (fences indented under a list or an
    admonition included, their indentation removed)."""
    found: list[Fence] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if m is None:
            i += 1
            continue
        ticks, start = m["ticks"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(ticks) and not lines[i].strip().strip("`")
        ):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel(page)}:{start + 1}: code fence is never closed")
        code = textwrap.dedent("\n".join(body))
        found.append(Fence(page, start + 1, m["lang"].lower(), code + "\n"))
        i += 1
    return found


def runnable_python(page: Path) -> list[Fence]:
    return [f for f in fences(page) if f.lang in ("python", "py") and not f.is_include]


def snippet_targets() -> list[tuple[str, str, str | None]]:
    """(where, path, section) for every ``--8<-- "path:section"`` line in the docs."""
    targets = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            m = SNIPPET_LINE.match(line)
            if m is None:
                continue
            path, section = m["target"], None
            head, sep, tail = path.rpartition(":")
            if sep and SECTION_NAME.fullmatch(tail):
                path, section = head, tail
            targets.append((f"{rel(page)}:{n}", path, section))
    return targets


def section_lines(path: Path, section: str) -> list[str]:
    """The lines between the start and end markers of ``section`` in ``path``, as included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, x in enumerate(lines) if x.strip() == f"# --8<-- [start:{section}]"]
    ends = [i for i, x in enumerate(lines) if x.strip() == f"# --8<-- [end:{section}]"]
    assert len(starts) == 1, f"{rel(path)}: expected one '# --8<-- [start:{section}]' line"
    assert len(ends) == 1, f"{rel(path)}: expected one '# --8<-- [end:{section}]' line"
    assert starts[0] < ends[0], f"{rel(path)}: section {section!r} ends before it starts"
    return [x for x in lines[starts[0] + 1 : ends[0]] if "--8<--" not in x]


def qkv_commands() -> list[tuple[str, tuple[str, ...]]]:
    """(where, commands) for every ```bash fence holding ``qkv ...`` lines, in page order.

    The commands of one fence run in order, in one fresh working directory: a later command may
    use what an earlier one wrote (``qkv train ... --out run`` then ``qkv sample run``).
    """
    found: list[tuple[str, tuple[str, ...]]] = []
    for page in PAGES:
        for fence in fences(page):
            if fence.lang not in ("bash", "sh", "shell", "console"):
                continue
            commands = tuple(
                line.strip()
                for line in fence.code.splitlines()
                if line.strip() == "qkv" or line.strip().startswith("qkv ")
            )
            if commands:
                found.append((f"{rel(page)}:{fence.line}", commands))
    return found


def test_docs_exist() -> None:
    assert (DOCS / "index.md").is_file()
    assert LEARN_PAGES, "docs/learn/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_python_blocks_run(page: Path) -> None:
    """The runnable ```python blocks of a page execute in order, in one fresh namespace."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    require_what_text_needs("\n".join(f.code for f in runnable_python(page)))
    for number, fence in enumerate(runnable_python(page), start=1):
        where = f"{rel(page)}, python block {number} (line {fence.line})"
        # Register the block's text so that a traceback can quote the failing line.
        linecache.cache[where] = (len(fence.code), None, fence.code.splitlines(True), where)
        error = None
        try:
            exec(compile(fence.code, where, "exec"), namespace)
        except Exception:
            error = traceback.format_exc()
        if error is not None:
            pytest.fail(f"{where} failed:\n{error}", pytrace=False)


@pytest.mark.parametrize("page", LEARN_PAGES, ids=[rel(p) for p in LEARN_PAGES])
def test_learn_page_has_something_to_run(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "## One thing to run" in text, f"{rel(page)} has no 'One thing to run' section"
    assert runnable_python(page), f"{rel(page)} has no runnable python block"
    includes = [f for f in fences(page) if f.lang == "python" and f.is_include]
    assert includes, f"{rel(page)} includes no code from the source"


@pytest.mark.parametrize("page", PAGES, ids=[rel(p) for p in PAGES])
def test_include_fences_hold_only_the_snippet(page: Path) -> None:
    """Included source is never mixed with runnable code in one fence."""
    for fence in fences(page):
        lines = fence.code.splitlines()
        if any(SNIPPET_LINE.match(x) for x in lines):
            assert fence.is_include and len([x for x in lines if x.strip()]) == 1, (
                f"{rel(page)}:{fence.line}: a fence with a snippet line must contain only it"
            )


@pytest.mark.parametrize(
    ("where", "path", "section"), snippet_targets(), ids=[w for w, _, _ in snippet_targets()]
)
def test_snippet_targets_exist(where: str, path: str, section: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{where}: {path} does not exist"
    if section is not None:
        body = section_lines(file, section)
        assert any(x.strip() for x in body), f"{where}: section {section!r} of {path} is empty"


@pytest.mark.parametrize(("where", "commands"), qkv_commands(), ids=[w for w, _ in qkv_commands()])
def test_cli_commands_run(where: str, commands: tuple[str, ...], tmp_path: Path) -> None:
    require_what_text_needs("\n".join(commands))
    for command in commands:
        args = shlex.split(command)[1:]
        result = subprocess.run(
            [sys.executable, "-m", "qkv", *args],
            cwd=tmp_path,  # what a command writes stays out of the repository
            # One thread: the suite runs two workers on two cores, and oversubscribed OpenMP
            # threads slow a training command down tenfold.
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = f"{result.stdout}\n{result.stderr}"
        assert result.returncode == 0, f"{where}: `{command}` exited {result.returncode}\n{output}"
        assert result.stdout.strip(), f"{where}: `{command}` printed nothing"


def _visible_text(page_html: str) -> str:
    """The text of an HTML page as a reader sees it: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page_html))


def test_mkdocs_builds_strictly_with_includes(tmp_path: Path) -> None:
    require("mkdocs")
    require("pymdownx")
    require("material")  # the theme (mkdocs-material)
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    site = tmp_path / "site"
    config = ROOT / "mkdocs.yml"
    result = subprocess.run(
        [*command, "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,  # snippet paths are relative to the repository root
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"

    # The page on attention shows the reference function, included from core.py line for line.
    text = _visible_text((site / "learn" / "01-attention" / "index.html").read_text("utf-8"))
    reference = section_lines(ROOT / "src" / "qkv" / "attention" / "core.py", "reference")
    assert "def reference_attention(" in text
    for line in reference:
        assert line.strip() in text, f"included source line missing from the built page: {line}"

    # No include was left unexpanded anywhere.
    for built in site.rglob("*.html"):
        assert "--8&lt;--" not in built.read_text("utf-8") and "--8<--" not in _visible_text(
            built.read_text("utf-8")
        ), f"{built.relative_to(site)} still contains a snippet line"
