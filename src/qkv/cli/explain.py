"""``qkv explain``: what every attention head of a model looks at, as a table, PNGs and HTML.

    qkv explain "The animal didn't cross the street because it was tired." --model minilm --token it
    qkv explain --model CHECKPOINT --source "..." --target "..."      (an encoder-decoder)
    qkv explain --model CHECKPOINT --image digit.png                  (a Vision Transformer)

The attention is captured with ``qkv.viz.capture`` (exact weights, checked against the fast
path), summarised with ``qkv.viz.stats``, drawn with ``qkv.viz.plots`` and written to an
interactive explorer with ``qkv.viz.explorer``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["cmd_explain", "register"]


def _int_list(text: str) -> list[int]:
    """``"0,2,5"`` or ``"1-3"`` -> a list of ints (for --layers and --heads)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(x) for x in part.split("-"))
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of indices; write e.g. 0,2,5 or 1-3"
        ) from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one index, e.g. 0,2,5 or 1-3")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="show what each attention head looks at (table, PNGs, HTML explorer)",
        description=(
            "Run a model on one input, capture the exact attention weights of every layer and "
            "head, print where one token looks, and write pictures and an interactive explorer."
        ),
    )
    p.add_argument("text", nargs="?", help="the text to run through a text model")
    p.add_argument(
        "--model",
        default="minilm",
        help="checkpoint directory or name (default: minilm, the real all-MiniLM-L6-v2)",
    )
    p.add_argument("--token", help="the query token to follow (default: the last word)")
    p.add_argument("--source", help="encoder-decoder models: the source text")
    p.add_argument("--target", help="encoder-decoder models: the target text the decoder reads")
    p.add_argument("--image", help="Vision Transformers: an image file (.png, .jpg) or .npy array")
    p.add_argument("--layers", type=_int_list, help="layers to capture, e.g. 0,5 or 2-4")
    p.add_argument("--heads", type=_int_list, help="heads to keep, e.g. 0,3 or 0-5")
    p.add_argument("--top", type=int, default=3, help="keys to list per layer (default 3)")
    p.add_argument(
        "--out",
        default="explain-out",
        help="folder for the PNGs and explorer.html (default explain-out)",
    )
    p.set_defaults(func=cmd_explain)


class _Refusal(Exception):
    """A one-line problem with the user's input (printed, exit status 2)."""


def _load(name: str) -> tuple[Any, Path]:
    import qkv
    from qkv.interop.pretrained import resolve_checkpoint

    try:
        return qkv.from_pretrained(name), resolve_checkpoint(name)
    except (qkv.CheckpointError, ValueError, TypeError) as e:
        raise _Refusal(str(e)) from None


def _tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise _Refusal(
            f"{directory} has no tokenizer.json to turn the text into tokens; save the model "
            "with qkv.save_pretrained(model, directory, tokenizer=tokenizer)"
        )
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _read_image(path: str) -> np.ndarray:
    """An image file as floats in [0, 1], (h, w) or (h, w, 3)."""
    file = Path(path)
    if not file.is_file():
        raise _Refusal(f"no image at {file}; pass a .png, .jpg or .npy file")
    if file.suffix.lower() == ".npy":
        pic = np.load(file, allow_pickle=False).astype(np.float64)
    else:
        from matplotlib import image as mpimg

        pic = np.asarray(mpimg.imread(file), dtype=np.float64)
    if pic.ndim == 3 and pic.shape[2] == 4:
        pic = pic[:, :, :3]  # drop the alpha channel
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[:, :, 0]
    if pic.ndim not in (2, 3) or (pic.ndim == 3 and pic.shape[2] != 3):
        raise _Refusal(f"{file} holds an array of shape {pic.shape}; expected (h, w) or (h, w, 3)")
    if pic.max() > 1.0:
        pic = pic / 255.0  # 8-bit pixel values
    return np.clip(pic, 0.0, 1.0)


def _pixels(pic: np.ndarray, model: Any, directory: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The image as the ViT's input (1, C, I, I), and the resized picture to draw under it."""
    size, channels = model.config.image_size, model.config.num_channels
    x = torch.as_tensor(pic, dtype=torch.float32)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)  # (c, h, w)
    if channels == 1 and x.shape[0] == 3:
        x = x.mean(0, keepdim=True)  # (1, h, w): grey
    elif channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)  # (3, h, w)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)
    shown = x[0].clamp(0, 1)  # (C, I, I)
    picture = shown[0].numpy() if channels == 1 else shown.permute(1, 2, 0).numpy()
    # Normalise as the checkpoint's preprocessing says (Hugging Face's preprocessor_config.json);
    # without one, the pixels stay in [0, 1].
    prep = directory / "preprocessor_config.json"
    if prep.is_file():
        config = json.loads(prep.read_text(encoding="utf-8"))
        if config.get("do_normalize", True) and "image_mean" in config:
            mean = torch.tensor(config["image_mean"], dtype=torch.float32)[:channels, None, None]
            std = torch.tensor(config["image_std"], dtype=torch.float32)[:channels, None, None]
            x = (x - mean) / std
    return x, picture


