"""An interactive attention explorer: one self-contained HTML file to open in any browser.

Attention weights are a tensor (L, H, T, S): for every layer and head, row t says how query token t
splits its attention over the S key tokens (each row sums to 1). Staring at 144 heatmaps is hard,
so the explorer draws the same numbers in two linked ways:

* **head view**: query tokens on the left, key tokens on the right, one line per (query, key)
  pair whose opacity is the weight, one colour per head. Pick the layer and the heads; hover a
  token to see only its row, with its largest weights written out.
* **model view**: every layer x head as a small heatmap (rows = queries, columns = keys); click
  one to open it in the head view.

Cross-attention puts the target (decoder) tokens on the left and the source (encoder) tokens on
the right. For a Vision Transformer (``kind="image"``) the selected query's attention is laid over
the image as a grid of patches. Several views (encoder, decoder, cross) can share one file.

The file is safe to open and share: every byte (data, script, style) is inline, a strict
Content-Security-Policy forbids any request, tokens travel as escaped JSON and the page only ever
sets them as text, so a token such as ``</script><script>alert(1)</script>`` is shown, not run.
Weights are stored as 4-decimal fixed point (2 bytes each), and inputs beyond ``max_tokens`` /
``max_layers`` are cut with a warning, so files stay small: MiniLM (6 layers x 12 heads) on the
seed sentence "The animal didn't cross the street because it was tired." (15 tokens) gives a
file of about 73 kB: 43 kB of weights (6 x 12 x 15 x 15 x 2 bytes, base64) and 29 kB of page.

Shape legend (the same in every file):
    B batch · T query positions · S key/value positions · D model width · H query heads ·
    K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from qkv._errors import QkvWarning
from qkv._io import atomic_write_text

__all__ = ["ExplorerView", "render_explorer", "write_explorer"]

logger = logging.getLogger(__name__)

# Weights are stored as round(w * WEIGHT_SCALE) in little-endian uint16: 4 decimals, 2 bytes each.
WEIGHT_SCALE = 10_000
# A row of attention weights must sum to 1 (or be all zero: a query allowed to see no key) within
# this tolerance; loose enough for weights captured in bfloat16, tight enough to catch raw scores.
ROW_SUM_TOL = 1e-2
# Above this many stored weights (about 2 bytes each once encoded) the file gets slow to open.
MAX_STORED_WEIGHTS = 8_000_000
# Images are downsampled (by striding) until neither side exceeds this many pixels.
MAX_IMAGE_SIDE = 512

ASSETS = "explorer_assets"


@dataclass(frozen=True, kw_only=True)
class ExplorerView:
    """One set of attention weights to explore, e.g. an encoder's self-attention.

    Args:
        name: what the tab is called ("self-attention", "encoder", "cross-attention", ...).
        query_tokens: the T tokens that attend (rows of the weights).
        key_tokens: the S tokens attended to (columns); for ``kind="self"`` usually the same.
        weights: (L, H, T, S) attention weights, NumPy or torch; every row sums to 1.
        kind: "self" (queries and keys are one sequence), "cross" (target tokens attend to source
            tokens) or "image" (a ViT: keys are image patches, maybe with [CLS] first).
        layer_labels: L names for the layers; default "layer 0", "layer 1", ...
        image: for ``kind="image"``: the picture, (h, w) grey or (h, w, 3) RGB, floats in [0, 1].
        grid: for ``kind="image"``: patch rows x cols; key tokens are rows*cols patches in
            row-major order, optionally preceded by one [CLS] token.
    """

    name: str
    query_tokens: list[str]
    key_tokens: list[str]
    weights: np.ndarray | torch.Tensor
    kind: Literal["self", "cross", "image"] = "self"
    layer_labels: list[str] | None = None
    image: np.ndarray | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _validate(self, _as_numpy(self.weights))


def _as_numpy(weights: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        return weights.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(weights)


def _validate(view: ExplorerView, w: np.ndarray) -> None:
    """Raise ValueError naming the problem (and the fix) if ``view`` cannot be drawn."""
    where = f"ExplorerView {view.name!r}"
    if not isinstance(view.name, str) or not view.name:
        raise ValueError("ExplorerView needs a non-empty name, e.g. name='encoder'")
    if view.kind not in ("self", "cross", "image"):
        raise ValueError(f"{where}: kind={view.kind!r}; use 'self', 'cross' or 'image'")
    for label, tokens in (("query_tokens", view.query_tokens), ("key_tokens", view.key_tokens)):
        if not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{where}: {label} must be strings; decode token ids first")
    if w.ndim != 4:
        raise ValueError(
            f"{where}: weights have shape {tuple(w.shape)}, expected 4 dims (L, H, T, S); "
            "stack the per-layer (B, H, T, S) tensors and pick one batch element"
        )
    n_layers, _, t, s = w.shape
    if (t, s) != (len(view.query_tokens), len(view.key_tokens)):
        raise ValueError(
            f"{where}: weights are (L, H, T, S) = {tuple(w.shape)} but there are "
            f"{len(view.query_tokens)} query and {len(view.key_tokens)} key tokens; "
            "pass one token per row (T) and per column (S)"
        )
    if 0 in w.shape:
        raise ValueError(f"{where}: weights {tuple(w.shape)} are empty; pass at least one token")
    if view.kind == "self" and t != s:
        raise ValueError(
            f"{where}: self-attention needs T == S, got T={t}, S={s}; use kind='cross'"
        )
    if view.layer_labels is not None and len(view.layer_labels) != n_layers:
        raise ValueError(
            f"{where}: {len(view.layer_labels)} layer_labels for {n_layers} layers; "
            "give one label per layer or none"
        )
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{where}: weights have dtype {w.dtype}; pass floating-point weights")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{where}: weights hold negative, NaN or inf values; pass softmax output")
    sums = w.sum(axis=-1, dtype=np.float64)  # (L, H, T)
    bad = ~(np.isclose(sums, 1.0, atol=ROW_SUM_TOL) | np.isclose(sums, 0.0, atol=ROW_SUM_TOL))
    if bad.any():
        layer, head, row = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: row {row} of layer {layer}, head {head} sums to {sums[layer, head, row]:.4f}"
            ", not 1; pass attention weights (after the softmax), not scores"
        )
    if view.kind == "image":
        _validate_image(view, where, s)
    elif view.grid is not None or view.image is not None:
        raise ValueError(f"{where}: image and grid need kind='image'")


def _validate_image(view: ExplorerView, where: str, n_keys: int) -> None:
    if view.grid is None:
        raise ValueError(
            f"{where}: kind='image' needs grid=(rows, cols), the patch grid, e.g. grid=(14, 14)"
        )
    rows, cols = view.grid
    if rows < 1 or cols < 1 or n_keys not in (rows * cols, rows * cols + 1):
        raise ValueError(
            f"{where}: grid {rows}x{cols} = {rows * cols} patches does not fit {n_keys} key "
            "tokens; keys must be the patches in row-major order, optionally after one [CLS]"
        )
    if view.image is not None:
        image = np.asarray(view.image)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(
                f"{where}: image has shape {image.shape}; pass (h, w) grey or (h, w, 3) RGB"
            )
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{where}: image values must lie in [0, 1]; divide by 255 first")


def _pick(
    count: int, chosen: Sequence[int] | None, limit: int | None, what: str, view: str
) -> list[int]:
    """Indices to keep out of ``count``: ``chosen`` if given, else the first ``limit``."""
    if chosen is not None:
        picked = [int(i) for i in chosen]
        if not picked:
            raise ValueError(f"{what}= is empty; pass at least one index or None for all")
        out = [i for i in picked if not -count <= i < count]
        if out:
            raise ValueError(
                f"{what}={list(chosen)} but view {view!r} has {count} {what} (0..{count - 1})"
            )
        return [i % count for i in picked]
    if limit is not None and count > limit:
        warnings.warn(
            f"view {view!r} has {count} {what}; keeping the first {limit} "
            f"(choose others with {what}=[...] or raise max_{what})",
            QkvWarning,
            stacklevel=4,
        )
        return list(range(limit))
    return list(range(count))


def _encode_weights(w: np.ndarray) -> str:
    """(L, H, T, S) floats -> base64 of little-endian uint16 fixed point (4 decimals)."""
    fixed = np.rint(np.clip(w, 0.0, 1.0) * WEIGHT_SCALE).astype("<u2")  # (L, H, T, S)
    return base64.b64encode(fixed.tobytes()).decode("ascii")


def _encode_image(image: np.ndarray) -> dict[str, Any]:
    """An image in [0, 1] -> base64 RGBA bytes the page copies straight into a canvas."""
    step = max(1, -(-max(image.shape[:2]) // MAX_IMAGE_SIDE))  # ceil division
    image = image[::step, ::step]  # (h, w) or (h, w, 3)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (h, w, 3)
    rgb = np.rint(image * 255).astype(np.uint8)  # (h, w, 3)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    return {
        "height": int(rgba.shape[0]),
        "width": int(rgba.shape[1]),
        "rgba": base64.b64encode(rgba.tobytes()).decode("ascii"),
    }


def _view_payload(
    view: ExplorerView,
    *,
    max_tokens: int,
    max_layers: int | None,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
) -> tuple[dict[str, Any], int]:
    """The JSON the page reads for one view, and how many weights it stores."""
    w = _as_numpy(view.weights)  # (L, H, T, S)
    n_layers, n_heads, t, s = w.shape
    keep_layers = _pick(n_layers, layers, max_layers, "layers", view.name)
    keep_heads = _pick(n_heads, heads, None, "heads", view.name)
    keep_t = min(t, max_tokens)
    # Image keys are the patch grid: cutting them would break the picture, so only queries shrink.
    keep_s = s if view.kind == "image" else min(s, max_tokens)
    if view.kind == "self":
        keep_s = keep_t
    if (keep_t, keep_s) != (t, s):
        warnings.warn(
            f"view {view.name!r} has {t} query and {s} key tokens; keeping the first "
            f"{keep_t} and {keep_s} (raise max_tokens to keep more, at a larger file)",
            QkvWarning,
            stacklevel=3,
        )
    w = w[np.ix_(keep_layers, keep_heads)][:, :, :keep_t, :keep_s]  # (L', H', T', S')
    labels = view.layer_labels or [f"layer {i}" for i in range(n_layers)]
    payload: dict[str, Any] = {
        "name": view.name,
        "kind": view.kind,
        "queryTokens": list(view.query_tokens[:keep_t]),
        "keyTokens": list(view.key_tokens[:keep_s]),
        "layerLabels": [labels[i] for i in keep_layers],
        "headLabels": [f"head {h}" for h in keep_heads],
        "shape": list(w.shape),
        "scale": WEIGHT_SCALE,
        "weights": _encode_weights(w),
        "truncated": {"queries": t - keep_t, "keys": s - keep_s},
        "grid": list(view.grid) if view.grid is not None else None,
        "image": _encode_image(np.asarray(view.image)) if view.image is not None else None,
    }
    return payload, int(w.size)


def _script_safe_json(obj: Any) -> str:
    """JSON that cannot end the <script> element it sits in or start HTML markup."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def render_explorer(
    views: Sequence[ExplorerView],
    *,
    title: str = "qkv attention explorer",
    max_tokens: int = 256,
    max_layers: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> str:
    """Build the explorer page as a string; see ``write_explorer`` for the arguments."""
    if not views:
        raise ValueError("no views to show; pass at least one ExplorerView")
    if max_tokens < 1 or (max_layers is not None and max_layers < 1):
        raise ValueError(f"max_tokens={max_tokens} and max_layers={max_layers} must be >= 1")
    payloads, stored = [], 0
    for view in views:
        if not isinstance(view, ExplorerView):
            raise ValueError(f"views must be ExplorerView objects, got {type(view).__name__}")
        payload, n = _view_payload(
            view, max_tokens=max_tokens, max_layers=max_layers, layers=layers, heads=heads
        )
        payloads.append(payload)
        stored += n
    if stored > MAX_STORED_WEIGHTS:
        warnings.warn(
            f"the explorer stores {stored:,} weights (about {2.7 * stored / 1e6:.0f} MB); "
            "choose fewer with layers=, heads= or max_tokens=",
            QkvWarning,
            stacklevel=3,
        )
    assets = resources.files("qkv.viz").joinpath(ASSETS)
    template = assets.joinpath("explorer.html").read_text(encoding="utf-8")
    script = assets.joinpath("explorer.js").read_text(encoding="utf-8")
    style = assets.joinpath("explorer.css").read_text(encoding="utf-8")
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_csp_hash(script)}",
            f"style-src {_csp_hash(style)}",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )
    data = _script_safe_json({"title": title, "views": payloads})
    # Fill the slots in one pass so that no filled-in text is ever searched for another slot.
    slots = {
        "{{CSP}}": html.escape(csp),
        "{{TITLE}}": html.escape(title),
        "{{STYLE}}": style,
        "{{DATA}}": data,
        "{{SCRIPT}}": script,
    }
    parts = template.split("{{")
    page = [parts[0]]
    for part in parts[1:]:
        key, _, rest = part.partition("}}")
        page.append(slots["{{" + key + "}}"] + rest)
    return "".join(page)


