"""LoRA: the adapted layer against its equation, merging, freezing, apply_lora on the models,
and generation with adapters."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
import torch
from torch import nn

import qkv.blocks.lora
from qkv.blocks.lora import (
    LoRALinear,
    apply_lora,
    lora_state_dict,
    matches_target,
    merge_lora,
)
from qkv.generate import generate
from qkv.generate.flat import flat_step
from qkv.models.gpt import GPT
from qkv.models.gpt import PRESETS as GPT_PRESETS
from qkv.models.llama import PRESETS as LLAMA_PRESETS
from qkv.models.llama import Llama
from tests.conftest import ATOL

# Merged (one product with W + s B A) against adapted (three products), float32: 1e-6 (the
# issue's bound), absolute and relative to the output, since outputs of size ~3 are themselves
# rounded to a few 1e-7.
MERGE_TOL = 1e-6


def _perturb(model: nn.Module, std: float = 0.5) -> None:
    """Non-zero B (and a fresh A), so that the adapters change the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.normal_(0.0, std)
                m.lora_B.normal_(0.0, std)


def _models() -> list[Any]:
    return [GPT(GPT_PRESETS["tiny"]).eval(), Llama(LLAMA_PRESETS["tiny"]).eval()]


def test_doctests() -> None:
    assert doctest.testmod(qkv.blocks.lora).failed == 0


def test_forward_is_base_plus_scaled_low_rank_product() -> None:
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    _perturb(layer)
    x = torch.randn(2, 5, 12)  # (B, T, d_in)
    w, b = base.weight.double(), base.bias.double()  # (10, 12), (10,)
    a, bb = layer.lora_A.double(), layer.lora_B.double()  # (3, 12), (10, 3)
    delta = torch.einsum("or,ri->oi", bb, a) * (6.0 / 3)  # (10, 12), s B A
    expected = torch.einsum("bti,oi->bto", x.double(), w + delta) + b  # (B, T, 10)
    torch.testing.assert_close(layer(x).double(), expected, atol=ATOL[torch.float32], rtol=0)
    assert layer.scaling == 2.0


def test_init_kaiming_a_and_zero_b() -> None:
    layer = LoRALinear(nn.Linear(64, 32), rank=8, alpha=16)
    assert (layer.lora_B == 0).all()
    bound = 1 / 64**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64, as nn.Linear's weight
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("model", _models(), ids=["gpt", "llama"])
def test_zero_b_adapted_model_equals_base(model: nn.Module) -> None:
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        apply_lora(model, "q_proj,v_proj,out_proj,down_proj", rank=4)
        after = model(ids).logits
    assert torch.equal(before, after)  # base(x) + 0: exactly the base model


def test_merge_and_unmerge_are_exact() -> None:
    base = nn.Linear(24, 16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8)
    _perturb(layer, std=0.1)  # an update of the size of the base output
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        adapted = layer(x)
        assert (adapted - base(x)).abs().max() > 0.1  # the update is there
        layer.merge()
        assert layer.merged
        merged = layer(x)
        torch.testing.assert_close(merged, adapted, atol=MERGE_TOL, rtol=MERGE_TOL)
        assert (merged - layer.base(x)).abs().max() == 0  # merged: only the base layer runs
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, original, atol=MERGE_TOL, rtol=MERGE_TOL)
        torch.testing.assert_close(layer(x), adapted, atol=MERGE_TOL, rtol=MERGE_TOL)


def test_merge_errors() -> None:
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("rank", [0, 9, -1])
def test_rank_out_of_range(rank: int) -> None:
    with pytest.raises(ValueError, match=r"rank=.* min\(d_in, d_out\) = min\(16, 8\)"):
        LoRALinear(nn.Linear(16, 8), rank=rank, alpha=1)