def _capture(args: argparse.Namespace, model: Any, directory: Path) -> Any:
    """Run the model on the user's input and capture its attention."""
    from qkv.viz.capture import capture_attention

    params = inspect.signature(model.forward).parameters
    common = {"layers": args.layers, "heads": args.heads}
    if args.image is not None:
        if "pixel_values" not in params:
            raise _Refusal(f"{type(model).__name__} reads text, not images; drop --image")
        pixels, picture = _pixels(_read_image(args.image), model, directory)
        return capture_attention(model, pixel_values=pixels, image=picture, **common)
    if "pixel_values" in params:
        raise _Refusal(f"{type(model).__name__} is a vision model; pass an image with --image")
    tok = _tokenizer(directory)
    if "decoder_input_ids" in params:
        if args.source is None or args.target is None:
            raise _Refusal(
                f"{type(model).__name__} is an encoder-decoder: pass --source TEXT and "
                "--target TEXT (the text the decoder reads)"
            )
        src = tok.encode(args.source)
        tgt = tok.encode(args.target, add_special_tokens=False)
        start = model.config.decoder_start_token_id
        decoder_tokens = [tok.id_to_token(start) or f"<{start}>", *tgt.tokens]
        return capture_attention(
            model,
            input_ids=torch.tensor([src.ids]),
            decoder_input_ids=torch.tensor([[start, *tgt.ids]]),
            tokens=src.tokens,
            decoder_tokens=decoder_tokens,
            **common,
        )
    if args.source is not None or args.target is not None:
        raise _Refusal(f"{type(model).__name__} is not an encoder-decoder; pass the text alone")
    if not args.text:
        raise _Refusal('pass the text to explain, e.g. qkv explain "The cat sat." --token cat')
    enc = tok.encode(args.text)
    if not enc.ids:
        raise _Refusal("the text gave no tokens; pass some words")
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and len(enc.ids) > max_len:
        raise _Refusal(f"the text has {len(enc.ids)} tokens; the model reads at most {max_len}")
    return capture_attention(model, input_ids=torch.tensor([enc.ids]), tokens=enc.tokens, **common)


def _default_token(tokens: list[str]) -> str:
    """The last token that is a word (not [CLS], </s> or punctuation)."""
    from qkv.viz.stats import SPECIAL_TOKEN

    words = [t for t in tokens if not SPECIAL_TOKEN.match(t) and re.search(r"\w", t)]
    return words[-1] if words else tokens[-1]


def _table(maps: Any, row: int, top: int) -> Any:
    """A rich table: per layer, the keys the query weighs most (mean over heads), and the
    single head that puts the most weight on one word (special tokens left out)."""
    from rich.table import Table

    from qkv.viz.stats import special_token_mask

    token = maps.query_tokens[row]
    words = ~special_token_mask(maps.key_tokens)  # (S,)
    table = Table(title=f"{maps.name}: where {token!r} (position {row}) looks")
    table.add_column("layer", justify="right")
    table.add_column(f"top {top} keys, mean over {len(maps.heads)} heads")
    table.add_column("strongest head on a " + ("patch" if maps.kind == "image" else "word"))
    for i, layer in enumerate(maps.layers):
        w = maps.weights[i, :, row]  # (H, S)
        mean = w.mean(0)  # (S,)
        best = mean.argsort(descending=True)[:top].tolist()
        keys = ", ".join(f"{maps.key_tokens[j]} {mean[j]:.2f}" for j in best)
        on_words = w * words  # (H, S): special keys zeroed
        h, j = divmod(int(on_words.argmax()), w.shape[-1])
        strongest = f"head {maps.heads[h]}: {maps.key_tokens[j]} {w[h, j]:.2f}"
        table.add_row(f"layer {layer}", keys, strongest)
    return table


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "token"


