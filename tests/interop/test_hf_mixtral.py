"""qkv's Mixtral against transformers' MixtralForCausalLM, weights moved by ``hf_mixtral``.

Tiny random models (two layers, width 32, four experts) with weights large enough that the
routers' choices and the attention are far from uniform; logits, loss (with the load-balancing
loss) and greedy generation are compared in both directions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qkv.generate import generate
from qkv.interop import from_pretrained
from qkv.interop.files import CheckpointError
from qkv.interop.hf_mixtral import (
    mixtral_config_from_hf,
    mixtral_config_to_hf,
    mixtral_weights_from_hf,
)
from qkv.models.mixtral import PRESETS, Mixtral
from tests.optional import require

transformers = require("transformers")

pytestmark = pytest.mark.hf

TOL = 1e-4  # float32, two implementations with differently ordered sums


def _scramble(model: nn.Module, std: float = 0.15) -> nn.Module:
    """Weights large enough that routing and attention are far from uniform; gains away from 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


def _hf_model(**extra: Any) -> Any:
    sizes = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        router_aux_loss_coef=0.3, attn_implementation="eager",
    )  # fmt: skip
    sizes.update(extra)
    return _scramble(transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes))).eval()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e}"


def _batch(vocab: int, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences: full, right-padded, left-padded."""
    ids = torch.randint(0, vocab, (3, t))  # (B, T)
    mask = torch.ones(3, t, dtype=torch.long)  # (B, T)
    mask[1, -3:] = 0
    mask[2, :4] = 0
    return ids, mask


ROUTING_MARGIN = 1e-3  # far above the 1e-6 by which the two sides' router logits differ


def _decisive_batch(hf: Any, tries: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_batch`` and its position ids, drawn again while some real token's k-th and (k+1)-th
    router logits are within ROUTING_MARGIN in any layer: at a near-tie the two implementations'
    rounding may pick different experts, and a different expert is a different function, not a
    rounding difference."""
    k = hf.config.num_experts_per_tok
    for _ in range(tries):
        ids, mask = _batch(hf.config.vocab_size)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what qkv derives from the mask
        with torch.no_grad():
            out = hf(ids, attention_mask=mask, position_ids=position_ids, output_router_logits=True)
        real = mask.bool().flatten()  # (B T,)
        gaps = [
            (top[:, k - 1] - top[:, k]).min()
            for top in (r[real].sort(-1, descending=True).values for r in out.router_logits)
        ]
        if min(gaps) > ROUTING_MARGIN:
            return ids, mask, position_ids
    raise AssertionError(f"no batch in {tries} draws routes every token by {ROUTING_MARGIN}")


@pytest.mark.parametrize(
    "extra",
    [{}, {"num_experts_per_tok": 1}, {"sliding_window": 3}],
    ids=["top2", "top1", "window"],
)
def test_hf_to_qkv(extra: dict[str, Any], tmp_path: Path) -> None:
    hf = _hf_model(**extra)
    hf.save_pretrained(tmp_path)  # the file layout: one tensor per expert matrix
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, Mixtral)
    c = ours.config
    assert (c.n_experts, c.top_k, c.rope_base) == (4, extra.get("num_experts_per_tok", 2), 500.0)
    assert c.sliding_window == extra.get("sliding_window") and c.router_aux_loss_coef == 0.3

    ids, mask, position_ids = _decisive_batch(hf)
    # Score only tokens predicted from a real position (a padding position's output is
    # undefined); the router losses leave padding out on both sides.
    predictor_is_real = torch.cat([torch.ones(3, 1, dtype=torch.long), mask[:, :-1]], dim=1)
    labels = ids.masked_fill((mask * predictor_is_real) == 0, -100)  # (B, T)
    with torch.no_grad():
        theirs = hf(
            ids, attention_mask=mask, position_ids=position_ids, labels=labels,
            output_router_logits=True, output_hidden_states=True,
        )  # fmt: skip
        mine = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    real = mask.bool()  # (B, T)
    _close(mine.logits[real], theirs.logits[real], "logits")
    for i, (a, b) in enumerate(zip(mine.hidden_states, theirs.hidden_states, strict=True)):
        _close(a[real], b[real], f"hidden state {i}")
    for i, (a, b) in enumerate(zip(mine.router_logits, theirs.router_logits, strict=True)):
        _close(a[real.flatten()], b[real.flatten()], f"router logits of layer {i}")
    _close(mine.aux_loss, theirs.aux_loss, "load-balancing loss")
    _close(mine.loss, theirs.loss, "loss, cross-entropy + 0.3 x load balancing")
    assert mine.aux_loss > 0.5  # a real contribution to the loss


