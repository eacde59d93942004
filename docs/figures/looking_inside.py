"""Draw the pictures of docs/learn/10-looking-inside.md from the real all-MiniLM-L6-v2 weights,
and write the page's interactive explorer (``10-explorer.html``, next to the pictures: one
self-contained file that the page shows in a frame).

Run from the repository root: ``python docs/figures/looking_inside.py [--out docs/learn/img]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qkv
from qkv.viz import plots, stats
from qkv.viz.capture import AttentionMaps, capture_attention
from qkv.viz.explorer import write_explorer

SEED_SENTENCE = "The animal didn't cross the street because it was tired."
HEADS_SHOWN = ((0, 2), (3, 1), (5, 11))  # (layer, head): previous token, and two "animal" heads


def minilm_attention(sentence: str = SEED_SENTENCE) -> AttentionMaps:
    """MiniLM's self-attention on ``sentence``: weights (L, H, T, T) = (6, 12, T, T)."""
    model, tokenizer = qkv.from_pretrained("minilm", return_tokenizer=True)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoding = tokenizer.encode(sentence)
    ids = torch.tensor([encoding.ids])  # (B, T)
    return capture_attention(model, input_ids=ids, tokens=encoding.tokens)["self"]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/learn/img"))
    out = parser.parse_args(argv).out
    a = minilm_attention()
    tokens = (a.query_tokens, a.key_tokens)
    it = a.query_index("it")
    special = stats.special_token_mask(a.key_tokens)
    drawings = {
        "10-it-every-head": lambda p: plots.plot_query(
            a.weights[:, :, it], a.key_tokens, query="it", path=p
        ),
        "10-layer-3-heads": lambda p: plots.plot_heads(
            a.weights[3], *tokens, title="MiniLM layer 3: all 12 heads", path=p
        ),
        "10-model-view": lambda p: plots.plot_model_view(
            a.weights, title="MiniLM: 6 layers x 12 heads", path=p
        ),
        "10-entropy": lambda p: plots.plot_head_stats(
            stats.entropy(a.weights), label="entropy (nats)",
            title="entropy of each head (low = focused)", path=p,
        ),
        "10-special": lambda p: plots.plot_head_stats(
            stats.special_attention(a.weights, special), label="share", cmap="magma",
            title="share of attention on [CLS] and [SEP]", path=p,
        ),
        "10-rollout": lambda p: plots.plot_head(
            stats.attention_rollout(a.weights), *tokens,
            title="attention rollout through all 6 layers", path=p,
        ),
    }  # fmt: skip
    for layer, head in HEADS_SHOWN:
        drawings[f"10-head-{layer}-{head}"] = lambda p, layer=layer, head=head: plots.plot_head(
            a.head(layer, head), *tokens, title=f"MiniLM layer {layer}, head {head}", path=p
        )
    written = []
    for name, draw in drawings.items():
        path = out / f"{name}.png"
        draw(path)
        written.append(path)
    write_explorer(out / "10-explorer.html", [a.to_view()], title="MiniLM on the seed sentence")
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