def test_bad_base_and_dropout() -> None:
    with pytest.raises(TypeError, match=r"adapts an nn\.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), rank=1, alpha=1, dropout=1.0)


def test_training_changes_only_the_adapters() -> None:
    model = Llama(LLAMA_PRESETS["tiny"]).train()
    report = apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, dropout=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(report.adapted)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.SGD(trainable, lr=0.1)
    ids = torch.randint(0, 128, (2, 10))
    for _ in range(2):  # B = 0 at first, so A gets its first gradient in the second step
        optim.zero_grad()
        model(ids, labels=ids).loss.backward()
        optim.step()
    for name, p in model.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert is_adapter == (not torch.equal(p, before[name])), name
        assert is_adapter == p.requires_grad, name


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_apply_lora_q_v_names_and_counts(family: str) -> None:
    model: Any = GPT(GPT_PRESETS["tiny"]) if family == "gpt" else Llama(LLAMA_PRESETS["tiny"])
    c = model.config
    total_before = model.num_parameters()
    r = 4
    report = apply_lora(model, "q_proj,v_proj", rank=r, alpha=8)
    expected = tuple(
        f"layers.{i}.self_attn.{p}" for i in range(c.n_layers) for p in ("q_proj", "v_proj")
    )
    assert report.adapted == expected
    n_kv = getattr(c, "n_kv_heads", c.n_heads)
    e = c.d_model // c.n_heads
    q = r * c.d_model + c.n_heads * e * r  # A (r, D) + B (H E, r)
    v = r * c.d_model + n_kv * e * r  # A (r, D) + B (K E, r)
    assert report.trainable == c.n_layers * (q + v)
    assert report.total == total_before + report.trainable == model.num_parameters()
    assert f"{report.trainable:,} trainable" in str(report)
    assert 0 < report.trainable_fraction < 0.2
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and (layer.rank, layer.scaling) == (r, 2.0)


def test_target_matching_suffix_and_globs() -> None:
    name = "layers.0.self_attn.q_proj"
    assert matches_target(name, "q_proj") and matches_target(name, "self_attn.q_proj")
    assert matches_target(name, name) and matches_target(name, "*_proj")
    assert matches_target(name, "layers.[01].self_attn.q_proj")
    assert not matches_target(name, "proj") and not matches_target(name, "attn.q_proj")
    assert not matches_target(name, "k_proj") and not matches_target(name, "layers.1.*")
    model = Llama(LLAMA_PRESETS["tiny"])
    report = apply_lora(model, ["layers.1.mlp.*", "layers.0.self_attn.?_proj"], rank=2)
    assert report.adapted == (
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.k_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    )


def test_apply_lora_errors() -> None:
    model = GPT(GPT_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"'o_proj' matches no nn.Linear of GPT.*'out_proj'"):
        apply_lora(model, "q_proj,o_proj")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half done
    with pytest.raises(ValueError, match="names no layer"):
        apply_lora(model, " , ")
    apply_lora(model, "q_proj", rank=2)
    with pytest.raises(ValueError, match="already have an adapter"):
        apply_lora(model, "self_attn.q_proj")
    with pytest.raises(ValueError, match="rank=64"):
        apply_lora(model, "v_proj", rank=64)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(GPT(GPT_PRESETS["tiny"]))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_state_dict(nn.Sequential(nn.Linear(2, 2)))


def test_second_apply_keeps_earlier_adapters_training() -> None:
    model = Llama(LLAMA_PRESETS["tiny"])
    first = apply_lora(model, "q_proj", rank=2)
    second = apply_lora(model, "v_proj", rank=2)
    assert second.trainable > first.trainable
    assert model.get_submodule("layers.0.self_attn.q_proj").lora_A.requires_grad


@pytest.mark.parametrize("model", _models(), ids=["gpt", "llama"])
def test_merge_lora_gives_plain_linears_with_the_same_logits(model: Any) -> None:
    apply_lora(model, "q_proj,v_proj,up_proj", rank=4, alpha=8)
    _perturb(model, std=0.3)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        names = merge_lora(model)
        merged = model(ids).logits
    assert len(names) == 3 * model.config.n_layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(merged, adapted, atol=ATOL[torch.float32], rtol=0)


def test_lora_state_dict_holds_only_adapters_and_loads_back() -> None:
    model = Llama(LLAMA_PRESETS["tiny"])
    apply_lora(model, "q_proj,v_proj", rank=2)
    _perturb(model)
    state = lora_state_dict(model)
    layers = [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(state) == sorted(f"{n}.lora_{m}" for n in layers for m in "AB")
    assert state["layers.0.self_attn.v_proj.lora_B"].shape == (16, 2)  # (K E, r)
    fresh = Llama(LLAMA_PRESETS["tiny"])  # the same base weights...
    fresh.load_state_dict(
        {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora" not in k}
    )
    apply_lora(fresh, "q_proj,v_proj", rank=2)
    result = fresh.load_state_dict(state, strict=False)  # ...and then the adapters alone
    assert not result.unexpected_keys
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_generation_with_adapters_equals_merged(family: str) -> None:
    """Adapted layers are not the stock nn.Linear that the flat decoding step reads, so an
    adapted model decodes through its modules; merged, it takes the flat step again."""
    model: Any = GPT(GPT_PRESETS["tiny"]) if family == "gpt" else Llama(LLAMA_PRESETS["tiny"])
    model.eval()
    prompt = torch.randint(0, 128, (2, 5))
    base_tokens = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    apply_lora(model, "q_proj,v_proj,down_proj", rank=4, alpha=8)
    _perturb(model, std=1.0)
    assert flat_step(model) is None  # the flat step would miss the adapters
    adapted = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    merge_lora(model)
    assert flat_step(model) is not None
    merged = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, base_tokens)  # the adapters do change the tokens
