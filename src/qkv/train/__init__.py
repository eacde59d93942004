"""Training: one loop for every model family, with checkpoints, evaluation and presets.

Read in this order: ``config`` (a run as typed data), ``schedule`` (learning rate over time),
``optim`` (AdamW and which parameters decay), ``objectives`` (what is predicted and the loss),
``distill`` (a teacher's softened predictions in the loss),
``build`` (model, objective and precision from a config), ``finetune`` (starting from pretrained
weights: new heads, frozen parameters, LoRA), ``evaluate`` (validation metrics,
samples), ``checkpoint`` (atomic, resumable checkpoints), ``rundir`` (the run directory and
what may change on resume), ``distributed`` (DDP and FSDP2), ``metrics`` (CSV, TensorBoard, the
loss curve), ``state`` (a run's parts and progress), ``loop`` (all of it together), ``presets``
(named runs).

Example:
    >>> from qkv.train import config_from_dict
    >>> config = config_from_dict({"model": {"family": "gpt", "n_layers": 2},
    ...                            "train": {"max_steps": 10}})
    >>> config.model.family, config.train.max_steps
    ('gpt', 10)
"""

from qkv.train.config import (
    ConfigError,
    DistillConfig,
    EvalConfig,
    LoopConfig,
    LoRAConfig,
    ModelSpec,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    merge_overrides,
    parse_duration,
)
from qkv.train.loop import TrainResult, load_run_config, train
from qkv.train.metrics import StepMetrics, TrainCallback
from qkv.train.presets import list_presets, load_preset

__all__ = [
    "ConfigError",
    "DistillConfig",
    "EvalConfig",
    "LoRAConfig",
    "LoopConfig",
    "ModelSpec",
    "OptimConfig",
    "ScheduleConfig",
    "StepMetrics",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_preset",
    "load_run_config",
    "merge_overrides",
    "parse_duration",
    "train",
]