def write_explorer(
    path: str | os.PathLike[str],
    views: Sequence[ExplorerView],
    *,
    title: str = "qkv attention explorer",
    max_tokens: int = 256,
    max_layers: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Path:
    """Write a self-contained HTML attention explorer (no network needed, none allowed).

    Args:
        path: the .html file to write (parent directories are created).
        views: the attention to show, one tab each (e.g. encoder, decoder, cross-attention).
        title: the page title.
        max_tokens: keep at most this many query and key tokens per view (the first ones);
            cutting warns with ``qkv.QkvWarning``. Image views keep all their patch keys.
        max_layers: keep at most this many layers (the first ones), with a warning; None = all.
        layers: layer indices to keep (e.g. ``[0, 5]``); overrides ``max_layers``.
        heads: head indices to keep in every layer; None = all.

    Returns:
        The path written.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> w = np.full((1, 2, 3, 3), 1 / 3)  # (L, H, T, S)
        >>> view = ExplorerView(name="toy", query_tokens=["a", "b", "c"],
        ...                     key_tokens=["a", "b", "c"], weights=w)
        >>> out = write_explorer(pathlib.Path(tempfile.mkdtemp()) / "toy.html", [view])
        >>> out.read_text().startswith("<!DOCTYPE html>")
        True
    """
    page = render_explorer(
        views,
        title=title,
        max_tokens=max_tokens,
        max_layers=max_layers,
        layers=layers,
        heads=heads,
    )
    target = atomic_write_text(path, page)
    logger.info("wrote the attention explorer to %s (%d bytes)", target, len(page.encode()))
    return target
