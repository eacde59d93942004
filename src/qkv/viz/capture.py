"""Capturing attention: the weights every head of a model gives every key, while it runs fast.

    A = softmax(Q K^T / sqrt(E) + bias, masked)        (B, H, T, S), each row sums to 1
    check:  A V == the fast path's output of the heads (before the output projection)

A model normally computes attention with a fused kernel that never materialises A. To look at A,
each captured layer recomputes it from the very q and k (after rotary positions, with the same
score bias and mask) that the fast kernel used: ``MultiHeadAttention.capture_weights``, the
reference softmax of ``qkv.attention.core``, switched on by ``qkv.attention.multihead.capturing``
(which models' ``output_attentions`` uses too). The model's output still comes from the fast
path, unchanged. Because the fast path never shows its weights, the capture proves that what it
shows is what ran: for every captured layer, the recomputed weights times the values must equal
the output the fast kernel produced, within float tolerance (``check_weights``). Wrong weights
(a forgotten mask, a missing bias, a head out of place) fail that check.

Which attention is which is read from the model's structure, never from its family's name:
a layer that owns a ``cross_attn`` is a decoder layer, so its ``self_attn`` is the decoder's
self-attention; the other layers of a model with cross-attention form the encoder. A model
without cross-attention (GPT, LLaMA, BERT, ViT, prefix-LM) has one kind, "self".

Shape legend (the same in every file):
    B batch · T query positions · S key/value positions · D model width · H query heads ·
    K key/value heads · E head dim · F MLP hidden width · V vocabulary · L layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from qkv.attention.backends import repeat_kv
from qkv.attention.multihead import MultiHeadAttention, capturing

if TYPE_CHECKING:
    from qkv.viz.explorer import ExplorerView

__all__ = [
    "KINDS",
    "AttentionCheckError",
    "AttentionMaps",
    "CapturedAttention",
    "Recording",
    "attention_sites",
    "capture_attention",
    "check_weights",
    "record_attention",
]

Kind = Literal["self", "encoder", "decoder", "cross"]
KINDS: tuple[Kind, ...] = ("self", "encoder", "decoder", "cross")
# How each kind is named in pictures and in the explorer's tabs.
VIEW_NAMES: dict[str, str] = {
    "self": "self-attention",
    "encoder": "encoder",
    "decoder": "decoder",
    "cross": "cross-attention",
    "image": "patches",
}
# The check's tolerance, in units of the dtype's machine epsilon times the largest |value|:
# a weighted average of S values in float32 is off by a few eps per term at most.
CHECK_EPS_FACTOR = 64.0


class AttentionCheckError(RuntimeError):
    """The captured weights do not reproduce the fast path's output: they are not what ran."""


def attention_sites(model: nn.Module) -> dict[Kind, list[MultiHeadAttention]]:
    """The attention modules of ``model``, grouped by kind, each list in layer order.

    Args:
        model: any qkv model (or stack of layers).

    Returns:
        ``{"self": [...]}`` for a model without cross-attention, else ``{"encoder": [...],
        "decoder": [...], "cross": [...]}`` (kinds with no module are left out).

    Example:
        >>> from qkv.models.t5 import PRESETS, T5
        >>> {kind: len(mods) for kind, mods in attention_sites(T5(PRESETS["tiny"])).items()}
        {'encoder': 2, 'decoder': 2, 'cross': 2}
    """
    modules = dict(model.named_modules())
    found = [(path, m) for path, m in modules.items() if isinstance(m, MultiHeadAttention)]
    # A layer that owns a cross-attention is a decoder layer.
    decoder_layers = {path.rpartition(".")[0] for path, _ in found if path.endswith("cross_attn")}
    sites: dict[Kind, list[MultiHeadAttention]] = {}
    for path, m in found:
        parent, _, name = path.rpartition(".")
        kind: Kind
        if not decoder_layers:
            kind = "self"
        elif name == "cross_attn":
            kind = "cross"
        else:
            kind = "decoder" if parent in decoder_layers else "encoder"
        sites.setdefault(kind, []).append(m)
    return sites


