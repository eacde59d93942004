"""Fine-tuning: a run that starts from pretrained weights, and which of them train.

    model.init_from   a qkv run directory (its final/ model), a checkpoint directory (qkv's
                      layout or Hugging Face's) or a packaged name such as ``minilm``
    data.tokenizer    ``checkpoint``: the tokenizer.json beside those weights (its ids are the
                      rows of the pretrained embedding)
    optim.freeze      parameters that do not train, by name pattern
    optim.head_lr     the peak learning rate of what the checkpoint lacked (a new head)
    lora.*            low-rank adapters (``qkv.blocks.lora``) on the layers ``lora.targets``
                      names; every other pretrained weight is frozen

Starting from a checkpoint (``init_model``):

1. load it with ``qkv.from_pretrained`` (strict: the checkpoint is whole);
2. its family must be ``model.family``: the preset's keys belong to that family;
3. the architecture is the checkpoint's config, changed by the preset's model options (a
   head, dropout), with the task's fields (``num_labels``) from the data;
4. the model is built from ``train.seed`` and every checkpoint tensor whose name it has is
   copied in. Shapes must agree (the error lists every mismatch). Tensors the model has and the
   checkpoint lacks are **new** (a classification head): they keep their fresh initialisation
   and are reported. Tensors the checkpoint has and the model lacks (a masked-LM head) are
   **dropped**, and reported too.

What happened is written to ``init.json`` in the run directory (and summarised in ``run.json``
under ``init``). A resumed run takes its architecture and the names of the new tensors from
``init.json`` and its weights from its own checkpoint: the pretrained checkpoint is not read
again, and may be gone. The tokenizer is copied to ``init-tokenizer.json`` for the same reason.

With LoRA, the new tensors train in full beside the adapters (PEFT's ``modules_to_save``): a
classifier initialised at random must learn. At the end of the run ``final/`` holds the
*merged* model (the updates folded into the weights: ``qkv.from_pretrained``, ``qkv eval`` and
``qkv generate`` read it as any model), and ``final/adapter/`` the adapters alone in PEFT's
layout, for the base checkpoint, where the family maps one to one onto transformers (not
GPT-2); heads trained in full are in ``final/`` only.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkv._io import atomic_write_json
from qkv.blocks.lora import LoRAReport, apply_lora, matches_target, merge_lora
from qkv.data.config import DataConfig, DataSource
from qkv.interop.files import CheckpointError
from qkv.models.base import QkvModel, model_config_to_dict
from qkv.train.build import build_model
from qkv.train.config import ConfigError, TrainConfig

__all__ = [
    "ADAPTER_DIR",
    "INIT_RECORD",
    "INIT_TOKENIZER",
    "InitReport",
    "adapt_model",
    "add_lora",
    "checkpoint_directory",
    "count_parameters",
    "export_final",
    "frozen_names",
    "head_parameters",
    "init_model",
    "resolve_data_config",
    "run_summary",
    "write_init",
]

log = logging.getLogger(__name__)

INIT_RECORD = "init.json"  # what init_from loaded, in the run directory
INIT_TOKENIZER = "init-tokenizer.json"  # the checkpoint's tokenizer, copied at the start
ADAPTER_DIR = "adapter"  # final/adapter/: the LoRA adapters in PEFT's layout
_RUN_CONFIG = "config.yaml"  # what marks a qkv run directory (qkv.train.rundir.CONFIG_FILE)
_PEFT_TASK = {"lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classify": "SEQ_CLS"}


def checkpoint_directory(init_from: str) -> Path:
    """The directory of the weights ``init_from`` names: a qkv run's ``final/``, or what
    ``qkv.interop.resolve_checkpoint`` finds (a directory, a packaged name, a Hub name)."""
    from qkv.interop import resolve_checkpoint

    path = Path(init_from).expanduser()
    if (path / _RUN_CONFIG).is_file():  # a qkv run directory
        final = path / "final"
        if not (final / "config.json").is_file():
            raise CheckpointError(
                f"model.init_from={init_from!r} is a qkv run without a final/ model (it did "
                "not finish); resume it to the end first, or pass another checkpoint"
            )
        return final
    return resolve_checkpoint(init_from)


def resolve_data_config(config: TrainConfig, run_dir: Path, *, started: bool) -> DataConfig:
    """``config.data`` with ``tokenizer: checkpoint`` replaced by a tokenizer.json path: the
    run's own copy once it has ``started`` (resume, evaluation), else the checkpoint's."""
    if config.data.tokenizer != "checkpoint":
        return config.data
    if started and (run_dir / INIT_TOKENIZER).is_file():
        return replace(config.data, tokenizer=str(run_dir / INIT_TOKENIZER))
    path = checkpoint_directory(config.model.init_from) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer=checkpoint: {path.parent} has no tokenizer.json; pass the path of "
            "the tokenizer the checkpoint was trained with as --data.tokenizer"
        )
    return replace(config.data, tokenizer=str(path))


@dataclass(frozen=True, kw_only=True)
class InitReport:
    """What ``init_model`` did, and what trains (``init.json`` holds it)."""

    init_from: str  # as the config says
    directory: str  # where the weights were read
    family: str
    model_config: dict[str, Any]  # the resolved architecture
    loaded: int  # tensors copied from the checkpoint
    new: tuple[str, ...]  # tensors the checkpoint lacked (fresh, from train.seed)
    dropped: tuple[str, ...]  # checkpoint tensors the model has no place for

    def record(self) -> dict[str, Any]:
        """What ``init.json`` holds: enough to rebuild the run's model without the checkpoint."""
        return {
            "init_from": self.init_from, "directory": self.directory, "family": self.family,
            "model_config": self.model_config, "loaded": self.loaded, "new": list(self.new),
            "dropped": list(self.dropped),
        }  # fmt: skip

    def note(self) -> str:
        """One line for the run's log: what was loaded, created and left out."""
        new = ", ".join(self.new) or "none"
        dropped = ", ".join(self.dropped) or "none"
        return (
            f"model.init_from={self.init_from}: {self.loaded} tensors loaded from "
            f"{self.directory}; new (initialised from train.seed): {new}; not used: {dropped}"
        )


