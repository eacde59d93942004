"""The flat decoding step (``qkv.generate.flat``) against the module path it replaces, for GPT,
LLaMA (grouped-query attention, RoPE, RMSNorm, gated MLP) and Mistral (a sliding window)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import qkv.generate.cached as cached_module
from qkv.generate.cached import CachedDecoder
from qkv.generate.flat import FlatDecoderStep, flat_step
from qkv.models import llama
from qkv.models.gpt import GPT, PRESETS, GPTConfig
from tests.conftest import ATOL, HALF_FACTOR
from tests.generate.conftest import tiny

# "tiny": every product under the oneDNN threshold (F.linear); "wide": the attention's and the
# MLP's products over it (oneDNN where PyTorch has it), so both kernels are held to the module
# path. Mistral's window (4) is narrower than prompt + steps, so that the window mask matters.
LLAMA_TINY = llama.PRESETS["tiny"]
SIZES = {
    "gpt-tiny": PRESETS["tiny"],
    "gpt-wide": GPTConfig(vocab_size=300, d_model=512, n_layers=2, n_heads=8, max_seq_len=64),
    "llama-tiny": LLAMA_TINY,
    "llama-wide": replace(LLAMA_TINY, d_model=512, n_heads=8, n_kv_heads=2, d_ff=1024),
    "mistral-tiny": replace(LLAMA_TINY, sliding_window=4),
}


def _build(config: GPTConfig | llama.LlamaConfig) -> GPT | llama.Llama:
    return GPT(config) if isinstance(config, GPTConfig) else llama.Llama(config)


def _model(size: str) -> GPT | llama.Llama:
    model = _build(SIZES[size]).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that logits differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)  # matrices and embeddings
            else:
                p.add_(torch.randn_like(p), alpha=0.1)  # biases, and norm gains around 1
    return model


def _logits_per_step(
    model: GPT | llama.Llama,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    tokens: torch.Tensor,
    *,
    flat: bool,
    static_cache: bool,
) -> torch.Tensor:
    runner = CachedDecoder(
        model, prompt, mask, max_new_tokens=tokens.shape[1] + 1, static_cache=static_cache,
        flat=flat,
    )  # fmt: skip
    assert (runner.flat_step is not None) == flat
    with torch.inference_mode():
        steps = [runner.prefill()]
        steps += [runner.step(tokens[:, i]) for i in range(tokens.shape[1])]
    return torch.stack(steps, dim=1).clone()  # (B, 1 + steps, V)


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("static_cache", [False, True])
def test_flat_step_equals_the_module_step(size: str, padded: bool, static_cache: bool) -> None:
    model = _model(size)
    v = model.config.vocab_size
    prompt = torch.randint(0, v, (3, 7))
    mask = None
    if padded:  # left padding: rows of 7, 4 and 1 real tokens
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, :3] = 0
        mask[2, :6] = 0
    tokens = torch.randint(0, v, (3, 6))
    flat = _logits_per_step(model, prompt, mask, tokens, flat=True, static_cache=static_cache)
    plain = _logits_per_step(model, prompt, mask, tokens, flat=False, static_cache=static_cache)
    assert flat.abs().max() > 1.0  # logits of a visible size, so that the tolerance means something
    torch.testing.assert_close(flat, plain, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("size", ["gpt-tiny", "llama-tiny", "mistral-tiny"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_beams": 3, "length_penalty": 0.8},
        {"do_sample": True, "seed": 7, "top_p": 0.9, "temperature": 1.3},
        {"repetition_penalty": 1.4, "static_cache": True},
    ],
)
def test_generate_gives_the_same_tokens_with_and_without_the_flat_step(
    size: str, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(size)
    prompt = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kwargs = {"max_new_tokens": 12, "eos_token_id": [], **options}
    flat = model.generate(prompt, mask, **kwargs)
    monkeypatch.setattr(cached_module, "flat_step", lambda model: None)
    plain = model.generate(prompt, mask, **kwargs)
    assert torch.equal(flat, plain)


def test_flat_step_follows_parameter_changes_between_generations() -> None:
    model = _model("llama-tiny")
    prompt = torch.randint(0, 128, (1, 5))
    before = _logits_per_step(model, prompt, None, prompt, flat=True, static_cache=False)
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.weight.add_(1.0)  # an in-place update, as a step makes
    after = _logits_per_step(model, prompt, None, prompt, flat=True, static_cache=False)
    reference = _logits_per_step(model, prompt, None, prompt, flat=False, static_cache=False)
    assert not torch.allclose(before[:, 1:], after[:, 1:])
    torch.testing.assert_close(after, reference, atol=ATOL[torch.float32], rtol=0)


class _MyGPT(GPT):
    pass


def test_flat_step_is_taken_only_for_stock_models() -> None:
    for size in SIZES:
        assert isinstance(flat_step(_model(size)), FlatDecoderStep)
    assert flat_step(_MyGPT(PRESETS["tiny"]).eval()) is None  # may change forward
    assert flat_step(GPT(PRESETS["tiny"]).train()) is None
    reference = llama.Llama(replace(LLAMA_TINY, attn_impl="reference")).eval()
    assert flat_step(reference) is None  # the caller asked for another attention
    hooked = _model("gpt-tiny")
    hooked.layers[1].mlp.register_forward_hook(lambda module, args, out: None)
    assert flat_step(hooked) is None  # the hook must see its module run
    capturing = _model("llama-tiny")
    capturing.layers[0].self_attn.capture_weights = True
    assert flat_step(capturing) is None
    for family in ("prefix_lm", "t5", "bart"):
        assert flat_step(tiny(family)) is None


def assert_bf16_flat_step_as_accurate(size: str, device: torch.device) -> None:
    """In bfloat16 on ``device``, the flat step's error against float64 (the same rounded
    weights, on the CPU) is at most HALF_FACTOR times the module path's."""
    model = _model(size)
    v = model.config.vocab_size
    prompt, tokens = torch.randint(0, v, (2, 5)), torch.randint(0, v, (2, 4))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    model = model.bfloat16()
    exact = _logits_per_step(
        _from(model, torch.float64), prompt, mask, tokens, flat=False, static_cache=False
    )  # the same bfloat16-rounded weights, computed in float64 on the CPU
    model = model.to(device)
    prompt, mask, tokens = prompt.to(device), mask.to(device), tokens.to(device)
    flat = _logits_per_step(model, prompt, mask, tokens, flat=True, static_cache=False)
    plain = _logits_per_step(model, prompt, mask, tokens, flat=False, static_cache=False)
    assert flat.dtype == torch.bfloat16 and flat.device.type == device.type
    flat_err = (flat.double().cpu() - exact).abs().max().item()
    plain_err = (plain.double().cpu() - exact).abs().max().item()
    assert flat_err <= HALF_FACTOR * plain_err, (flat_err, plain_err)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_flat_step_in_bfloat16_is_as_accurate_as_the_module_step(size: str) -> None:
    assert_bf16_flat_step_as_accurate(size, torch.device("cpu"))


def _from(model: GPT | llama.Llama, dtype: torch.dtype) -> GPT | llama.Llama:
    copy = _build(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy.to(dtype)
