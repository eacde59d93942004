"""Building a run's parts from its config: the model, the objective and the precision.

The data decide what a preset leaves out (vocabulary size, special token ids, image size,
number of labels), so the model's config is resolved against the data source. The model is
initialised from ``train.seed``, the same weights on every rank. The objective follows
``data.kind``; the autocast precision follows ``train.precision`` and the device::

    lm       CausalLM         fp32   no autocast
    mlm      MaskedLM         bf16   bfloat16 autocast (an error on a GPU without bfloat16)
    seq2seq  Seq2Seq          auto   bfloat16 where it is native (GPUs that have it, CPUs with
    images   Classification          AVX512-BF16 / AMX / Arm BF16), float32 elsewhere
    classify Classification

``train.deterministic`` switches PyTorch to deterministic kernels for the run.

Activation checkpointing wraps each layer in ``CheckpointedLayer``, which recomputes the
layer's activations during backward instead of storing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv._kernels import onednn_available
from qkv.data.config import DataSource
from qkv.models.base import FAMILIES, QkvModel
from qkv.train.config import ConfigError, TrainConfig
from qkv.train.distributed import layer_stacks
from qkv.train.objectives import CausalLM, Classification, MaskedLM, Objective, Seq2Seq

__all__ = [
    "CheckpointedLayer",
    "autocast_dtype",
    "autocast_factory",
    "build_model",
    "build_objective",
    "deterministic_algorithms",
    "enable_activation_checkpointing",
    "resolve_model_config",
]


# -- precision and determinism ------------------------------------------------------------


def _cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none: macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm)
    and PyTorch's oneDNN runs bfloat16 products here (it refuses them on AVX2-only x86, and
    when capped below AVX-512 with ``ONEDNN_MAX_CPU_ISA``)."""
    flags = _cpuinfo()
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))
    if not native or not onednn_available(torch.bfloat16):
        return False
    try:  # and that torch runs a bf16 matmul here
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool((a @ a).float().sum() == 64.0)
    except RuntimeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain float32).

    ``auto`` picks bfloat16 on GPUs that support it and on CPUs with native bfloat16
    instructions, float32 elsewhere (emulated bf16 is slower than float32).
    """
    if precision == "fp32":
        return None
    cuda = device.type == "cuda"
    supported = torch.cuda.is_bf16_supported() if cuda else _cpu_has_fast_bf16()
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            raise ConfigError("train.precision=bf16: this GPU has no bfloat16; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def autocast_factory(dtype: torch.dtype | None, device: torch.device) -> Callable[[], Any]:
    """A factory of the context the forward passes run in: autocast to ``dtype``, or nothing."""

    def factory() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return factory


@contextlib.contextmanager
def deterministic_algorithms(on: bool, device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic algorithms for the run (``train.deterministic``), then the
    caller's setting back. On the CPU qkv's training ops are deterministic for a given thread
    count already; on GPUs some backward kernels (scatter-adds, some attention and cuBLAS
    reductions) are not, and this switch picks deterministic ones or raises naming the op."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if device.type == "cuda":  # cuBLAS needs a fixed workspace to reduce in a fixed order
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


# -- model and objective from the data ------------------------------------------------------

# Config fields the data decide when a preset leaves them out: field -> source attribute.
_FROM_SOURCE = {
    "vocab_size": "vocab_size",
    "src_vocab_size": "vocab_size",
    "tgt_vocab_size": "vocab_size",
    "pad_token_id": "pad_id",
    "bos_token_id": "bos_id",
    "eos_token_id": "eos_id",
    "decoder_start_token_id": "bos_id",
    "image_size": "image_size",
    "num_channels": "num_channels",
    "num_labels": "num_labels",
}


# Of those, the ones the task decides even when a pretrained checkpoint gives the architecture.
_FROM_TASK = ("num_labels", "image_size", "num_channels")


def resolve_model_config(
    config: TrainConfig, source: DataSource, base: Mapping[str, Any] | None = None
) -> Any:
    """The family's config with what the data decide filled in (see ``ModelSpec``).

    ``base`` is a pretrained checkpoint's config (``model.init_from``): it is then the starting
    point, the preset's options change it, and the data decide only ``_FROM_TASK``.
    """
    model_class = FAMILIES[config.model.family]
    fields = {f.name for f in dataclasses.fields(model_class.config_class)}
    options = {**(base or {}), **config.model.options}
    for name, attribute in _FROM_SOURCE.items():
        value = getattr(source, attribute, None)
        given = config.model.options.get(name) not in (None, 0)
        if base is not None and name not in _FROM_TASK:
            continue
        if name in fields and not given and value is not None:
            options[name] = value
    if "max_seq_len" in fields and "max_seq_len" not in options:
        options["max_seq_len"] = config.data.seq_len
    try:
        model_config = model_class.config_class(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    limit = getattr(model_config, "max_seq_len", None)
    if limit is not None and config.data.kind != "images" and config.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than model.max_seq_len={limit} (the "
            "positions the model has); lower --data.seq_len or raise --model.max_seq_len"
        )
    vocab = getattr(source, "vocab_size", None)
    for name in ("vocab_size", "src_vocab_size", "tgt_vocab_size"):
        size = getattr(model_config, name, None)
        if size is not None and vocab is not None and size < vocab:
            raise ConfigError(
                f"model.{name}={size} is smaller than the tokenizer's {vocab} tokens; leave it "
                "out (0) to take the tokenizer's size"
            )
    return model_config


def build_model(
    config: TrainConfig, source: DataSource, base: Mapping[str, Any] | None = None
) -> QkvModel:
    """The model, initialised from ``train.seed`` (the same weights on every rank); ``base``:
    the architecture of a pretrained checkpoint (see ``resolve_model_config``)."""
    model_config = resolve_model_config(config, source, base)
    torch.manual_seed(config.train.seed)
    return FAMILIES[config.model.family](model_config)


def build_objective(config: TrainConfig, source: DataSource, model_config: Any) -> Objective:
    """The objective for ``data.kind``: lm, mlm, seq2seq, images or classify."""
    kind = config.data.kind
    if kind == "lm":
        return CausalLM(bits_per_char=config.data.tokenizer == "char")
    if kind == "mlm":
        # Token ids are not part of the DataSource protocol: token sources carry them.
        mask_id = getattr(source, "mask_id", None)
        if mask_id is None:
            raise ConfigError(
                "data.kind=mlm needs a tokenizer with a [MASK] token; use --data.tokenizer "
                "wordpiece (or char, which has one)"
            )
        vocab_size = getattr(source, "vocab_size", None)
        if vocab_size is None:
            raise ConfigError("data.kind=mlm needs token data: its source has no vocab_size")
        return MaskedLM(
            mask_id=mask_id, vocab_size=int(vocab_size),
            special_ids=list(getattr(source, "special_ids", [])),
        )  # fmt: skip
    if kind == "seq2seq":
        start = getattr(model_config, "decoder_start_token_id", None)
        pad = getattr(model_config, "pad_token_id", None)
        if start is None or pad is None:
            raise ConfigError(
                f"data.kind=seq2seq needs an encoder-decoder model (transformer, t5, bart); "
                f"got model.family={config.model.family}"
            )
        return Seq2Seq(
            decoder_start_token_id=start, pad_token_id=pad,
            label_smoothing=config.train.label_smoothing,
        )  # fmt: skip
    return Classification(
        label_smoothing=config.train.label_smoothing, majority_baseline=kind == "classify"
    )


# -- activation checkpointing ---------------------------------------------------------------


class CheckpointedLayer(nn.Module):
    """A layer that recomputes its activations during backward instead of storing them.

    While gradients are recorded the layer runs under ``torch.utils.checkpoint`` (the
    non-reentrant variant, which restores the dropout RNG, so results do not change); without
    them (evaluation, generation) it is the plain layer. The wrapper is invisible in state
    dicts: ``layers.0.self_attn.q_proj.weight`` stays that, not ``layers.0.layer.self_attn...``,
    so checkpoints and exported models are the same with and without it.

    Args:
        layer: the layer to wrap (a member of the model's ``nn.ModuleList``).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def _drop_wrapper_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post-hook: ``{prefix}layer.{name}`` -> ``{prefix}{name}``. The layer's keys
    are the newest in the dict, so moving them in turn keeps the order."""
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_wrapper_prefix(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load pre-hook, the inverse: ``{prefix}{name}`` -> ``{prefix}layer.{name}``."""
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every member of the model's layer lists in a ``CheckpointedLayer``, in place."""
    members = {id(layer) for layer in layer_stacks(model)}
    for stack in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for i, layer in enumerate(stack):
            if id(layer) in members:
                stack[i] = CheckpointedLayer(layer)
