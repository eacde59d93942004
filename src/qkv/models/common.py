"""The small pieces several model families share: label conventions, the language-model losses,
teacher forcing's shifted inputs, default positions, key/value caches for decoding, recording
attentions and the initialisation of the decoder families. Running a stack of layers and the
two base classes of the language models are in ``qkv.models.lm``.

    causal LM loss   = -mean_t log softmax(logits_t)[y_{t+1}]          (GPT, LLaMA)
    seq2seq loss     = -mean_t log softmax(logits_t)[y_t]              (Transformer, T5, BART)
    decoder input    = [start, y_1, ..., y_{T-1}]                      (Transformer, T5, BART)
    position of x_t  = (number of real tokens up to t) - 1             (with left padding)

Each family file still reads top to bottom on its own, with its layers, how it embeds tokens and
positions, its masks and whatever else makes the family different; what lives here and in
``qkv.models.lm`` is the glue that would otherwise be copied into several of them. Labels
equal to ``IGNORE_INDEX`` (-100, the value PyTorch's ``cross_entropy`` and Hugging Face use) are
left out of every loss.

With a key/value cache a model reads only the T new tokens, while its attention mask covers the
cached positions too, (B, past + T); ``past_length`` and ``check_attention_mask`` hold that rule.
Every family checks its inputs with the same few functions (``check_token_ids``,
``check_attention_mask``, ``check_labels``), so a wrong shape gets the same clear message from
each of them rather than an indexing error from deep inside.

Shape legend: B batch · T positions (the new ones, with a cache; the target's in an
encoder-decoder) · S source positions · D model width · H heads · K key/value heads ·
E head dim · V vocabulary · L layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention, recording_weights
from qkv.blocks.norms import LayerNorm, RMSNorm

__all__ = [
    "IGNORE_INDEX",
    "attention_modules",
    "causal_lm_loss",
    "check_attention_mask",
    "check_labels",
    "check_token_ids",
    "default_position_ids",
    "init_gpt2_",
    "init_normal_",
    "new_kv_caches",
    "past_length",
    "recording_attentions",
    "seq2seq_loss",
    "shift_right",
]

IGNORE_INDEX = -100  # labels equal to this are left out of the loss (PyTorch's and HF's value)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: the logits at t are scored against the label at t + 1.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids, usually ``input_ids`` itself (the shift happens here);
            ``IGNORE_INDEX`` (-100) marks positions left out of the loss.

    Returns:
        The mean loss over counted positions, a float32 scalar.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over V = 4 tokens
        >>> causal_lm_loss(logits, torch.tensor([[0, 1, -100]]))  # one counted position: log 4
        tensor(1.3863)
    """
    check_labels(labels, logits)
    shift_logits = logits[:, :-1].float()  # (B, T - 1, V), predictions for positions 1 ..
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T - 1), the tokens that came next
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),  # (B * (T - 1), V)
        shift_labels.reshape(-1),  # (B * (T - 1),)
        ignore_index=IGNORE_INDEX,
    )


def seq2seq_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """An encoder-decoder's cross-entropy: the logits at t are scored against the label at t.

    No shift here: the decoder's inputs were already shifted right (``shift_right``). The
    logits are upcast to float32 first, as in ``causal_lm_loss`` (a no-op for float32 logits;
    with bf16 or fp16 the log-softmax over V keeps its precision).

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids; ``IGNORE_INDEX`` (-100) marks positions left out.
        label_smoothing: epsilon of label smoothing (the 2017 Transformer: 0.1), 0 for none.

    Returns:
        The mean loss over counted positions, a float32 scalar.

    Example:
        >>> seq2seq_loss(torch.zeros(1, 2, 4), torch.tensor([[3, -100]]))  # log 4
        tensor(1.3863)
    """
    check_labels(labels, logits)
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B * T, V)
        labels.flatten().to(logits.device),  # (B * T,)
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def shift_right(labels: Tensor, start_token_id: int, pad_token_id: int) -> Tensor:
    """Teacher forcing: the decoder reads [start, y_1, ..., y_{T-1}] to predict [y_1, ..., y_T].

    Args:
        labels: target token ids (B, T); ``IGNORE_INDEX`` (-100) marks positions the loss ignores.
        start_token_id: the first decoder input (T5: the pad token; BART: the end token).
        pad_token_id: replaces -100 in the shifted ids, since -100 is not a token.

    Returns:
        decoder_input_ids (B, T).

    Example:
        >>> shift_right(torch.tensor([[5, -100, 6]]), start_token_id=2, pad_token_id=1)
        tensor([[2, 5, 1]])
    """
    start = labels.new_full((labels.shape[0], 1), start_token_id)  # (B, 1)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)  # (B, T)


