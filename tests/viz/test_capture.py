"""Capturing attention: exact weights from every family while the fast path runs, proven by
weights @ V == the fast output, equal to the reference path's weights, padding removed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qkv.models import bart, bert, gpt, llama, prefix_lm, t5, transformer, vit
from qkv.viz.capture import (
    AttentionCheckError,
    attention_sites,
    capture_attention,
    check_weights,
    find_token,
    record_attention,
)
from tests.conftest import ATOL

TOL = ATOL[torch.float32]

DECODERS = {
    "gpt": (gpt, gpt.GPT),
    "llama": (llama, llama.Llama),
    "prefix_lm": (prefix_lm, prefix_lm.PrefixLM),
}
ENCODERS = {"bert": (bert, bert.Bert)}
SEQ2SEQ = {
    "t5": (t5, t5.T5),
    "bart": (bart, bart.Bart),
    "transformer": (transformer, transformer.Transformer),
}
FAMILIES = {**DECODERS, **ENCODERS, **SEQ2SEQ, "vit": (vit, vit.ViT)}


def build(family: str, attn_impl: str = "auto") -> torch.nn.Module:
    module, cls = FAMILIES[family]
    config = dataclasses.replace(module.PRESETS["tiny"], attn_impl=attn_impl)
    return cls(config).eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    """A batch of two; row 1 is padded (on the left for decoders, on the right otherwise)."""
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8)}
    ids = torch.randint(3, 60, (2, 6))  # (B, T), within every tiny vocabulary
    mask = torch.ones(2, 6, dtype=torch.long)
    if family in DECODERS:
        mask[1, :2] = 0  # left padding
    else:
        mask[1, 4:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    if family in SEQ2SEQ:
        dec = torch.randint(3, 60, (2, 5))
        dec_mask = torch.ones(2, 5, dtype=torch.long)
        dec_mask[1, 3:] = 0
        batch |= {"decoder_input_ids": dec.masked_fill(dec_mask == 0, 0),
                  "decoder_attention_mask": dec_mask}  # fmt: skip
    return batch


def reference_weights(model: torch.nn.Module, family: str, batch: dict) -> dict[str, torch.Tensor]:
    """The same weights through the reference path's output_attentions: kind -> (B, L, H, T, S)."""
    ref = build(family, attn_impl="reference")
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = ref(**batch, output_attentions=True)
    if family in SEQ2SEQ:
        kinds = {"encoder": out.encoder_attentions, "decoder": out.attentions,
                 "cross": out.cross_attentions}  # fmt: skip
    else:
        kinds = {"self": out.attentions}
    return {k: torch.stack(v, dim=1) for k, v in kinds.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_equal_the_reference_path_and_the_fast_output_is_unchanged(family: str) -> None:
    model = build(family)
    batch = inputs(family)
    with torch.no_grad():
        plain = model(**batch)
    recording = record_attention(model, **batch)
    expected = reference_weights(model, family, batch)
    assert set(recording.weights) == set(expected)
    for kind, w in recording.weights.items():
        assert w.shape == expected[kind].shape  # (B, L, H, T, S)
        torch.testing.assert_close(w, expected[kind], atol=TOL, rtol=0)
    # Capturing leaves the fast path's result bit for bit as it was.
    field = "logits" if plain.logits is not None else "last_hidden_state"
    assert torch.equal(getattr(recording.output, field), getattr(plain, field))
    assert recording.max_error is not None and recording.max_error < 1e-5
    # ...and leaves the modules as it found them.
    for mods in attention_sites(model).values():
        assert all(not m.capture_weights and m.last_capture is None for m in mods)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_example_is_trimmed_to_its_real_tokens(family: str) -> None:
    model = build(family)
    batch = inputs(family)
    captured = capture_attention(model, **batch, example=1)
    alone = {k: v[1:] for k, v in batch.items()}
    for key in ("attention_mask", "decoder_attention_mask"):  # drop row 1's padding
        if key in alone:
            real = alone.pop(key)[0].bool()
            ids = "input_ids" if key == "attention_mask" else "decoder_input_ids"
            alone[ids] = alone[ids][:, real]
    by_itself = capture_attention(model, **alone)
    for kind, maps in captured.maps.items():
        n_layers, n_heads, t, s = maps.weights.shape
        assert (len(maps.query_tokens), len(maps.key_tokens)) == (t, s)
        assert len(maps.layers) == n_layers and len(maps.heads) == n_heads
        torch.testing.assert_close(maps.weights.sum(-1), torch.ones(n_layers, n_heads, t))
        # Padding changes nothing for the real tokens: the same weights as without it.
        torch.testing.assert_close(maps.weights, by_itself[kind].weights, atol=TOL, rtol=0)


def test_padded_keys_get_zero_weight_in_a_batch() -> None:
    batch = inputs("bert")
    recording = record_attention(build("bert"), **batch)
    w = recording.weights["self"]  # (B, L, H, T, S)
    assert torch.equal(w[1, ..., 4:], torch.zeros_like(w[1, ..., 4:]))
    assert (w[1, ..., :4] > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_gpt_left_padding_rows_and_the_causal_mask() -> None:
    recording = record_attention(build("gpt"), **inputs("gpt"))
    w = recording.weights["self"][1]  # (L, H, T, S), row 1 has 2 padding tokens on the left
    assert torch.equal(w[..., :2], torch.zeros_like(w[..., :2]))  # no one looks at padding
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # nor at the future
    torch.testing.assert_close(w[..., 2:, :].sum(-1), torch.ones(*w.shape[:2], 4))


def test_layers_and_heads_select_a_subset() -> None:
    model = build("llama")  # grouped-query attention: 4 query heads share 2 key/value heads
    ids = torch.randint(0, 128, (1, 7))
    full = capture_attention(model, input_ids=ids)["self"]
    part = capture_attention(model, input_ids=ids, layers=[-1], heads=[3, 1])["self"]
    assert part.layers == (1,) and part.heads == (1, 3)
    assert part.weights.shape == (1, 2, 7, 7)
    torch.testing.assert_close(part.weights[0], full.weights[1, [1, 3]], atol=TOL, rtol=0)
    torch.testing.assert_close(part.head(1, 3), full.head(1, 3), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="has 2 layers"):
        capture_attention(model, input_ids=ids, layers=[2])
    with pytest.raises(ValueError, match="has 4 heads"):
        capture_attention(model, input_ids=ids, heads=[4])
    with pytest.raises(ValueError, match="was not captured"):
        part.head(0, 1)


def test_the_check_catches_wrong_weights() -> None:
    v = torch.randn(2, 2, 5, 8)  # (B, K, S, E)
    w = torch.softmax(torch.randn(2, 4, 3, 5), dim=-1)  # (B, H, T, S): 2 query heads per kv head
    out = w @ v.repeat_interleave(2, dim=1)  # (B, H, T, E)
    assert check_weights(w, v, out) < 1e-5
    with pytest.raises(AttentionCheckError, match="not the ones that ran"):
        check_weights(w.flip(1), v, out)  # heads out of place
    uniform = torch.full_like(w, 1 / 5)
    with pytest.raises(AttentionCheckError):
        check_weights(uniform, v, out)  # rows still sum to 1, but they are not what ran


def test_a_capture_that_forgets_the_mask_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("gpt")
    module = attention_sites(model)["self"][0]
    exact = module._exact_weights
    # A broken capture: recompute the weights without the (causal) mask.
    monkeypatch.setattr(
        module,
        "_exact_weights",
        lambda q, k, v, mask, bias, is_causal: exact(q, k, v, None, bias, False),
    )
    with pytest.raises(AttentionCheckError):
        record_attention(model, torch.randint(0, 128, (1, 6)))
    assert not module.capture_weights and module.last_weights is None  # cleaned up anyway
    record_attention(model, torch.randint(0, 128, (1, 6)), check=False)  # without the check


def test_capture_runs_in_eval_mode_and_restores_training() -> None:
    model = build("bert")
    model.train()
    captured = capture_attention(model, input_ids=torch.randint(3, 100, (1, 5)))
    assert model.training
    assert captured.max_error is not None and captured.max_error < 1e-5


def test_sites_and_views_of_an_encoder_decoder() -> None:
    model = build("t5")
    sizes = {kind: len(modules) for kind, modules in attention_sites(model).items()}
    assert sizes == {"encoder": 2, "decoder": 2, "cross": 2}
    batch = inputs("t5")
    captured = capture_attention(model, **batch, tokens=[f"s{i}" for i in range(6)],
                                 decoder_tokens=[f"t{i}" for i in range(5)])  # fmt: skip
    cross = captured["cross"]
    assert cross.kind == "cross" and cross.name == "cross-attention"
    assert cross.query_tokens == [f"t{i}" for i in range(5)]
    assert cross.key_tokens == [f"s{i}" for i in range(6)]
    views = captured.to_views()
    assert [v.name for v in views] == ["encoder", "decoder", "cross-attention"]
    assert [v.kind for v in views] == ["self", "self", "cross"]
    with pytest.raises(KeyError, match="no 'self' attention"):
        captured["self"]


def test_vit_patches_view() -> None:
    captured = capture_attention(build("vit"), pixel_values=torch.randn(1, 1, 8, 8))
    maps = captured["self"]
    assert maps.kind == "image" and maps.grid == (2, 2)
    assert maps.key_tokens == ["[CLS]", "0,0", "0,1", "1,0", "1,1"]
    assert maps.image is not None and maps.image.shape == (8, 8)
    assert maps.image.min() >= 0.0 and maps.image.max() <= 1.0
    view = maps.to_view()
    assert view.kind == "image" and view.grid == (2, 2)


def test_tokens_are_found_by_what_the_user_typed() -> None:
    tokens = ["[CLS]", "Ġthe", "▁Animal", "##s", "it"]
    assert find_token(tokens, "animal") == 2
    assert find_token(tokens, "s") == 3
    assert find_token(tokens, "the") == 1
    with pytest.raises(ValueError, match=r"not among the tokens \['\[CLS\]', 'Ġthe'"):
        find_token(tokens, "street")


def test_bad_inputs_are_refused() -> None:
    model = build("gpt")
    with pytest.raises(ValueError, match="pass input_ids"):
        capture_attention(model)
    with pytest.raises(ValueError, match="example=3"):
        capture_attention(model, input_ids=torch.zeros(2, 3, dtype=torch.long), example=3)
    with pytest.raises(ValueError, match="token strings"):
        capture_attention(model, input_ids=torch.zeros(1, 3, dtype=torch.long), tokens=["a"])
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        record_attention(torch.nn.Linear(2, 2), torch.zeros(1, 2))