# --8<-- [start:check]
def check_weights(
    weights: Tensor, values: Tensor, output: Tensor, *, atol: float | None = None
) -> float:
    """Check that attention weights reproduce the fast path's output: weights @ V == output.

    Args:
        weights: (B, H, T, S), the recomputed attention weights.
        values: (B, K, S, E), the values the fast path used (K key/value heads, H a multiple).
        output: (B, H, T, E), what the fast path returned, before the heads are merged.
        atol: the largest allowed absolute difference; default ``CHECK_EPS_FACTOR`` machine
            epsilons of ``output``'s dtype, times max(1, max |V|).

    Returns:
        The largest absolute difference found.

    Raises:
        AttentionCheckError: the difference exceeds ``atol``.

    Example:
        >>> v = torch.randn(1, 1, 3, 4)  # (B, K, S, E)
        >>> w = torch.softmax(torch.randn(1, 2, 2, 3), -1)  # (B, H, T, S)
        >>> check_weights(w, v, w @ v) < 1e-6
        True
    """
    n_rep = weights.shape[1] // values.shape[1]
    v = repeat_kv(values, n_rep).double()  # (B, H, S, E): query head h reads kv head h // n_rep
    rebuilt = weights.double() @ v  # (B, H, T, E): each query's weighted average of the values
    error = (rebuilt - output.double()).abs().max().item() if output.numel() else 0.0
    if atol is None:
        eps = torch.finfo(output.dtype).eps
        atol = CHECK_EPS_FACTOR * eps * max(1.0, values.abs().max().item())
    if not error <= atol:  # (NaN fails too)
        raise AttentionCheckError(
            f"captured weights @ V differ from the fast path's output by {error:.3g} > {atol:.3g}: "
            "the weights are not the ones that ran (a mask, bias or head mismatch)"
        )
    return error


# --8<-- [end:check]


@dataclass(frozen=True, kw_only=True)
class Recording:
    """What one batched forward pass recorded (see ``record_attention``).

    Attributes:
        weights: per kind, (B, L, H, T, S) for the L recorded layers; padded keys have weight 0.
        layers: per kind, the model's index of each recorded layer.
        max_error: the largest |weights @ V - fast output| over recorded layers (None: no check).
        output: what the model's forward returned (computed by the fast path).
    """

    weights: dict[Kind, Tensor]
    layers: dict[Kind, tuple[int, ...]]
    max_error: float | None
    output: Any = field(repr=False)


def _pick_layers(n: int, layers: Sequence[int] | None, kind: str) -> list[int]:
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad or not layers:
        raise ValueError(
            f"layers={list(layers)} do not exist in the {kind} attention, which has {n} layers "
            f"(0..{n - 1}); pick layers in that range"
        )
    return sorted({i % n for i in layers})


# --8<-- [start:record]
def record_attention(
    model: nn.Module,
    *args: Any,
    layers: Sequence[int] | None = None,
    check: bool = True,
    **kwargs: Any,
) -> Recording:
    """Run ``model(*args, **kwargs)`` once and record the exact attention weights of its layers.

    The model keeps its fast attention path: each recorded layer recomputes its weights from
    the same q, k, mask and bias (``MultiHeadAttention.capture_weights``), and with ``check``
    proves them by ``check_weights``. The model runs in eval mode (no dropout) under
    ``torch.no_grad``; its training mode is restored afterwards.

    Args:
        model: a qkv model (any family).
        *args, **kwargs: the inputs of its forward, e.g. ``input_ids``, ``attention_mask``,
            ``decoder_input_ids``, ``pixel_values``.
        layers: layer indices to record in every kind of attention (negative counts from the
            end); None records all of them.
        check: verify weights @ V against the fast output in every recorded layer.

    Returns:
        A ``Recording`` with weights (B, L, H, T, S) per kind.

    Raises:
        AttentionCheckError: with ``check``, weights that do not reproduce the fast output.
    """
    sites = attention_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention modules to record")
    chosen = {kind: _pick_layers(len(mods), layers, kind) for kind, mods in sites.items()}
    modules = [sites[kind][i] for kind, idx in chosen.items() for i in idx]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), capturing(modules) as captured:
            output = model(*args, **kwargs)
    finally:
        model.train(was_training)
    max_error: float | None = 0.0 if check else None
    weights: dict[Kind, Tensor] = {}
    remaining = iter(captured)  # in the order of ``modules``: kind by kind, layer by layer
    for kind, idx in chosen.items():
        ran = [c for c in (next(remaining) for _ in idx) if c is not None]
        if check:
            for c in ran:
                max_error = max(check_weights(c.weights, c.values, c.output), max_error or 0.0)
        if len(ran) == len(idx):  # else some did not run (an encoder-decoder without decoder input)
            weights[kind] = torch.stack([c.weights.float().cpu() for c in ran], dim=1)
    recorded = {kind: tuple(idx) for kind, idx in chosen.items() if kind in weights}
    return Recording(weights=weights, layers=recorded, max_error=max_error, output=output)


