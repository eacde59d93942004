"""A model config's ``experts``: a mixture of experts in place of every feed-forward network, in
each family built from ``LayerSpec``, through forward, caches, saving, generation and training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import qkv
from qkv.blocks.moe import Experts, MixtureOfExperts
from qkv.generate import generate
from qkv.models import bart, bert, gpt, llama, prefix_lm, t5, transformer, vit
from qkv.models.mixtral import PRESETS as MIXTRAL
from tests.models.decoding import assert_close, new_cache, run_decoder, run_encoder_decoder

EXPERTS = {"n_experts": 4, "top_k": 2}
DECODERS = {"gpt": gpt, "llama": llama, "prefix_lm": prefix_lm}
ENCODERS = {"bert": bert, "vit": vit}
SEQ2SEQ = {"transformer": transformer, "t5": t5, "bart": bart}
FAMILIES = {**DECODERS, **ENCODERS, **SEQ2SEQ}


def _model(module: Any, **experts: Any) -> Any:
    torch.manual_seed(0)
    config = dataclasses.replace(module.PRESETS["tiny"], experts={**EXPERTS, **experts})
    model_class = next(
        c for c in vars(module).values()
        if isinstance(c, type) and getattr(c, "config_class", None) is type(config)
    )  # fmt: skip
    return model_class(config).eval()


def _vocab(model: Any) -> int:
    c = model.config
    return c.tgt_vocab_size if hasattr(c, "tgt_vocab_size") else c.vocab_size  # Transformer's


def _inputs(name: str, model: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c = model.config
    if name == "vit":
        return {"pixel_values": torch.randn(2, c.num_channels, c.image_size, c.image_size)}
    ids = torch.randint(3, _vocab(model), (2, 7), generator=g)
    if name in SEQ2SEQ:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_feed_forward_becomes_a_mixture_and_its_losses_train(name: str) -> None:
    model = _model(FAMILIES[name], aux_loss_coef=0.5)
    mixtures = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    feed_forwards = [n for n, m in model.named_modules() if n.endswith(".mlp")]
    assert len(mixtures) == len(feed_forwards) > 0  # every layer's, encoder and decoder
    assert isinstance(model.config.experts, Experts)  # the dict became the spec
    assert model.training_regularizer() is None  # nothing routed yet
    model.train()
    out = model(**_inputs(name, model))
    regularizer = model.training_regularizer()
    assert regularizer is not None and torch.isfinite(regularizer)
    want = torch.stack(
        [0.5 * m.last_output.aux_loss + 0.001 * m.last_output.z_loss for m in mixtures
         if m.last_output is not None]
    ).mean()  # fmt: skip
    torch.testing.assert_close(regularizer, want, atol=1e-6, rtol=0.0)
    first = out.logits if out.logits is not None else out.last_hidden_state
    (first.float().square().mean() + regularizer).backward()
    assert all(m.router.weight.grad is not None for m in mixtures)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_saved_and_loaded_in_qkvs_layout(name: str, tmp_path: Path) -> None:
    """A family with a transformers counterpart still saves qkv's layout when it has experts
    (transformers' class has none); the loaded model computes the same outputs."""
    model = _model(FAMILIES[name], top_k=1, capacity_factor=1.5)
    qkv.save_pretrained(model, tmp_path / name)
    config = (tmp_path / name / "config.json").read_text(encoding="utf-8")
    assert '"n_experts": 4' in config and '"capacity_factor": 1.5' in config
    loaded = qkv.from_pretrained(tmp_path / name).eval()
    assert loaded.config == model.config
    inputs = _inputs(name, model)
    with torch.no_grad():
        want, got = model(**inputs), loaded(**inputs)
    field = "logits" if want.logits is not None else "last_hidden_state"
    torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_cached_decoding_of_a_decoder_with_experts(name: str, kind: str) -> None:
    model = _model(DECODERS[name])
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        whole = model(ids).logits  # (B, T, V)
        pieces = run_decoder(model, ids, [4, 1, 1, 3], cache=new_cache(model, kind, 2, 16))
    assert_close(pieces, whole)


@pytest.mark.parametrize("name", list(SEQ2SEQ))
def test_cached_decoding_of_an_encoder_decoder_with_experts(name: str) -> None:
    model = _model(SEQ2SEQ[name])
    src = torch.randint(3, _vocab(model), (2, 6))
    tgt = torch.randint(3, _vocab(model), (2, 5))
    with torch.no_grad():
        whole = model(input_ids=src, decoder_input_ids=tgt).logits
    pieces = run_encoder_decoder(model, src, None, tgt, [2, 1, 2],
                                 caches=new_cache(model, "dynamic", 2, 16))  # fmt: skip
    assert_close(pieces, whole)


def test_generate_with_experts_follows_the_full_forward() -> None:
    """Greedy generation (whatever path it takes) picks each full forward's argmax."""
    model = _model(gpt)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5))
    out = generate(model, prompt, max_new_tokens=6, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ({"n_experts": 2, "top_k": 3}, "experts: top_k=3 must be between 1 and n_experts=2"),
        ({"n_experts": 4, "capacity_factor": -1.0}, "experts: capacity_factor must be > 0"),
        ({"n_expert": 4}, r"experts: unknown experts field\(s\) \['n_expert'\]"),
        ([4, 2], "experts: experts must be a mapping"),
    ],
)
def test_bad_experts_are_clear_errors(experts: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(gpt.PRESETS["tiny"], experts=experts)


def test_mixtral_takes_its_experts_from_its_own_fields() -> None:
    with pytest.raises(ValueError, match="leave experts unset"):
        dataclasses.replace(MIXTRAL["tiny"], experts=EXPERTS)
