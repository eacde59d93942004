"""A training run as typed data: what to train, on what, how, and for how long.

A run is described by one ``TrainConfig`` made of sections, each a frozen dataclass::

    model:    family + the fields of that family's config (vocab_size may be left 0: the
              tokenizer decides it; ViT's image size, channels and labels come from the data);
              ``init_from`` starts from a pretrained checkpoint (``qkv.train.finetune``)
    data:     qkv.data.DataConfig (corpus, tokenizer, sequence length, split)
    optim:    AdamW's learning rate, betas, weight decay, gradient clipping
    schedule: warmup + cosine, or the 2017 paper's inverse square root
    train:    batch size, accumulation, step and time budgets, evaluation and checkpoint cadence,
              precision, compile, activation checkpointing, seed, distributed mode
    eval:     how many examples to decode for exact match/BLEU, the sample prompt
    lora:     low-rank adapters on the layers named by targets (``qkv.blocks.lora``); off at rank 0
    distill:  a teacher to learn from, its temperature and weight (``qkv.train.distill``)

The same data come from a preset (a small YAML file), a ``--config`` file and ``--section.key
value`` overrides, merged in that order (``merge_overrides``) and then checked field by field
(``config_from_dict``): an unknown key or a value of the wrong type is one line naming the key
and what it accepts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from qkv.data.config import DataConfig
from qkv.models.base import FAMILIES

__all__ = [
    "ConfigError",
    "DistillConfig",
    "EvalConfig",
    "LoRAConfig",
    "LoopConfig",
    "ModelSpec",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "merge_overrides",
    "parse_duration",
]


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key and the fix."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h|hr)?\s*$")
_UNIT_SECONDS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90s"``, ``"3m"``, ``"1.5h"`` or ``"45"`` (seconds).

    Example:
        >>> parse_duration("3m"), parse_duration("90s"), parse_duration("1h")
        (180.0, 90.0, 3600.0)
    """
    match = _DURATION.match(str(text))
    if match is None:
        raise ConfigError(
            f"train.max_time={text!r} is not a duration; write e.g. '90s', '3m' or '1h'"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model family and the fields of its config (``qkv.models.FAMILIES[family].config_class``).

    Fields the data decide may be left out (or 0): ``vocab_size`` (and the Transformer's
    ``src_vocab_size`` / ``tgt_vocab_size``) from the tokenizer; ``max_seq_len`` from
    ``data.seq_len``; the special token ids from the data source; ViT's ``image_size``,
    ``num_channels`` and ``num_labels`` from the images.

    ``init_from`` names a pretrained checkpoint: a qkv run directory, a checkpoint directory
    (qkv's or Hugging Face's) or a packaged name such as ``minilm``. Its config is then the
    architecture, ``options`` change it (a head, dropout) and the data decide only the task's
    fields (``num_labels``); see ``qkv.train.finetune``.
    """

    family: str = "gpt"
    options: Mapping[str, Any] = field(default_factory=dict)
    init_from: str = ""  # "": random initialisation from train.seed

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"model.family={self.family!r} is unknown; choose one of {sorted(FAMILIES)}"
            )
        known = {f.name for f in dataclasses.fields(FAMILIES[self.family].config_class)}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(
                f"unknown key model.{unknown[0]} for family {self.family!r}; valid keys: "
                f"family, init_from, {', '.join(sorted(known))}"
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW (Loshchilov and Hutter, 2019, arXiv:1711.05101) and gradient clipping."""

    lr: float = 1e-3  # the peak learning rate (the cosine schedule's; inverse_sqrt ignores it)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; never on norms, biases or embeddings
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # Parameters that do not train, by name pattern ("tok_emb", "layers.[0-2].*"; a pattern
    # matches a parameter or any module above it, see qkv.train.finetune.frozen_names)
    freeze: tuple[str, ...] = ()
    head_lr: float = 0.0  # peak lr of what model.init_from lacked (the new head); 0: optim.lr

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.head_lr < 0:
            raise ConfigError(f"optim.head_lr must be >= 0 (0: optim.lr), got {self.head_lr}")
        if any(not p.strip() for p in self.freeze):
            raise ConfigError(f"optim.freeze has an empty pattern: {list(self.freeze)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError(
                "optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0"
            )


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The learning rate over the run (see ``qkv.train.schedule``)."""

    kind: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine: the final learning rate as a fraction of the peak
    scale: float = 1.0  # inverse_sqrt: multiplies d_model^-0.5 * min(step^-0.5, step * w^-1.5)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "inverse_sqrt" and self.warmup_steps < 1:
            raise ConfigError("schedule.kind=inverse_sqrt needs schedule.warmup_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.scale <= 0:
            raise ConfigError(f"schedule.scale must be positive, got {self.scale}")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """The training loop's budget, cadence and machinery (the ``train:`` section)."""

    batch_size: int = 32  # the GLOBAL batch: split across ranks, then into grad_accum parts
    grad_accum: int = 1  # micro-batches per optimizer step (on each rank)
    max_steps: int = 0  # 0: no step limit (then max_time must be set)
    max_time: str = ""  # wall-clock budget such as "90s", "3m", "1h"; "" for none
    eval_every: int = 200  # steps between evaluations (0: only at the end)
    eval_batches: int = 20  # validation batches per evaluation (0: the whole split)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept besides the best one
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    label_smoothing: float = 0.0  # seq2seq/classification targets: (1 - eps) one-hot + eps / V
    seed: int = 0  # model init, data order, masking and dropout
    deterministic: bool = False  # PyTorch's deterministic algorithms (for bit-exact GPU runs)
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: ddp under torchrun
    # auto: a GPU per process when there are enough (NCCL), else the CPU (gloo); cpu: always
    # the CPU; cuda: GPUs or an error (see qkv.train.distributed.choose_backend)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_time:
            parse_duration(self.max_time)
        if not self.max_steps and not self.max_time:
            raise ConfigError(
                "the run has no budget: set train.max_steps (e.g. --train.max_steps 1000) or "
                "train.max_time (e.g. --train.max_time 3m)"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )

    @property
    def max_seconds(self) -> float | None:
        """The wall-clock budget in seconds, or None."""
        return parse_duration(self.max_time) if self.max_time else None


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What an evaluation decodes and samples besides the validation loss."""

    generate_examples: int = 200  # seq2seq: validation examples decoded for exact match / BLEU
    max_new_tokens: int = 64  # seq2seq: longest decoded target
    sample_prompt: str = ""  # language models: the prompt of the sample ("" : a fixed default)
    sample_tokens: int = 200  # language models: length of the sample (0: no samples)
    temperature: float = 0.8
    top_k: int = 0  # 0: no top-k filter

    def __post_init__(self) -> None:
        for name in ("generate_examples", "max_new_tokens", "sample_tokens", "top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"eval.temperature must be positive, got {self.temperature}")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the linear layers ``targets`` names:
    only they (and the heads model.init_from lacks) train. Off while ``rank`` is 0."""

    rank: int = 0  # r of every adapter; 0: no LoRA
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input while training
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # patterns, as qkv.blocks.lora.matches_target

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not [t for t in self.targets if t.strip()]:
            raise ConfigError("lora.targets names no layer; e.g. --lora.targets q_proj,v_proj")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Knowledge distillation from a trained teacher (see ``qkv.train.distill``); off while
    ``teacher`` is empty."""

    teacher: str = ""  # a qkv run directory (its final/ model) or a model directory
    temperature: float = 2.0  # τ > 0 softens both distributions; the soft loss is scaled by τ²
    alpha: float = 0.5  # the weight of the soft (teacher) loss; 1 - alpha goes to the labels

    def __post_init__(self) -> None:
        if not 0.0 < self.temperature < float("inf"):
            raise ConfigError(f"distill.temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: model, data, optimizer, schedule, loop and evaluation settings."""

    preset: str = "custom"  # the name runs/<preset>-<time> is made of
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=1000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        init, tokenizer = self.model.init_from, self.data.tokenizer
        if tokenizer == "checkpoint" and not init:
            raise ConfigError(
                "data.tokenizer=checkpoint takes the tokenizer of model.init_from, which is not "
                "set; set --model.init_from (or --init-from) or choose char, bpe or wordpiece"
            )
        if init and self.data.kind != "images" and tokenizer in ("char", "bpe", "wordpiece"):
            raise ConfigError(
                f"model.init_from={init!r} needs the checkpoint's vocabulary, but "
                f"data.tokenizer={tokenizer!r} trains a new one on the data; set "
                "--data.tokenizer checkpoint (or the path of a tokenizer.json)"
            )
        if self.optim.head_lr and not init:
            raise ConfigError(
                "optim.head_lr is the learning rate of what model.init_from lacks (a new head); "
                "without model.init_from every parameter is new: set optim.lr instead"
            )


# -- plain data <-> dataclasses ---------------------------------------------------------------


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` holds); ``config_from_dict`` inverts it."""
    out: dict[str, Any] = {"preset": config.preset}
    out["model"] = {"family": config.model.family, **dict(config.model.options)}
    if config.model.init_from:
        out["model"]["init_from"] = config.model.init_from
    for name in ("data", "optim", "schedule", "train", "eval", "distill", "lora"):
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            tp, tp.__name__
        )
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotation ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r} is not valid; use {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) and not (
            isinstance(value, str) and typing.get_args(tp) == (str, Ellipsis)
        ):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if isinstance(value, str) and args == (str, Ellipsis):  # "q_proj,v_proj" on a CLI
            value = [part.strip() for part in value.split(",") if part.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not valid; use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not valid; use an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not valid; use a number")
    if tp is str:
        if value is None:  # an empty override (--train.max_time "") reads as null
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not valid; use a string")
    return value


def _section(cls: type, data: Any, name: str) -> Any:
    """Build the dataclass ``cls`` from ``data``, checking every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {name}.{key}; valid keys of {name}: {', '.join(fields)}"
            )
        values[key] = _coerce(value, hints[key], f"{name}.{key}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{name}: {e}") from None


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": LoopConfig,
    "eval": EvalConfig,
    "distill": DistillConfig,
    "lora": LoRAConfig,
}


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A ``TrainConfig`` from plain data (a parsed YAML file), every key and value checked.

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type or range.
    """
    valid = ["preset", "model", *SECTIONS]
    for key in data:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r}; valid top-level keys: {', '.join(valid)}")
    model = dict(data.get("model") or {})
    family = model.pop("family", "gpt")
    init_from = _coerce(model.pop("init_from", ""), str, "model.init_from")
    if init_from and "family" not in (data.get("model") or {}):
        raise ConfigError(
            f"model.init_from={init_from!r} needs model.family too (the checkpoint's family: "
            "bert for minilm, gpt for a gpt-char run), so that the model's keys can be checked"
        )
    spec = ModelSpec(family=str(family), options=model, init_from=init_from)
    sections = {name: _section(cls, data.get(name), name) for name, cls in SECTIONS.items()}
    return TrainConfig(preset=str(data.get("preset", "custom")), model=spec, **sections)


def parse_value(text: str) -> Any:
    """An override's value as YAML reads it (``2`` -> 2, ``true`` -> True, ``3m`` -> "3m")."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with dotted keys set: ``{"model.n_layers": 2}`` sets ``base["model"]["n_layers"]``.

    Mappings in ``overrides`` without dots (a whole ``--config`` file) merge key by key.

    Example:
        >>> merge_overrides({"model": {"n_layers": 6}}, {"model.n_layers": 2, "train.seed": 1})
        {'model': {'n_layers': 2}, 'train': {'seed': 1}}
    """
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(
                f"override {key!r} must be SECTION.KEY (e.g. model.n_layers or train.max_steps)"
            )
        if len(parts) == 1:
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
            continue
        section, name = parts
        current = out.get(section)
        if current is None:
            current = {}
        elif not isinstance(current, Mapping):
            raise ConfigError(f"{section} is not a section; valid: model, {', '.join(SECTIONS)}")
        out[section] = {**current, name: value}
    return out