def default_position_ids(
    attention_mask: Tensor | None, t: int, past: int = 0, *, device: torch.device | None = None
) -> Tensor:
    """Positions of the T new tokens: counted over real tokens only when there is padding.

    With left padding (how batches are padded for generation) the first real token of each row
    must get position 0, as it did in training, so positions count real tokens:
    ``cumsum(attention_mask) - 1``, clamped at 0 for the padding before them.

    Args:
        attention_mask: (B, past + T), 1 = real token, 0 = padding; or None.
        t: T, the number of new tokens.
        past: positions already in the key/value cache.
        device: where to create positions when there is no mask.

    Returns:
        (B, T) from a mask, else (T,) = past .. past + T - 1.

    Example:
        >>> default_position_ids(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 4)
        tensor([[0, 0, 0, 1],
                [0, 1, 2, 3]])
    """
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)  # (T,)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, past + T)
    return positions[:, -t:]  # (B, T)


def new_kv_caches(
    n_layers: int,
    batch_size: int,
    max_len: int | None,
    *,
    n_kv_heads: int,
    head_dim: int,
    max_seq_len: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[KVCache]:
    """One empty key/value cache per layer: dynamic without ``max_len``, else static.

    Args:
        n_layers: how many caches (one per attention layer).
        batch_size: B of the static caches (a dynamic cache takes any B).
        max_len: None for dynamic caches that grow as needed; else the room, in positions, that
            each static cache allocates once, (B, K, max_len, E) for keys and again for values.
        n_kv_heads, head_dim: K and E of the attention the caches serve.
        max_seq_len: the model's positions; a larger ``max_len`` is an error. None: no limit.
        dtype, device: of the static caches (the model's).

    Example:
        >>> caches = new_kv_caches(2, 1, 8, n_kv_heads=2, head_dim=4, max_seq_len=16,
        ...                        dtype=torch.float32, device=torch.device("cpu"))
        >>> len(caches), caches[0].max_len, caches[0].seq_len
        (2, 8, 0)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_len is None:
        return [KVCache() for _ in range(n_layers)]
    if max_len < 1:
        raise ValueError(f"max_len must be a positive number of positions (or None), got {max_len}")
    if max_seq_len is not None and max_len > max_seq_len:
        raise ValueError(
            f"max_len={max_len} exceeds the model's max_seq_len={max_seq_len}: it has no positions "
            f"beyond that, so a cache needs room for at most {max_seq_len}"
        )
    return [
        KVCache.static(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        for _ in range(n_layers)
    ]


def past_length(
    cache: Sequence[KVCache] | Sequence[tuple[KVCache, KVCache]] | None, n_layers: int
) -> int:
    """How many positions the cache already holds (0 without a cache).

    Args:
        cache: one ``KVCache`` per layer, or one (self-attention, cross-attention) pair per
            decoder layer; or None.
        n_layers: the number of layers the cache must cover.
    """
    if cache is None:
        return 0
    if len(cache) != n_layers:
        raise ValueError(
            f"the cache has {len(cache)} entries for {n_layers} layers; make it with the model's "
            "new_cache() / new_caches()"
        )
    first = cache[0]
    return (first[0] if isinstance(first, tuple) else first).seq_len


def check_token_ids(ids: Tensor, name: str = "input_ids") -> None:
    """Raise a clear error unless ``ids`` is a batch of token ids: (B, T), int64 or int32.

    One sequence of shape (T,) is the usual slip; the message says how to add the batch axis.
    """
    if ids.dim() != 2:
        hint = f"; for one sequence, pass {name}.unsqueeze(0)" if ids.dim() == 1 else ""
        raise ValueError(f"{name} must be (B, T), got shape {tuple(ids.shape)}{hint}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name} must hold integer token ids (int64 or int32), got {ids.dtype}; "
            f"convert them with {name}.long()"
        )


def check_attention_mask(
    attention_mask: Tensor | None,
    length: int,
    name: str = "attention_mask",
    *,
    batch: int | None = None,
    span: str = "past + T",
) -> None:
    """Raise a clear error unless the mask is (B, ``length``), or (1, ``length``) for a mask
    every row shares.

    ``span`` names the length in the message. A decoder's mask covers past + T positions: with
    a key/value cache, the cached positions and the new ones (past = 0 without a cache); an
    encoder's covers its S source positions. ``batch``, when given, is B.
    """
    if attention_mask is None:
        return
    shape = tuple(attention_mask.shape)
    rows_ok = len(shape) == 2 and (batch is None or shape[0] in (1, batch))
    if not rows_ok or shape[1] != length:
        sizes = f"{span} = {length}" if batch is None else f"B = {batch} and {span} = {length}"
        cached = " (the cached positions and the new ones)" if span == "past + T" else ""
        raise ValueError(
            f"{name} must be (B, {span}) with {sizes}{cached}, 1 = real token and 0 = padding; "
            f"got shape {shape}"
        )


def check_labels(labels: Tensor, logits: Tensor) -> None:
    """Raise a clear error unless there is one label per scored position: ``labels`` has the
    shape of ``logits`` (B, T, V) without V."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:-1])}, one target id per position "
            f"(-100 for none), got shape {tuple(labels.shape)}"
        )


