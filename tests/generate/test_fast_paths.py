"""Generation's one fast path (the flat step, ``qkv.generate.flat``) against the module path, and
what a generation leaves behind: nothing on the modules, and its stacked q/k/v weights freed when
it ends. (The flat step in every dtype and size is tested in tests/generate/test_flat.py.)"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import qkv.generate.flat as flat_module
from qkv.generate.cached import CachedDecoder
from qkv.models.gpt import GPT, PRESETS
from tests.conftest import ATOL
from tests.generate.conftest import DECODER_ONLY, ENCODER_DECODER, tiny, vocab


def test_gpt_default_positions_equal_the_explicit_ones() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        explicit = model(ids, position_ids=torch.arange(7)).logits
        masked = model(ids, torch.ones(2, 7, dtype=torch.long)).logits  # built from a mask
        default = model(ids).logits  # past .. past + T - 1
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:5], cache=cache).logits  # past = 4: position 4
    torch.testing.assert_close(default, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(masked, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(step[:, 0], explicit[:, 4], atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoding_with_the_fast_path_equals_plain_decoding(family: str) -> None:
    model = tiny(family)
    prompt = torch.randint(3, vocab(model), (2, 5))
    tokens = torch.randint(3, vocab(model), (2, 4))

    def logits_per_step(flat: bool) -> torch.Tensor:
        with torch.inference_mode():
            runner = CachedDecoder(model, prompt, None, max_new_tokens=5, flat=flat)
            steps = [runner.prefill()] + [runner.step(tokens[:, i]) for i in range(4)]
        return torch.stack(steps, dim=1).clone()  # (B, 5, V)

    torch.testing.assert_close(
        logits_per_step(True), logits_per_step(False), atol=ATOL[torch.float32], rtol=0
    )


def _module_state(model: torch.nn.Module) -> dict[str, dict[str, object]]:
    """Each module's own attributes (not parameters, buffers or submodules), by path."""
    return {path: dict(vars(m)) for path, m in model.named_modules()}


@pytest.mark.parametrize("family", DECODER_ONLY + ENCODER_DECODER)
def test_generation_leaves_nothing_on_the_modules(family: str) -> None:
    model = tiny(family)
    before = _module_state(model)
    with torch.no_grad():
        before_params = {name: p.clone() for name, p in model.state_dict().items()}
    model.generate(torch.randint(3, vocab(model), (2, 5)), max_new_tokens=4, eos_token_id=[])
    after = _module_state(model)
    assert after.keys() == before.keys()
    for path, attrs in after.items():
        assert attrs.keys() == before[path].keys(), path
        for name, value in attrs.items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            assert value is before[path][name] or value == before[path][name], (path, name)
    state = model.state_dict()
    assert state.keys() == before_params.keys()
    assert all(torch.equal(state[name], p) for name, p in before_params.items())


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_stacked_weights_live_only_as_long_as_the_generation(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(family)
    built: list[weakref.ref[torch.Tensor]] = []
    stack = flat_module.stacked_qkv

    def recording_stack(attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = stack(attn)  # type: ignore[arg-type]
        built.append(weakref.ref(weight))
        return weight, bias

    monkeypatch.setattr(flat_module, "stacked_qkv", recording_stack)
    model.generate(torch.randint(3, vocab(model), (1, 4)), max_new_tokens=3, eos_token_id=[])
    gc.collect()
    assert len(built) == len(model.layers)  # one per layer, built by this generation
    assert all(ref() is None for ref in built)  # and freed when it returned
