"""Loading and saving checkpoints: qkv's own layout, strictness, and every bad file named."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qkv._io import TMP_PREFIX, atomic_write, atomic_write_text, sweep_stale_temporaries
from qkv.interop import CheckpointError, from_pretrained, resolve_checkpoint, save_pretrained
from qkv.models.base import ModelOutput, QkvModel


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    vocab_size: int = 11
    d_model: int = 8
    sizes: tuple[int, ...] = (3, 4)


class Toy(QkvModel):
    """A minimal family with no Hugging Face counterpart, saved in qkv's own layout."""

    family = "toy-for-tests"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.proj = nn.Linear(config.d_model, config.vocab_size)
        self.lm_head = self.proj  # a shared module: its tensors appear under two names

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.proj(self.tok_emb(input_ids)))


def saved_toy(tmp_path: Path, **kwargs) -> tuple[Toy, Path]:
    model = Toy(ToyConfig(**kwargs))
    return model, save_pretrained(model, tmp_path / "toy")


def test_native_round_trip_is_exact(tmp_path: Path) -> None:
    model, directory = saved_toy(tmp_path, sizes=(5, 6))
    config = json.loads((directory / "config.json").read_text())
    assert config["qkv_family"] == "toy-for-tests" and config["config"]["sizes"] == [5, 6]
    loaded = from_pretrained(directory)
    assert isinstance(loaded, Toy) and loaded.config == model.config and not loaded.training
    ids = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert Toy.from_pretrained(directory).config == model.config
    assert not list(directory.glob(TMP_PREFIX + "*"))


def test_dtype_and_tokenizer_options(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    model = Toy(ToyConfig())
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    directory = save_pretrained(model, tmp_path / "toy", tokenizer=tok)
    loaded, tokenizer = from_pretrained(directory, dtype=torch.float64, return_tokenizer=True)
    assert loaded.dtype == torch.float64
    assert tokenizer.encode("hello").ids == [1]
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer.json"):
        from_pretrained(directory, return_tokenizer=True)


def test_sharded_weights_with_index(tmp_path: Path) -> None:
    model, directory = saved_toy(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, directory / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = from_pretrained(directory)
    torch.testing.assert_close(loaded.proj.weight, model.proj.weight, atol=0, rtol=0)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    _, directory = saved_toy(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        from_pretrained(directory)


def test_pickle_offered_as_weights_is_refused(tmp_path: Path) -> None:
    model, directory = saved_toy(tmp_path)
    weights = directory / "model.safetensors"
    torch.save(model.state_dict(), weights)  # a pickle under a safetensors name
    with pytest.raises(CheckpointError, match="pickle"):
        from_pretrained(directory)
    weights.unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\)"):
        from_pretrained(directory)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    _, directory = saved_toy(tmp_path)
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    missing = {k: v for k, v in tensors.items() if k != "proj.bias"}
    save_file(missing, weights)
    with pytest.raises(CheckpointError, match=r"missing tensors \['proj.bias'\]"):
        from_pretrained(directory)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra.weight'\]"):
        from_pretrained(directory)
    save_file({**tensors, "tok_emb.weight": torch.zeros(11, 9)}, weights)
    with pytest.raises(CheckpointError, match=r"tok_emb.weight: checkpoint \(11, 9\), model"):
        from_pretrained(directory)


def test_checkpoint_from_a_different_config(tmp_path: Path) -> None:
    _, directory = saved_toy(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["config"]["d_model"] = 16
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*different config"):
        from_pretrained(directory)
    config["config"]["n_wings"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown ToyConfig field\(s\) \['n_wings'\]"):
        from_pretrained(directory)


def test_unknown_architecture_and_family(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "mamba-x", "architectures": ["MambaXForCausalLM"]})
    )
    with pytest.raises(CheckpointError, match=r"'mamba-x' \(MambaXForCausalLM\) is not supported"):
        from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"qkv_family": "rnn", "config": {}}))
    with pytest.raises(CheckpointError, match=r"qkv 'rnn' model.*upgrade qkv"):
        from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(directory)


def test_paths_that_are_not_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; pass the directory"):
        from_pretrained(tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="names no model"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"qkv_family": "toy-for-tests"}))
    with pytest.raises(CheckpointError, match=r"has no model.safetensors"):
        from_pretrained(tmp_path)


def test_unknown_name_offline_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError, match=r"could not find 'no-such-org/no-such-model'.*Offline"
    ):
        from_pretrained("no-such-org/no-such-model")


def fake_hub(monkeypatch, snapshot_download, errors_module: str = "errors") -> type[Exception]:
    """Install a stand-in ``huggingface_hub`` whose ``snapshot_download`` is the one given.

    Its "not in the local cache" exception lives in ``huggingface_hub.<errors_module>``
    (``errors`` today, ``utils`` in older releases); it is returned for the fake to raise.
    """

    class LocalEntryNotFoundError(FileNotFoundError):
        pass

    def module(name: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        return mod

    hub = module("huggingface_hub")
    hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    holder = module(f"huggingface_hub.{errors_module}")
    holder.LocalEntryNotFoundError = LocalEntryNotFoundError  # type: ignore[attr-defined]
    for name in ("huggingface_hub", "huggingface_hub.errors", "huggingface_hub.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    return LocalEntryNotFoundError


@pytest.mark.parametrize("errors_module", ["errors", "utils"])
def test_a_name_not_in_the_cache_is_downloaded(monkeypatch, tmp_path, errors_module) -> None:
    calls: list[bool] = []

    def snapshot_download(name, *, allow_patterns, local_files_only=False):
        calls.append(local_files_only)
        if local_files_only:
            raise not_cached("nothing cached for this name")
        return str(tmp_path)

    not_cached = fake_hub(monkeypatch, snapshot_download, errors_module)
    assert resolve_checkpoint("some-org/some-model") == tmp_path
    assert calls == [True, False]  # the cache first, then the download


def test_a_corrupt_cache_is_reported_not_swallowed(monkeypatch) -> None:
    calls: list[bool] = []

    def snapshot_download(name, *, allow_patterns, local_files_only=False):
        calls.append(local_files_only)
        raise OSError("snapshot folder is corrupt")

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(
        CheckpointError,
        match=r"local Hugging Face cache failed: OSError: snapshot folder is corrupt",
    ):
        resolve_checkpoint("some-org/some-model")
    assert calls == [True]  # no download attempt hides it


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    atomic_write_text(target, "old contents")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half of the new contents")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old contents"
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))
    (tmp_path / (TMP_PREFIX + "stale")).write_text("left by a killed process")
    assert [p.name for p in sweep_stale_temporaries(tmp_path)] == [TMP_PREFIX + "stale"]


def test_atomic_write_gives_files_the_usual_permissions(tmp_path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "shared.txt", "hello")
    finally:
        os.umask(mask)
    assert path.read_text() == "hello"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_sweep_removes_temporary_directories_too(tmp_path) -> None:
    stale_dir = tmp_path / f"{TMP_PREFIX}step-00000010"
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / "model.safetensors").write_bytes(b"partial")
    stale_file = tmp_path / f"{TMP_PREFIX}abc"
    stale_file.write_bytes(b"x")
    keep = tmp_path / "step-00000005"
    keep.mkdir()
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert not stale_dir.exists() and not stale_file.exists() and keep.is_dir()