# --8<-- [end:record]


@dataclass(frozen=True, kw_only=True)
class AttentionMaps:
    """One kind of attention of one example: weights (L, H, T, S) and what rows and columns are.

    Attributes:
        name: "self-attention", "encoder", "decoder", "cross-attention" or "patches".
        kind: "self" (queries and keys are one sequence), "cross" (target attends to source) or
            "image" (a ViT: keys are [CLS] and the image's patches).
        weights: (L, H, T, S) float32 on the CPU; every row sums to 1 (padding trimmed).
        query_tokens: T strings, the rows.
        key_tokens: S strings, the columns.
        layers: the model's index of each of the L layers.
        heads: the model's index of each of the H heads.
        image: ``kind="image"``: the picture, (h, w) or (h, w, 3) floats in [0, 1].
        grid: ``kind="image"``: patch rows x cols.
    """

    name: str
    kind: Literal["self", "cross", "image"]
    weights: Tensor
    query_tokens: list[str]
    key_tokens: list[str]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    image: np.ndarray | None = None
    grid: tuple[int, int] | None = None

    @property
    def layer_labels(self) -> list[str]:
        return [f"layer {i}" for i in self.layers]

    def head(self, layer: int, head: int) -> Tensor:
        """The (T, S) weights of one head, by the model's layer and head indices."""
        if layer not in self.layers or head not in self.heads:
            raise ValueError(
                f"layer {layer}, head {head} was not captured; captured layers "
                f"{list(self.layers)}, heads {list(self.heads)}"
            )
        return self.weights[self.layers.index(layer), self.heads.index(head)]  # (T, S)

    def query_index(self, token: str) -> int:
        """The row of the first query token matching ``token`` (see ``find_token``)."""
        return find_token(self.query_tokens, token)

    def to_view(self) -> ExplorerView:
        """This attention as a view of the HTML explorer (``qkv.viz.explorer``)."""
        from qkv.viz.explorer import ExplorerView

        return ExplorerView(
            name=self.name,
            query_tokens=list(self.query_tokens),
            key_tokens=list(self.key_tokens),
            weights=self.weights,
            kind=self.kind,
            layer_labels=self.layer_labels,
            image=self.image,
            grid=self.grid,
        )


@dataclass(frozen=True, kw_only=True)
class CapturedAttention:
    """Everything captured from one example: one ``AttentionMaps`` per kind of attention.

    Attributes:
        maps: by kind: ``"self"``; or ``"encoder"``, ``"decoder"``, ``"cross"``.
        max_error: the largest |weights @ V - fast output| of the check (None: not checked).
    """

    maps: dict[Kind, AttentionMaps]
    max_error: float | None

    def __getitem__(self, kind: Kind) -> AttentionMaps:
        if kind not in self.maps:
            raise KeyError(f"no {kind!r} attention was captured; there is {list(self.maps)}")
        return self.maps[kind]

    def to_views(self) -> list[ExplorerView]:
        """One explorer view per kind, ready for ``qkv.viz.explorer.write_explorer``."""
        return [m.to_view() for m in self.maps.values()]


def normalize_token(token: str) -> str:
    """A token without its tokenizer's word markers (WordPiece ##, byte-level Ġ, SentencePiece
    ▁), lower-cased, for matching what a user typed."""
    return token.removeprefix("##").lstrip("Ġ▁").lower()


