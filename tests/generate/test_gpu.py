"""Generation on a GPU: the flat decoding step against the module path there, in float32 and
bfloat16, and ``generate`` on CUDA against the same weights' ``generate`` on the CPU.

The checks of ``test_flat.py``, run on the ``gpu_device`` (``QKV_TEST_DEVICE=cpu`` runs them on
the CPU, to check them on a machine without a GPU). Shape legend: B batch · T prompt positions ·
V vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import GPU_ATOL
from tests.generate.test_flat import (
    SIZES,
    _logits_per_step,
    _model,
    assert_bf16_flat_step_as_accurate,
)

pytestmark = pytest.mark.gpu


def _prompt(v: int, padded: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three prompts of 7 positions (B, T); padded: rows of 7, 4 and 1 real tokens."""
    prompt = torch.randint(0, v, (3, 7), device=device)
    if not padded:
        return prompt, None
    mask = torch.ones(3, 7, dtype=torch.long, device=device)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return prompt, mask


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("static_cache", [False, True])
def test_flat_step_equals_the_module_step_in_float32(
    size: str, padded: bool, static_cache: bool, gpu_device: torch.device
) -> None:
    model = _model(size).to(gpu_device)
    v = model.config.vocab_size
    prompt, mask = _prompt(v, padded, gpu_device)
    tokens = torch.randint(0, v, (3, 6), device=gpu_device)
    flat = _logits_per_step(model, prompt, mask, tokens, flat=True, static_cache=static_cache)
    plain = _logits_per_step(model, prompt, mask, tokens, flat=False, static_cache=static_cache)
    assert flat.device.type == gpu_device.type
    assert flat.abs().max() > 1.0  # logits of a visible size, so that the tolerance means something
    torch.testing.assert_close(flat, plain, atol=GPU_ATOL[torch.float32], rtol=0)
    assert torch.equal(flat.argmax(-1), plain.argmax(-1))  # the same greedy tokens


@pytest.mark.parametrize("size", sorted(SIZES))
def test_flat_step_in_bfloat16_is_as_accurate_as_the_module_step(
    size: str, gpu_device: torch.device
) -> None:
    assert_bf16_flat_step_as_accurate(size, gpu_device)


@pytest.mark.parametrize("size", ["gpt-tiny", "llama-tiny", "mistral-tiny"])
@pytest.mark.parametrize("static_cache", [False, True])
def test_generate_on_the_device_equals_generate_on_the_cpu(
    size: str, static_cache: bool, gpu_device: torch.device
) -> None:
    on_cpu = _model(size)
    on_device = copy.deepcopy(on_cpu).to(gpu_device)
    prompt = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kwargs = {"max_new_tokens": 12, "eos_token_id": [], "static_cache": static_cache}
    expected = on_cpu.generate(prompt, mask, **kwargs)
    # generate moves the prompt to the model's device; the tokens come back on it.
    tokens = on_device.generate(prompt, mask, **kwargs)
    assert tokens.device.type == gpu_device.type
    assert torch.equal(tokens.cpu(), expected)