def _pictures(captured: Any, queries: dict[str, int], out: Path) -> list[Path]:
    """Write the PNGs of every kind of attention; return their paths."""
    from qkv.viz import plots, stats

    written: list[Path] = []
    for kind, maps in captured.maps.items():
        heads = [f"head {h}" for h in maps.heads]
        path = out / f"{kind}-entropy.png"
        plots.plot_head_stats(
            stats.entropy(maps.weights), label="entropy (nats)", layer_labels=maps.layer_labels,
            head_labels=[str(h) for h in maps.heads], title=f"{maps.name}: entropy per head",
            path=path,
        )  # fmt: skip
        written.append(path)
        path = out / f"{kind}-model-view.png"
        plots.plot_model_view(
            maps.weights, layer_labels=maps.layer_labels, head_labels=heads,
            title=f"{maps.name}: every layer and head", path=path,
        )  # fmt: skip
        written.append(path)
        if maps.kind != "image":
            for i, label in enumerate(maps.layer_labels):
                path = out / f"{kind}-{_safe(label)}.png"
                plots.plot_heads(
                    maps.weights[i], maps.query_tokens, maps.key_tokens, head_labels=heads,
                    title=f"{maps.name}, {label}", path=path,
                )  # fmt: skip
                written.append(path)
        if kind in queries:
            row = queries[kind]
            path = out / f"{kind}-token-{_safe(maps.query_tokens[row])}.png"
            plots.plot_query(
                maps.weights[:, :, row], maps.key_tokens, query=maps.query_tokens[row],
                layer_labels=maps.layer_labels, head_labels=[str(h) for h in maps.heads],
                path=path,
            )  # fmt: skip
            written.append(path)
        if maps.kind in ("self", "image"):
            rollout = stats.attention_rollout(maps.weights)  # (T, T)
            if maps.kind == "image":
                assert maps.image is not None and maps.grid is not None
                row = queries.get(kind, 0)
                per_layer = [maps.weights[i, :, row, 1:].mean(0) for i in range(len(maps.layers))]
                titles = [f"{label}, mean of heads" for label in maps.layer_labels]
                path = out / f"{kind}-on-image.png"
                plots.plot_image_attention(
                    maps.image, [*per_layer, rollout[row, 1:]], maps.grid,
                    titles=[*titles, "rollout"], path=path,
                )  # fmt: skip
            else:
                path = out / f"{kind}-rollout.png"
                plots.plot_head(
                    rollout, maps.query_tokens, maps.key_tokens,
                    title=f"attention rollout over {', '.join(maps.layer_labels)}", path=path,
                )  # fmt: skip
            written.append(path)
    return written


def cmd_explain(args: argparse.Namespace) -> int:
    """Capture, print, draw and write the explorer (see the module docstring)."""
    from rich.console import Console

    from qkv.viz.capture import AttentionCheckError, find_token
    from qkv.viz.explorer import write_explorer

    if args.top < 1:
        print("qkv explain: --top must be at least 1", file=sys.stderr)
        return 2
    try:
        model, directory = _load(args.model)
        captured = _capture(args, model, directory)
        # The query to follow: in the decoder (self and cross) if it has it, else the encoder.
        queries: dict[str, int] = {}
        first = next(iter(captured.maps.values()))
        last_kind = "cross" if "cross" in captured.maps else next(iter(captured.maps))
        token = args.token or (
            "[CLS]"
            if first.kind == "image"
            else _default_token(captured.maps[last_kind].query_tokens)
        )
        for kind, maps in captured.maps.items():
            try:
                queries[kind] = find_token(maps.query_tokens, token)
            except ValueError:
                continue
        if not queries:
            shown = sorted({t for m in captured.maps.values() for t in m.query_tokens}, key=str)
            raise _Refusal(
                f"token {token!r} is not among the tokens {shown}; pick one with --token"
            )
    except (_Refusal, ValueError) as e:
        print(f"qkv explain: {e}", file=sys.stderr)
        return 2
    except AttentionCheckError as e:
        print(f"qkv explain: {e}", file=sys.stderr)
        return 1
    console = Console(width=max(100, Console().width))
    console.print(
        f"{type(model).__name__} from {args.model}: {len(first.layers)} layers x "
        f"{len(first.heads)} heads captured; weights @ V matches the fast path to "
        f"{captured.max_error:.1e}"
    )
    for kind, row in queries.items():
        console.print(_table(captured.maps[kind], row, args.top))
    out = Path(args.out)
    written = _pictures(captured, queries, out)
    html = write_explorer(
        out / "explorer.html", captured.to_views(), title=f"qkv explain: {args.model}"
    )
    console.print(
        f"wrote {len(written)} pictures to {out}/ and the interactive explorer to {html} "
        "(open it in a browser)"
    )
    return 0
