"""What every model family shares: its output record, its config handling, loading and saving.

A family is one file in ``qkv/models`` with a frozen dataclass ``Config`` and a model class that
subclasses ``QkvModel`` with that config as its type argument, ``class ViT(QkvModel[ViTConfig])``
(or a subclass such as ``DecoderLM[GPTConfig]``), and names its ``family``. Subclassing sets
``config_class`` from the type argument (the one place a family names its config) and registers
the family under its ``family`` name, which is how a checkpoint written by qkv finds its class
again.

Shape legend: B batch · T positions · D model width · V vocabulary · L layers.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from qkv.blocks.moe import experts_regularizer

__all__ = [
    "FAMILIES",
    "ModelOutput",
    "QkvModel",
    "config_from_dict",
    "config_to_dict",
    "model_config_from_dict",
    "model_config_to_dict",
]


@dataclass
class ModelOutput:
    """What a model's forward returns; fields a family does not produce stay None.

    Attributes:
        logits: scores over the vocabulary (B, T, V), or over classes (B, C).
        loss: the training objective's loss when labels were given (a scalar).
        hidden_states: the input of every layer and the final output, each (B, T, D), when
            ``output_hidden_states=True``.
        attentions: attention weights of every layer, each (B, H, T, S), when
            ``output_attentions=True``.
        last_hidden_state: the final hidden states (B, T, D).
        pooler_output: a pooled summary (B, D), for families with a pooler.
        encoder_last_hidden_state: encoder-decoders: the encoder's output (B, S, D).
        encoder_hidden_states / cross_attentions: encoder-decoders, on request.
    """

    logits: Tensor | None = None
    loss: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    pooler_output: Tensor | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple[Tensor, ...] | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


FAMILIES: dict[str, type[QkvModel[Any]]] = {}
ConfigT = TypeVar("ConfigT")  # a family's config dataclass


def model_config_to_dict(config: Any) -> dict[str, Any]:
    """A model family's config dataclass as plain JSON-ready data."""
    return dataclasses.asdict(config)


def model_config_from_dict(config_class: type, data: dict[str, Any]) -> Any:
    """Build the model config ``config_class`` from a dict, naming any key it does not know."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} field(s) {unknown}; known fields: {sorted(fields)}"
        )
    hints = typing.get_type_hints(config_class)
    values = {}
    for key, value in data.items():
        # JSON has no tuples: turn lists back into tuples where the field is a tuple.
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        values[key] = value
    return config_class(**values)


# The older names, kept so that existing imports still work. ``qkv.train`` has its own
# ``config_to_dict`` / ``config_from_dict`` for the whole run config (a ``TrainConfig``); the
# ``model_`` names above say which of the two pairs this is.
config_to_dict = model_config_to_dict
config_from_dict = model_config_from_dict


class QkvModel(nn.Module, Generic[ConfigT]):
    """Base class of every model family: a config, a parameter count, loading and saving.

    ``QkvModel[XConfig]`` types ``self.config`` as ``XConfig`` and sets ``config_class``; a
    subclass of a family that takes a richer config (Mixtral of LLaMA) sets both itself.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type]
    config: ConfigT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" not in cls.__dict__:  # the config class given as the type argument
            for base in cls.__dict__.get("__orig_bases__", ()):
                args = typing.get_args(base)
                if args and isinstance(args[0], type):
                    cls.config_class = args[0]
        # Only a class that names its own family registers: a user's subclass of GPT inherits
        # family = "gpt" and must not take the family's place in FAMILIES (loading, training).
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    def training_regularizer(self) -> Tensor | None:
        """What the last forward adds to the training objective beyond the task's loss,
        already weighted: a mixture of experts' router losses (``experts_regularizer``);
        None for a model without experts. Trainers add it to the loss they minimise
        (``qkv.train`` does)."""
        return experts_regularizer(self)

    def __init__(self, config: ConfigT) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Number of parameters, shared (tied) tensors counted once."""
        seen: set[int] = set()
        total = 0
        skip: set[int] = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``.

        Families with a Hugging Face counterpart are written in its layout (so that
        ``transformers`` loads them); the others in qkv's own layout. Both load with
        ``qkv.from_pretrained``.
        """
        # interop/ builds on models/; these two methods are conveniences that call into it.
        from qkv.interop import save_pretrained

        return save_pretrained(self, directory)

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Continue ``input_ids`` token by token (see ``qkv.generate.generate`` for the options).

        Raises:
            TypeError: this model does not generate (an encoder such as BERT or ViT).
        """
        # generate/ builds on models/; this method is a convenience that calls into it.
        from qkv.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike[str], **kwargs: Any) -> QkvModel:
        """Load a checkpoint of this family (see ``qkv.from_pretrained``)."""
        from qkv.interop import from_pretrained

        model = from_pretrained(path_or_name, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(
                f"{path_or_name} holds a {type(model).__name__}, not a {cls.__name__}; "
                "use qkv.from_pretrained to load whatever it holds"
            )
        return model

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
