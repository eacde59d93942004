"""Seeing attention: capture the weights of a model, sum them up, and draw them.

* ``capture``: the exact attention weights of any qkv model, checked against its fast path;
* ``stats``: entropy, distance and special-token share per head, and attention rollout;
* ``plots``: heatmaps, head and model views, image overlays, position encodings (PNG);
* ``explorer``: an interactive, self-contained HTML attention explorer.
"""

from qkv.viz.capture import (
    AttentionCheckError,
    AttentionMaps,
    CapturedAttention,
    Recording,
    attention_sites,
    capture_attention,
    check_weights,
    record_attention,
)
from qkv.viz.explorer import ExplorerView, write_explorer
from qkv.viz.stats import (
    attention_rollout,
    entropy,
    mean_distance,
    special_attention,
    special_token_mask,
)

__all__ = [
    "AttentionCheckError",
    "AttentionMaps",
    "CapturedAttention",
    "ExplorerView",
    "Recording",
    "attention_rollout",
    "attention_sites",
    "capture_attention",
    "check_weights",
    "entropy",
    "mean_distance",
    "record_attention",
    "special_attention",
    "special_token_mask",
    "write_explorer",
]