def find_token(tokens: Sequence[str], token: str) -> int:
    """The index of the first of ``tokens`` equal to ``token``, ignoring case and word markers.

    Raises:
        ValueError: no token matches; the message lists the tokens.
    """
    wanted = normalize_token(token)
    for i, t in enumerate(tokens):
        if t == token or normalize_token(t) == wanted:
            return i
    raise ValueError(f"token {token!r} is not among the tokens {list(tokens)}; pick one of them")


def _real(mask: Tensor | None, example: int, n: int) -> Tensor:
    """Indices of the real (not padding) positions of one example: (n_real,)."""
    if mask is None:
        return torch.arange(n)
    return mask[example].cpu().nonzero().flatten()


def _image_01(pixels: Tensor) -> np.ndarray:
    """One (C, I, I) image scaled to [0, 1] for display: (I, I) grey or (I, I, 3)."""
    x = pixels.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)  # (C, I, I) in [0, 1]
    if x.shape[0] == 1:
        return x[0].numpy()  # (I, I)
    return x[:3].permute(1, 2, 0).numpy()  # (I, I, 3)


def _given_inputs(
    input_ids: Tensor | None, attention_mask: Tensor | None, decoder_input_ids: Tensor | None,
    decoder_attention_mask: Tensor | None, pixel_values: Tensor | None, example: int,
) -> dict[str, Tensor]:  # fmt: skip
    """The inputs that were given, by the forward's names, checked: text or images, and a row
    ``example`` that the batch has."""
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "pixel_values": pixel_values,
    }
    given = {k: v for k, v in inputs.items() if v is not None}
    first = next(iter(given.values()), None)
    if first is None or (input_ids is None and pixel_values is None):
        raise ValueError("pass input_ids (text) or pixel_values (images) to capture attention")
    if not 0 <= example < first.shape[0]:
        raise ValueError(f"example={example} is not in the batch of {first.shape[0]}")
    return given


# --8<-- [start:capture]
def capture_attention(
    model: nn.Module,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    decoder_input_ids: Tensor | None = None,
    decoder_attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    tokens: Sequence[str] | None = None,
    decoder_tokens: Sequence[str] | None = None,
    image: np.ndarray | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    example: int = 0,
    check: bool = True,
) -> CapturedAttention:
    """Capture the attention of one example, padding removed, as (L, H, T, S) per kind.

    Pass the inputs the model's forward takes: ``input_ids`` (and ``attention_mask``) for text,
    ``decoder_input_ids`` too for an encoder-decoder, ``pixel_values`` for a ViT. A batch may be
    given; ``example`` picks the row to keep, and its padding (mask 0) is trimmed from rows and
    columns.

    Args:
        model: a qkv model.
        input_ids, attention_mask: (B, T) token ids; 1 = real token, 0 = padding.
        decoder_input_ids, decoder_attention_mask: (B, T) for an encoder-decoder.
        pixel_values: (B, C, I, I) images for a ViT.
        tokens: the strings of the (real) input tokens; default their ids (or, for images,
            "[CLS]" and "r,c" patch coordinates).
        decoder_tokens: the strings of the decoder's tokens; default their ids.
        image: the picture to show under patch attention, (h, w) or (h, w, 3) in [0, 1];
            default ``pixel_values`` rescaled to [0, 1].
        layers: layers to capture (negative counts from the end); None = all.
        heads: heads to keep; None = all.
        example: which row of the batch.
        check: prove the weights against the fast path's output (``check_weights``).

    Returns:
        ``CapturedAttention`` with one ``AttentionMaps`` per kind of attention.

    Example:
        >>> from qkv.models.gpt import GPT, PRESETS
        >>> model = GPT(PRESETS["tiny"])
        >>> captured = capture_attention(model, input_ids=torch.tensor([[5, 6, 7]]), heads=[0, 1])
        >>> captured["self"].weights.shape  # (L, H, T, S)
        torch.Size([2, 2, 3, 3])
    """
    given = _given_inputs(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                          pixel_values, example)  # fmt: skip
    first = next(iter(given.values()))
    recording = record_attention(model, layers=layers, check=check, **given)
    # The real (not padding) positions of this example, and their strings.
    any_weights = next(iter(recording.weights.values()))  # its last axis: the keys
    n_src = first.shape[1] if pixel_values is None else any_weights.shape[-1]
    src_real = _real(attention_mask, example, n_src)  # (T_real,)
    grid = picture = None
    if pixel_values is not None:  # square images: [CLS] and side x side patches
        grid, picture, src_tokens = _patches(n_src, pixel_values[example], image, tokens)
    else:
        assert input_ids is not None
        src_tokens = _tokens(tokens, input_ids[example], src_real)
    dec_real, dec_tokens = src_real, src_tokens
    if decoder_input_ids is not None:
        dec_real = _real(decoder_attention_mask, example, decoder_input_ids.shape[1])
        dec_tokens = _tokens(decoder_tokens, decoder_input_ids[example], dec_real)
    # Rows (queries) and columns (keys) of each kind: cross-attention reads the encoder.
    axes: dict[Kind, _Axes] = {
        "self": (src_real, src_tokens, src_real, src_tokens),
        "encoder": (src_real, src_tokens, src_real, src_tokens),
        "decoder": (dec_real, dec_tokens, dec_real, dec_tokens),
        "cross": (dec_real, dec_tokens, src_real, src_tokens),
    }
    maps = {
        kind: _example_maps(
            kind, w, recording.layers[kind], axes[kind], example, heads, picture, grid
        )
        for kind, w in recording.weights.items()
    }
    return CapturedAttention(maps=maps, max_error=recording.max_error)


