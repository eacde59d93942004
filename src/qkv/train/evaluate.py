"""Evaluation: how well the model does on data it was not trained on.

Every objective reports the validation loss (nats per target, summed over real targets and
divided by their count, as in training), perplexity exp(loss) and the accuracy of the argmax
prediction. The objective (``qkv.train.objectives``) says what else, by kind:

    lm        bits per character, loss / ln 2, when each token is one character (char
              tokenizers); a sample from a fixed prompt (``sample``)
    mlm       accuracy on the masked positions, and the unigram baseline: the accuracy of always
              guessing the most frequent masked token (what a model that ignores context gets)
    seq2seq   exact match and BLEU (sacrebleu, ``pip install 'qkv[data]'``) of greedy decoding
              (``qkv.generate``) on the first ``eval.generate_examples`` validation examples
    images    classification accuracy

Masking of the validation batches is seeded by the batch index, so every evaluation scores the
same positions. Evaluation leaves the global random state alone (the resume test relies on it).

``evaluate_run`` scores what a run left: its final model, or its best or latest checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv.data.config import DataSource
from qkv.interop.files import CheckpointError
from qkv.models.base import FAMILIES, QkvModel
from qkv.train import checkpoint as ckpt
from qkv.train.build import autocast_dtype, autocast_factory, build_objective
from qkv.train.config import TrainConfig, config_from_dict
from qkv.train.distributed import choose_backend, visible_gpu_count
from qkv.train.objectives import Objective, ValTotals
from qkv.train.rundir import check_same_config, default_cache_dir, load_run_config

__all__ = ["FINAL", "Evaluator", "evaluate_run"]

FINAL = "final"  # the run's exported model, under the run directory


class Evaluator:
    """Scores a model on the validation split of a data source.

    What is measured beyond loss, perplexity and accuracy, and what a sample is, the
    objective decides (``Objective.metric_names``, ``tally``, ``metrics``,
    ``decoded_metrics``, ``sample``).

    Args:
        config: the run's config (eval settings, batch sizes, seed).
        objective: the training objective (prepares batches, scores logits, names metrics).
        source: the data source (``val_batches``, token ids).
        tokenizer: decodes samples and BLEU references; None for images.
    """

    def __init__(
        self, config: TrainConfig, objective: Objective, source: DataSource, tokenizer: Any
    ) -> None:
        self.config = config
        self.objective = objective
        self.source = source
        self.tokenizer = tokenizer

    @property
    def metric_names(self) -> list[str]:
        """The columns this evaluation fills, in order."""
        return self.objective.metric_names

    def _val_batches(self) -> Iterator[dict[str, Tensor]]:
        c = self.config.train
        return self.source.val_batches(c.batch_size, c.eval_batches or None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, autocast: Any) -> dict[str, float]:
        """Every metric of ``metric_names`` for ``model`` (switched to eval mode and back).

        Args:
            model: what the loop trains (unwrapped from DDP; FSDP-sharded models work when
                every rank calls this).
            autocast: a context manager factory for the forward passes (mixed precision).
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        totals = ValTotals()
        for index, raw in enumerate(self._val_batches()):
            batch = self.objective.prepare(raw, seed=self.config.train.seed, step=-1 - index)
            batch = batch.to(device)
            with autocast():
                logits = self.objective.logits(model, batch)
            self.objective.tally(totals, logits, batch)
        out = self.objective.metrics(totals)
        decoded = self.objective.decoded_metrics(
            model, self._val_batches(), source=self.source, tokenizer=self.tokenizer,
            settings=self.config.eval, autocast=autocast,
        )  # fmt: skip
        out.update(decoded)
        model.train(was_training)
        return out

    @torch.no_grad()
    def sample(self, model: nn.Module, *, autocast: Any, seed: int) -> str | None:
        """A sample of what ``model`` writes (a language model's continuation of the sample
        prompt; None for other objectives). See ``Objective.sample``."""
        return self.objective.sample(
            model, source=self.source, tokenizer=self.tokenizer, settings=self.config.eval,
            autocast=autocast, seed=seed,
        )  # fmt: skip


def evaluate_run(
    run_dir: str | Path, *, checkpoint: str = "final", cache_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Evaluate a finished (or interrupted) run on its validation split.

    Args:
        run_dir: a directory ``train`` wrote.
        checkpoint: ``"final"`` (the exported model), ``"best"`` (the checkpoint with the lowest
            validation loss) or ``"latest"`` (the newest checkpoint); checkpoints of FSDP runs
            are joined from their ranks' shards.
        cache_dir: the tokenized-corpus cache (default ``~/.cache/qkv/data``).
        device: "auto", "cpu" or "cuda", chosen as for one training process (None: the run's
            ``train.device``).

    Returns:
        The evaluation's metrics (``val_loss``, ``val_acc``, ...).
    """
    from qkv.data import build_data
    from qkv.interop import from_pretrained

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    from qkv.train.finetune import resolve_data_config

    data = resolve_data_config(config, run_dir, started=True)  # data.tokenizer=checkpoint
    source, tokenizer = build_data(data, Path(cache_dir or default_cache_dir()))
    if checkpoint == "final":
        if not (run_dir / FINAL / "config.json").is_file():
            raise CheckpointError(
                f"{run_dir} has no final model (the run did not finish); evaluate a checkpoint "
                "with --checkpoint latest (or best)"
            )
        model = from_pretrained(run_dir / FINAL)
    elif checkpoint in ("best", "latest"):
        model = _model_of_checkpoint(run_dir, config, best=checkpoint == "best")
    else:
        raise ValueError(f"checkpoint={checkpoint!r}: use final, best or latest")
    _, where = choose_backend(
        device or config.train.device, world_size=1, cuda_count=visible_gpu_count()
    )
    model.to(where)
    objective = build_objective(config, source, model.config)
    evaluator = Evaluator(config, objective, source, tokenizer)
    autocast = autocast_factory(autocast_dtype(config.train.precision, model.device), model.device)
    return evaluator.evaluate(model, autocast=autocast)


def _model_of_checkpoint(run_dir: Path, config: TrainConfig, *, best: bool) -> QkvModel:
    """The model of the run's newest checkpoint, or of its best one."""
    from qkv.interop import load_state_dict_strict
    from qkv.models.base import config_from_dict as model_config_from_dict

    root = run_dir / ckpt.CHECKPOINTS
    path = ckpt.latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to evaluate")
    state = ckpt.read_json(path / ckpt.STATE)
    if best and state.get("best_step") is not None:
        path = ckpt.checkpoint_dir(root, state["best_step"])
        state = ckpt.read_json(path / ckpt.STATE)
    check_same_config(config_from_dict(state["config"]), config, str(path))
    model_class = FAMILIES[state["family"]]
    model = model_class(model_config_from_dict(model_class.config_class, state["model_config"]))
    if config.lora.rank:  # the run's adapters, to take the checkpoint's weights; then merged
        from qkv.blocks.lora import merge_lora
        from qkv.train.finetune import add_lora

        add_lora(model, config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    load_state_dict_strict(model, ckpt.read_model_weights(path, state, shapes))
    if config.lora.rank:
        merge_lora(model)
    return model