def run_summary(
    init: InitReport | None, notes: list[str], model: nn.Module
) -> dict[str, Any] | None:
    """What ``run.json`` records of a fine-tune under ``finetune`` (None for a plain run)."""
    if init is None and not notes:
        return None
    trainable, total = count_parameters(model)
    out: dict[str, Any] = {"trainable_parameters": trainable, "parameters": total}
    if init is not None:
        out["init"] = {k: v for k, v in init.record().items() if k != "model_config"}
    notes = ([init.note()] if init is not None else []) + notes
    notes.append(f"training {trainable:,} of {total:,} parameters")
    return {**out, "notes": notes}


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> set[str]:
    """Copy every tensor of ``tensors`` that ``model`` has; returns the names copied.

    Raises:
        CheckpointError: a tensor's shape differs (every mismatch is listed).
    """
    expected = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"model.init_from={where!r} does not fit the model: shape mismatches {wrong}. The "
            "architecture comes from the checkpoint: drop the model options that change sizes "
            "(d_model, n_layers, vocab_size, max_seq_len, ...)"
        )
    common = {k: tensors[k] for k in expected if k in tensors}
    model.load_state_dict(common, strict=False)
    return set(common)


def init_model(
    config: TrainConfig, source: DataSource, run_dir: Path, *, resume: bool
) -> tuple[QkvModel, InitReport]:
    """The run's model built from ``model.init_from`` (see the module docstring).

    On ``resume`` only the architecture is rebuilt, from the run's ``init.json``; the weights
    then come from the run's checkpoint.

    Raises:
        ConfigError: the checkpoint holds another family than ``model.family``.
        CheckpointError: the checkpoint cannot be read, or its shapes do not fit.
    """
    from qkv.interop import from_pretrained

    init_from = config.model.init_from
    if resume:
        record = json.loads((run_dir / INIT_RECORD).read_text(encoding="utf-8"))
        model = build_model(config, source, base=record["model_config"])
        report = InitReport(
            init_from=record["init_from"], directory=record["directory"],
            family=record["family"], model_config=record["model_config"],
            loaded=record["loaded"], new=tuple(record["new"]), dropped=tuple(record["dropped"]),
        )  # fmt: skip
        return model, report
    directory = checkpoint_directory(init_from)
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's random stream
        pretrained = from_pretrained(directory)
    if pretrained.family != config.model.family:
        raise ConfigError(
            f"model.init_from={init_from!r} holds a {pretrained.family!r} model, but "
            f"model.family is {config.model.family!r}: fine-tune it with a "
            f"{pretrained.family} preset (or config), or drop model.init_from"
        )
    base = model_config_to_dict(pretrained.config)
    model = build_model(config, source, base=base)
    tensors = pretrained.state_dict()
    loaded = _load_weights(model, tensors, init_from)
    new = tuple(k for k in model.state_dict() if k not in loaded)
    dropped = tuple(k for k in tensors if k not in loaded)
    report = InitReport(
        init_from=init_from, directory=str(directory), family=pretrained.family,
        model_config=model_config_to_dict(model.config), loaded=len(loaded), new=new,
        dropped=dropped,
    )  # fmt: skip
    return model, report


