"""Checkpoint pieces: optimizer state and RNG states without pickle, sweeping and pruning."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv._io import TMP_PREFIX
from qkv.interop.files import CheckpointError
from qkv.train import checkpoint as ckpt


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    opt.zero_grad()
    tensors, data = ckpt.optimizer_state_to_files(opt.state_dict())
    ckpt.write_tensors(tmp_path / "o.safetensors", tensors)
    ckpt.write_json(tmp_path / "o.json", data)
    loaded = ckpt.read_checkpoint_files(tmp_path, ["o.safetensors"])["o.safetensors"]
    restored = ckpt.optimizer_state_from_files(loaded, ckpt.read_json(tmp_path / "o.json"))
    clone = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    clone.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-2, betas=(0.8, 0.9))
    opt2.load_state_dict(restored)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (clone, opt2)):
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)  # the same next step, bit for bit


def test_rng_states_round_trip() -> None:
    tensors, data = ckpt.get_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(tensors, data)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def _fake_checkpoint(root: Path, step: int) -> Path:
    tmp = ckpt.begin_checkpoint(root, step)
    ckpt.write_json(tmp / ckpt.STATE, {"step": step})
    return ckpt.finish_checkpoint(tmp, root, step)


def test_incomplete_and_temporary_checkpoints_are_ignored_then_swept(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 5)
    half = ckpt.begin_checkpoint(tmp_path, 10)  # killed before its manifest
    (half / "model.safetensors").write_bytes(b"partial")
    broken = tmp_path / "step-00000015"  # a manifest naming a file that is cut short
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"abc")
    ckpt.write_json(broken / ckpt.MANIFEST, {"files": {"model.safetensors": 10}, "step": 15})
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    removed = ckpt.sweep_checkpoints(tmp_path)
    assert {p.name for p in removed} == {half.name, broken.name}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


def test_prune_keeps_the_last_k_and_the_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, best_step=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 4, 5]


def test_fsdp_rank_shards_join_back_into_the_whole_weights(tmp_path: Path) -> None:
    # FSDP2's layout, as a 3-rank run writes it: each parameter split along dim 0 into
    # torch.chunk's pieces (7 rows -> 3, 3, 1; 1 row -> 1, 0, 0), each buffer whole on every
    # rank. (tests/train/test_distributed.py checks it against a real FSDP run.)
    whole = {"emb": torch.randn(7, 3), "bias": torch.randn(5), "one": torch.randn(1, 2),
             "buffer": torch.arange(4.0), "scalar": torch.tensor(2.0)}  # fmt: skip
    sharded = {"emb", "bias", "one"}
    for rank in range(3):
        shard = {}
        for name, t in whole.items():
            if name in sharded:
                pieces = list(torch.chunk(t, 3))
                pieces += [t[:0]] * (3 - len(pieces))  # torch.chunk may give fewer pieces
                shard[name] = pieces[rank]
            else:
                shard[name] = t
        ckpt.write_tensors(tmp_path / f"model-rank{rank}.safetensors", shard)
    shapes = {name: t.shape for name, t in whole.items()}
    got = ckpt.read_model_weights(tmp_path, {"world_size": 3}, shapes)
    assert got.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(got[name], t), name
    # A model of another shape is refused, naming the tensor.
    with pytest.raises(CheckpointError, match="emb"):
        ckpt.read_model_weights(tmp_path, {"world_size": 3}, {**shapes, "emb": torch.Size([8, 3])})
