"""The built docs site, read in headless chromium with the network cut off.

The site is built with ``mkdocs build --strict`` into a temporary folder and served from a local
HTTP server on 127.0.0.1 (Material's search runs in a web worker, which file:// URLs forbid).
Every request for anything but that server is aborted and recorded. Pages 01 and 04 must then
show their equations typeset by the vendored KaTeX, their code highlighted by Pygments, and no
request may have left the machine. Screenshots go to build/test-artifacts/ (git-ignored), light
and dark, so that a CI run can keep them.

Without playwright, mkdocs, Material or chromium these tests skip, except on CI (``CI=true``),
where they fail: ``make browser`` installs chromium.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.optional import missing, skip_or_fail
from tests.viz.conftest import ARTIFACTS, CHROMIUM, LAUNCH_ARGS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.requires("playwright", "mkdocs", "pymdownx")

PAGES = {
    "01": "learn/01-attention/",
    "04": "learn/04-positions/",
}

# TeX left as text: a control word (\frac, \sqrt, \top), or math delimiters ($$, \( \), \[ \]).
RAW_TEX = re.compile(r"\\[A-Za-z]+|\$\$|\\[()\[\]]")

# The text of the page's article as a reader sees it: without code blocks (which may hold
# backslashes of their own) and without KaTeX's hidden MathML copy of each formula, whose
# <annotation> keeps the TeX source on purpose.
VISIBLE_PROSE = """() => {
  const article = document.querySelector("article.md-content__inner").cloneNode(true);
  article.querySelectorAll("pre, code, .katex-mathml").forEach((e) => e.remove());
  return article.innerText;
}"""

MATH_COUNTS = """() => ({
  formulas: document.querySelectorAll("article .arithmatex").length,
  untypeset: document.querySelectorAll("article .arithmatex:not(:has(.katex))").length,
  katex: document.querySelectorAll("article .arithmatex .katex").length,
  display: document.querySelectorAll("article div.arithmatex .katex-display").length,
  errors: document.querySelectorAll("article .katex-error").length,
  katexFont: document.fonts.check("16px KaTeX_Main"),
})"""

# Pygments marks each token with a short class (k: keyword, n: name, mf: float, ...); Material's
# stylesheet colours them. A keyword's colour must differ from the block's plain text colour.
HIGHLIGHTING = """() => {
  const keywords = document.querySelectorAll("article .highlight pre code span.k");
  const tokens = document.querySelectorAll("article .highlight pre code span[class]");
  const code = document.querySelector("article .highlight pre code");
  return {
    tokens: tokens.length,
    keywords: keywords.length,
    keywordColor: keywords.length ? getComputedStyle(keywords[0]).color : null,
    plainColor: code ? getComputedStyle(code).color : null,
  };
}"""


def _require_material() -> None:
    reason = missing("material")
    if reason is not None:
        skip_or_fail(reason.replace("pip install material", "pip install 'qkv[dev]'"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs, built strictly into a fresh folder."""
    _require_material()
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*command, "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,  # snippet paths are relative to the repository root
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return out


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the server prints nothing
        pass