def attention_modules(root: nn.Module, name: str | None = None) -> list[MultiHeadAttention]:
    """The ``MultiHeadAttention`` modules inside ``root``, layer by layer, for recording.

    Args:
        root: a model or a stack of layers (an ``nn.ModuleList``).
        name: keep only the modules registered under this attribute name, e.g. ``"self_attn"``
            or ``"cross_attn"`` of decoder layers; None keeps all of them (within a decoder
            layer, self-attention comes before cross-attention).

    Returns:
        The modules in registration order, to pass to ``qkv.attention.recording_weights``.
    """
    return [
        m
        for path, m in root.named_modules()
        if isinstance(m, MultiHeadAttention) and (name is None or path.rsplit(".", 1)[-1] == name)
    ]


def recording_attentions(
    layers: nn.Module, enabled: bool, name: str | None = None
) -> AbstractContextManager[list[Tensor]]:
    """``recording_weights`` over the attention modules of ``layers``, or nothing when disabled.

    Models write ``with recording_attentions(self.layers, output_attentions) as attentions:``
    around their layer loop; the list holds one (B, H, T, S) tensor per module when enabled,
    and stays empty otherwise.

    Args:
        layers: a stack of layers (an ``nn.ModuleList``).
        enabled: whether to record (a forward's ``output_attentions``).
        name: as in ``attention_modules``: e.g. ``"self_attn"`` or ``"cross_attn"``.
    """
    return recording_weights(attention_modules(layers, name) if enabled else [], enabled)


@torch.no_grad()
def init_normal_(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation, which the decoder families share: every linear and embedding
    weight from normal(0, std²), linear biases 0, norm gains 1 and shifts 0.

    Modules are visited in registration order; a matrix tied to another is drawn again where it
    appears the second time, and keeps that draw.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, LayerNorm):
            m.reset_parameters()  # gain 1, shift 0
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def init_gpt2_(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """``init_normal_``, then GPT-2's depth scaling: the two projections that write into the
    residual stream (``self_attn.out_proj`` and ``mlp.down_proj``) drawn again with
    std / sqrt(2 L), so that the stream's variance does not grow with depth (GPT-2, section 2.3).
    """
    init_normal_(model, std=std)  # N(0, std²) weights, biases 0, norms 1 and 0
    residual_std = std / math.sqrt(2 * n_layers)
    for name, p in model.named_parameters():
        # mlp.down_proj, or each expert's (mlp.experts.{e}.down_proj) in a mixture of experts
        if name.endswith("self_attn.out_proj.weight") or (
            ".mlp." in name and name.endswith("down_proj.weight")
        ):
            nn.init.normal_(p, mean=0.0, std=residual_std)