def write_init(run_dir: Path, report: InitReport, data: DataConfig) -> None:
    """Write ``init.json`` and copy the checkpoint's tokenizer (rank 0, at the first start)."""
    atomic_write_json(run_dir / INIT_RECORD, report.record())
    tokenizer = Path(data.tokenizer)
    if tokenizer.is_file() and tokenizer != run_dir / INIT_TOKENIZER:
        shutil.copyfile(tokenizer, run_dir / INIT_TOKENIZER)


# --8<-- [start:frozen]
def frozen_names(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The parameters ``patterns`` freeze: a parameter is matched when its name, or the name
    of a module above it, matches a pattern as ``qkv.blocks.lora.matches_target`` says
    (``tok_emb`` freezes ``tok_emb.weight``; ``layers.[0-2].*`` the first three layers).

    Raises:
        ConfigError: a pattern matches no parameter (the message shows some names).
    """
    names = [name for name, _ in model.named_parameters()]
    chosen: list[str] = []
    for pattern in patterns:
        found = [
            name for name in names
            if any(matches_target(".".join(name.split(".")[:i]), pattern)
                   for i in range(1, name.count(".") + 2))
        ]  # fmt: skip
        if not found:
            raise ConfigError(
                f"optim.freeze pattern {pattern!r} matches no parameter of "
                f"{type(model).__name__}; its parameters are named e.g. {names[:4]}"
            )
        chosen += [name for name in found if name not in chosen]
    return chosen


# --8<-- [end:frozen]


def add_lora(model: nn.Module, config: TrainConfig) -> LoRAReport:
    """Put the adapters ``config.lora`` describes on ``model`` (in place).

    Raises:
        ConfigError: a target matches no linear layer, or the rank exceeds a layer's width.
    """
    c = config.lora
    try:
        return apply_lora(model, list(c.targets), rank=c.rank, alpha=c.alpha, dropout=c.dropout)
    except ValueError as e:
        key = f"lora.rank={c.rank}" if str(e).startswith("rank=") else "lora.targets"
        raise ConfigError(f"{key}: {e}") from None


def adapt_model(model: nn.Module, config: TrainConfig, new: tuple[str, ...] = ()) -> list[str]:
    """Choose what trains, in place: LoRA adapters (then only they and the ``new`` tensors
    train), then ``optim.freeze``. Returns notes for the run's log."""
    notes = []
    if config.lora.rank:
        report = add_lora(model, config)
        heads = [p for name, p in model.named_parameters() if name in set(new)]
        for p in heads:  # a new head trains in full: it starts random
            p.requires_grad_(True)
        notes.append(f"{report}" + (f"; {len(heads)} new tensors train in full" if heads else ""))
    if config.optim.freeze:
        frozen = frozen_names(model, config.optim.freeze)
        params = dict(model.named_parameters())
        for name in frozen:
            params[name].requires_grad_(False)
        notes.append(f"optim.freeze: {len(frozen)} parameter tensors frozen")
    return notes


def head_parameters(model: nn.Module, new: tuple[str, ...]) -> list[nn.Parameter]:
    """The trainable parameters among the ``new`` tensors (``optim.head_lr`` applies to them)."""
    wanted = set(new)
    return [p for name, p in model.named_parameters() if name in wanted and p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared ones counted once."""
    unique = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in unique.values())


def export_final(model: QkvModel, directory: Path, *, tokenizer: Any, config: TrainConfig) -> Path:
    """Write the run's final model: with LoRA the merged model (a copy: ``model`` keeps its
    adapters) and, where the family allows, the adapters in PEFT's layout in ``adapter/``."""
    from qkv.interop import save_pretrained
    from qkv.interop.peft import save_peft_adapter

    if not config.lora.rank:
        return save_pretrained(model, directory, tokenizer=tokenizer)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    out = save_pretrained(merged, directory, tokenizer=tokenizer)
    try:
        save_peft_adapter(
            model, out / ADAPTER_DIR, base_model_name_or_path=config.model.init_from or None,
            task_type=_PEFT_TASK.get(config.data.kind, "FEATURE_EXTRACTION"),
        )  # fmt: skip
    except CheckpointError as e:
        log.info("the LoRA adapters are merged into %s only (no PEFT adapter): %s", out, e)
    return out