@pytest.fixture(scope="module")
def origin(site: Path) -> Iterator[str]:
    """The built site served on 127.0.0.1, on a free port, for the module's tests."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Debian chromium for the module."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        skip_or_fail(f"no chromium at {CHROMIUM} (run `make browser`, or set QKV_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@dataclass
class OfflinePage:
    """A page whose requests may only reach the local server; the others are aborted here."""

    page: Any
    origin: str
    requests: list[str] = field(default_factory=list)  # every request the pages made
    blocked: list[str] = field(default_factory=list)  # those aborted for leaving the machine
    failed: list[str] = field(default_factory=list)  # local requests that failed or 4xx/5xx
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def open(self, path: str) -> None:
        self.page.goto(f"{self.origin}/{path}", wait_until="load")
        # Wait for the web fonts (KaTeX's among them) so the screenshots show the real glyphs.
        self.page.evaluate("() => document.fonts.ready.then(() => true)")

    def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def is_local(self, url: str) -> bool:
        return url == self.origin or url.startswith((self.origin + "/", "data:", "blob:"))

    def assert_offline_and_clean(self) -> None:
        assert self.requests, "no request was recorded at all"
        leaving = [u for u in self.requests if not self.is_local(u)]
        assert leaving == [] and self.blocked == [], f"requests left: {leaving or self.blocked}"
        assert self.failed == [], f"local requests failed: {self.failed}"
        assert self.console_errors == [], self.console_errors
        assert self.page_errors == [], self.page_errors


@pytest.fixture
def offline_page(browser: Any, origin: str) -> Iterator[Any]:
    """Open pages in fresh browser contexts, with every non-local request blocked and kept."""
    contexts = []

    def _new(*, color_scheme: str = "light") -> OfflinePage:
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, color_scheme=color_scheme
        )
        contexts.append(context)
        page = context.new_page()
        watched = OfflinePage(page, origin)

        def route(route: Any) -> None:
            if watched.is_local(route.request.url):
                route.continue_()
            else:
                watched.blocked.append(route.request.url)
                route.abort("blockedbyclient")

        def on_response(response: Any) -> None:
            if response.status >= 400:
                watched.failed.append(f"{response.status} {response.url}")

        def on_console(message: Any) -> None:
            if message.type == "error":
                watched.console_errors.append(message.text)

        context.route("**/*", route)
        # Every request, including any the route does not see (a web worker's, a data: URL).
        context.on("request", lambda request: watched.requests.append(request.url))
        page.on("response", on_response)
        page.on("requestfailed", lambda r: watched.failed.append(f"{r.failure} {r.url}"))
        page.on("console", on_console)
        page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
        return watched

    yield _new
    for context in contexts:
        context.close()


@pytest.mark.parametrize("number", sorted(PAGES))
def test_page_shows_math_and_highlighted_code_offline(offline_page: Any, number: str) -> None:
    watched = offline_page()
    watched.open(PAGES[number])

    math = watched.page.evaluate(MATH_COUNTS)
    assert math["formulas"] > 0, f"page {number} has no formulas to typeset"
    assert math["untypeset"] == 0, f"page {number}: {math['untypeset']} formulas left as TeX"
    assert math["katex"] == math["formulas"] and math["display"] > 0, math
    assert math["errors"] == 0, math
    assert math["katexFont"], "KaTeX's fonts did not load"

    prose = watched.page.evaluate(VISIBLE_PROSE)
    raw = sorted(set(RAW_TEX.findall(prose)))
    assert raw == [], f"page {number} shows raw TeX: {raw}"

    code = watched.page.evaluate(HIGHLIGHTING)
    assert code["tokens"] > 0 and code["keywords"] > 0, f"page {number}: no highlighted code"
    assert code["keywordColor"] != code["plainColor"], code

    watched.screenshot(f"page-{number}")
    watched.assert_offline_and_clean()


def test_dark_mode_toggle_and_search_work_offline(offline_page: Any) -> None:
    watched = offline_page()
    watched.open(PAGES["01"])
    page = watched.page
    assert page.get_attribute("body", "data-md-color-scheme") == "default"

    # The header's toggle switches to the dark palette; the math stays typeset.
    page.click("label[title='Switch to dark mode']")
    page.wait_for_selector("body[data-md-color-scheme='slate']")
    assert page.evaluate(MATH_COUNTS)["untypeset"] == 0
    watched.screenshot("page-01-dark", full_page=False)

    # Search runs in the browser, on the index built into the site.
    page.click("input.md-search__input")
    page.keyboard.type("softmax")
    page.wait_for_selector(".md-search-result__item", timeout=15_000)
    assert page.locator(".md-search-result__item").count() > 0

    watched.assert_offline_and_clean()


def test_a_reader_in_dark_mode_gets_the_dark_palette(offline_page: Any) -> None:
    watched = offline_page(color_scheme="dark")
    watched.open(PAGES["04"])
    assert watched.page.get_attribute("body", "data-md-color-scheme") == "slate"
    watched.assert_offline_and_clean()
