"""Run configs: YAML and overrides into typed dataclasses, with one-line errors."""

from __future__ import annotations

import pytest

from qkv.train.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    merge_overrides,
    parse_duration,
)
from qkv.train.presets import list_presets, load_preset


def test_round_trip_through_plain_data() -> None:
    for name in list_presets():
        config = config_from_dict(load_preset(name))
        assert config_from_dict(config_to_dict(config)) == config


def test_overrides_set_dotted_keys_and_coerce_types() -> None:
    data = merge_overrides(load_preset("gpt-char"), {
        "model.n_layers": 2, "optim.lr": "1e-3", "train.max_time": "90s", "data.seq_len": 64,
    })  # fmt: skip
    config = config_from_dict(data)
    assert config.model.options["n_layers"] == 2
    assert config.optim.lr == 1e-3  # YAML reads 1e-3 as a string; the float field converts it
    assert config.train.max_seconds == 90.0
    assert config.data.seq_len == 64


@pytest.mark.parametrize(
    "text,seconds", [("90s", 90.0), ("3m", 180.0), ("1h", 3600.0), ("45", 45.0), ("1.5m", 90.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "data,words",
    [
        ({"train": {"batchsize": 4}}, ["train.batchsize", "batch_size"]),
        ({"model": {"family": "gpt", "n_layer": 2}}, ["model.n_layer", "n_layers"]),
        ({"model": {"family": "gpt5"}}, ["gpt5", "llama"]),
        ({"optim": {"lr": "fast"}}, ["optim.lr", "number"]),
        ({"train": {"precision": "fp16"}}, ["train.precision", "'bf16'"]),
        ({"train": {"max_time": "soon", "max_steps": 0}}, ["max_time", "3m"]),
        ({"train": {"max_steps": 0}}, ["max_steps", "max_time"]),
        ({"data": {"seq_len": 1}}, ["data", "seq_len"]),
        ({"schedule": {"kind": "linear"}}, ["schedule.kind", "'cosine'"]),
        ({"trian": {}}, ["trian", "train"]),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*gpt-char"):
        load_preset("nope")


def test_train_device() -> None:
    """train.device chooses where to train: auto (the default), cpu or cuda, nothing else."""
    assert config_from_dict(load_preset("gpt-char")).train.device == "auto"
    config = config_from_dict(merge_overrides(load_preset("gpt-char"), {"train.device": "cpu"}))
    assert config.train.device == "cpu"
    assert config_to_dict(config)["train"]["device"] == "cpu"
    with pytest.raises(ConfigError) as info:
        config_from_dict(merge_overrides(load_preset("gpt-char"), {"train.device": "gpu"}))
    message = str(info.value)
    assert "\n" not in message
    for word in ("train.device", "'auto'", "'cpu'", "'cuda'"):
        assert word in message