def _patches(
    n_src: int, pixels: Tensor, image: np.ndarray | None, tokens: Sequence[str] | None
) -> tuple[tuple[int, int], np.ndarray, list[str]]:
    """A ViT's source: its patch grid, the picture to show and the names of [CLS] and the
    patches ("row,column"), from the number of positions N = 1 + side x side."""
    side = math.isqrt(n_src - 1)
    picture = image if image is not None else _image_01(pixels)
    patches = ["[CLS]"] + [f"{r},{c}" for r in range(side) for c in range(side)]
    return (side, side), picture, list(tokens) if tokens is not None else patches


# (query positions, query strings, key positions, key strings) of one kind of attention
_Axes = tuple[Tensor, Sequence[str], Tensor, Sequence[str]]


def _example_maps(
    kind: Kind, weights: Tensor, layers: tuple[int, ...], axes: _Axes, example: int,
    heads: Sequence[int] | None, picture: np.ndarray | None, grid: tuple[int, int] | None,
) -> AttentionMaps:  # fmt: skip
    """One kind's weights (B, L, H, T, S) cut to one example's chosen heads and real tokens."""
    head_idx = _pick_heads(weights.shape[2], heads)
    rows, query_tokens, cols, key_tokens = axes
    w = weights[example][:, head_idx]  # (L, H', T, S)
    w = w[:, :, rows][:, :, :, cols]  # (L, H', T_real, S_real)
    view_kind: Literal["self", "cross", "image"] = "cross" if kind == "cross" else "self"
    if picture is not None:
        view_kind = "image"
    return AttentionMaps(
        name=VIEW_NAMES["image" if view_kind == "image" else kind],
        kind=view_kind,
        weights=w.contiguous(),
        query_tokens=list(query_tokens),
        key_tokens=list(key_tokens),
        layers=layers,
        heads=tuple(head_idx),
        image=picture if view_kind == "image" else None,
        grid=grid if view_kind == "image" else None,
    )


# --8<-- [end:capture]


def _pick_heads(n: int, heads: Sequence[int] | None) -> list[int]:
    if heads is None:
        return list(range(n))
    bad = [h for h in heads if not -n <= h < n]
    if bad or not heads:
        raise ValueError(f"heads={list(heads)} do not exist: the model has {n} heads (0..{n - 1})")
    return sorted({h % n for h in heads})


def _tokens(given: Sequence[str] | None, ids: Tensor, real: Tensor) -> list[str]:
    """The strings of the real tokens: ``given`` (for all or only the real ones), or the ids."""
    if given is None:
        return [str(i) for i in ids[real].tolist()]
    given = list(given)
    if len(given) == len(real):
        return given
    if len(given) == ids.shape[0]:
        return [given[i] for i in real.tolist()]
    raise ValueError(
        f"{len(given)} token strings for {ids.shape[0]} positions ({len(real)} real); pass one "
        "string per position"
    )
