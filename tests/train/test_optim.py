"""AdamW parameter groups: which parameters decay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qkv.models.bert import PRESETS as BERT
from qkv.models.bert import Bert
from qkv.models.gpt import GPT, GPTConfig
from qkv.models.vit import PRESETS as VIT
from qkv.models.vit import ViT
from qkv.train import config_from_dict, train
from qkv.train.config import OptimConfig
from qkv.train.metrics import read_metrics
from qkv.train.optim import build_optimizer, param_groups
from tests.conftest import ATOL

from .helpers import TINY_GPT, with_overrides


def _names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_gpt_decays_only_linear_weights() -> None:
    model = GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=8))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = _names(model, decay["params"])  # type: ignore[arg-type]
    kept = _names(model, no_decay["params"])  # type: ignore[arg-type]
    assert decayed and all(n.endswith("_proj.weight") for n in decayed)
    assert "tok_emb.weight" in kept  # the embedding, tied to lm_head: no decay
    assert "pos_emb.emb.weight" in kept or any("pos_emb" in n for n in kept)
    assert all(n.endswith(".bias") or "norm" in n or "emb" in n for n in kept)
    # Every parameter is in exactly one group (the tied head once).
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    assert not decayed & kept


def test_bert_and_vit_norms_biases_embeddings_are_not_decayed() -> None:
    for model in (Bert(BERT["tiny"]), ViT(VIT["tiny"])):
        decay, _ = param_groups(model, 0.05)
        decayed = _names(model, decay["params"])  # type: ignore[arg-type]
        for name, p in model.named_parameters():
            # (ViT's patch embedding is a convolution: a linear map of each patch, decayed.)
            embedding = "emb" in name and "patch_emb" not in name
            if p.dim() < 2 or embedding or "norm" in name or name == "cls_token":
                assert name not in decayed, name
        assert any("patch_emb" in n for n in decayed) or isinstance(model, Bert)


def test_build_optimizer_settings() -> None:
    model = GPT(GPTConfig(vocab_size=20, d_model=8, n_layers=1, n_heads=2, max_seq_len=8))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, beta1=0.8, beta2=0.9, weight_decay=0.3))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_activation_checkpointing_gives_the_same_gradients_and_state_dict() -> None:
    from qkv.train.build import CheckpointedLayer, enable_activation_checkpointing

    config = GPTConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                       dropout=0.1)  # fmt: skip
    ids = torch.randint(0, 30, (2, 8))
    models, losses, grads = [], [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same weights and the same dropout masks
        model = GPT(config)
        if checkpointing:
            enable_activation_checkpointing(model)
            assert all(isinstance(layer, CheckpointedLayer) for layer in model.layers)
        loss = model(ids, labels=ids).loss
        loss.backward()
        models.append(model)
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # The wrappers are invisible in state dicts: the same keys in the same order, both ways.
    plain, wrapped = models
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert not any(".layer." in name for name in wrapped.state_dict())
    changed = {name: t + 1 for name, t in plain.state_dict().items()}
    wrapped.load_state_dict(changed, strict=True)
    for name, tensor in wrapped.state_dict().items():
        assert torch.equal(tensor, changed[name]), name


def test_a_run_with_activation_checkpointing_trains_and_saves_the_same(
    tmp_path: Path, cache_dir: Path
) -> None:
    runs = []
    for checkpointing in (False, True):
        config = with_overrides(
            TINY_GPT, train={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2,
                             "activation_checkpointing": checkpointing},
        )  # fmt: skip
        run = tmp_path / str(checkpointing)
        train(config_from_dict(config), run, cache_dir=cache_dir)
        runs.append(run)
    plain, wrapped = ([float(r["loss"]) for r in read_metrics(run / "metrics.csv")] for run in runs)
    assert wrapped == pytest.approx(plain, abs=1e-6)
    for file in ("final/model.safetensors", "checkpoints/step-00000004/model.safetensors"):
        a, b = (load_file(str(run / file)) for run in runs)
        assert list(a) == list(b), file
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_the_fused_update_is_adamw_to_rounding() -> None:
    """On the CPU the optimizer is PyTorch's fused AdamW, and it steps as the plain one does."""
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    twin = copy.deepcopy(model)
    config = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, config)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(
        param_groups(twin, config.weight_decay), lr=config.lr,
        betas=(config.beta1, config.beta2), eps=config.eps, foreach=False,
    )  # fmt: skip
    for _ in range(5):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m, opt in ((model, fused), (twin, plain)):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=ATOL[torch.float32], rtol=1e-6)