def test_transformers_in_memory_layout_loads_too() -> None:
    """transformers 5's state_dict stacks the experts: (X, 2F, D) and (X, D, F)."""
    hf = _hf_model()
    state = hf.state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    config = mixtral_config_from_hf(hf.config.to_dict())
    ours = Mixtral(config).eval()
    ours.load_state_dict(mixtral_weights_from_hf(dict(state), config), strict=True)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        _close(ours(ids).logits, hf(ids).logits, "logits")


@pytest.mark.parametrize("tied", [False, True])
def test_qkv_to_hf(tied: bool, tmp_path: Path) -> None:
    config = dataclasses.replace(PRESETS["tiny"], tie_embeddings=tied, router_aux_loss_coef=0.1)
    ours = Mixtral(config)
    _scramble(ours).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, config.vocab_size, (2, 8))  # (B, T)
    with torch.no_grad():
        mine = ours(ids, labels=ids)
        hf = theirs(ids, labels=ids, output_router_logits=True)
    _close(mine.logits, hf.logits, "logits")
    _close(mine.loss, hf.loss, "loss")
    again = from_pretrained(tmp_path)  # and back: the same config, the same logits
    assert again.config == config
    assert (again.lm_head.weight is again.tok_emb.weight) == tied
    with torch.no_grad():
        _close(again(ids).logits, mine.logits, "logits after a round trip")


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    """The same token ids, left-padded prompts, from transformers' generate and qkv's."""
    torch.manual_seed(0)  # a fixed case: no near-tie between two logits can make it flaky
    hf = _hf_model(vocab_size=24, bos_token_id=0, eos_token_id=1)
    hf.generation_config = transformers.GenerationConfig()  # no defaults from the model config
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    lengths = (4, 7, 5)
    ids = torch.randint(4, 23, (3, 7))  # (B, T)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, -n:] = 1
    ids = ids.masked_fill(mask == 0, 23)
    config = transformers.GenerationConfig(do_sample=False, pad_token_id=23, max_new_tokens=10)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, generation_config=config)
    got = generate(ours, ids, mask, pad_token_id=23, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(got, expected), f"transformers:\n{expected}\nqkv:\n{got}"


def test_config_round_trip_keeps_qkvs_own_keys(caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(PRESETS["tiny"], capacity_factor=1.25, router_z_loss_coef=1e-3)
    with caplog.at_level("WARNING", logger="qkv.interop.hf_mixtral"):
        hf = mixtral_config_to_hf(config)
    assert "ignores it" in caplog.text
    assert mixtral_config_from_hf(hf) == config
    back = transformers.MixtralConfig(**hf)  # transformers accepts the dict
    assert back.num_local_experts == 4 and back.num_experts_per_tok == 2
    assert mixtral_config_from_hf(back.to_dict()) == config


def test_transformers_defaults_and_unsupported_options() -> None:
    base = {"model_type": "mixtral", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 24}  # fmt: skip
    config = mixtral_config_from_hf(base)  # absent keys: transformers' MixtralConfig defaults
    assert (config.rope_base, config.norm_eps, config.n_experts, config.top_k) == (1e6, 1e-5, 8, 2)
    with pytest.raises(CheckpointError, match="router_jitter_noise"):
        mixtral_config_from_hf({**base, "router_jitter_noise": 0.01})
    with pytest.raises(CheckpointError, match="hidden_act"):
        mixtral_config_from_hf({**base, "hidden_act": "gelu"})
