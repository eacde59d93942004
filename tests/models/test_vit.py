"""ViT: parity with Hugging Face in both directions, presets, smoke, training, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import qkv.interop
from qkv.interop import CheckpointError
from qkv.models.vit import PRESETS, ViT, ViTConfig
from tests.optional import require

ATOL = 1e-4  # float32 through two layers of different (fused vs eager) kernels

EXPECTED_PARAMS = {
    # transformers' ViTForImageClassification(num_labels=1000) on the meta device reports these.
    "vit-base-patch16-224": 86_567_656,  # paper: 86M
    "vit-large-patch16-224": 304_326_632,  # paper: 307M (see the preset's comment)
}


def hf():
    """transformers, or a skip where it is not installed."""
    return require("transformers")


def hf_config(**overrides):
    transformers = hf()
    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=8, patch_size=2, num_channels=3, num_labels=5, layer_norm_eps=1e-12,
        attn_implementation="eager",
    )  # fmt: skip
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)


@torch.no_grad()
def randomize_(model: nn.Module) -> None:
    """Random values everywhere: LayerNorm gains around 1, every bias and shift non-zero."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.2)


@pytest.mark.hf
def test_hf_classifier_to_qkv_matches_logits_states_attentions_loss(tmp_path: Path) -> None:
    theirs = hf().ViTForImageClassification(hf_config()).eval()
    randomize_(theirs)
    theirs.save_pretrained(tmp_path)
    ours = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(ours, ViT) and ours.config.num_labels == 5 and not ours.config.pooler

    pixels, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 4, -100])
    with torch.no_grad():
        ref = theirs(pixels, labels=labels, output_hidden_states=True, output_attentions=True)
        out = ours(pixels, labels=labels, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for mine, theirs_h in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs_h, atol=ATOL, rtol=0)
    assert len(out.attentions) == len(ref.attentions) == 2
    for mine, theirs_a in zip(out.attentions, ref.attentions, strict=True):
        assert mine.shape == (3, 4, 17, 17)  # every patch and the class token attend
        torch.testing.assert_close(mine, theirs_a, atol=ATOL, rtol=0)
    assert not any(a.capture_weights for a in (layer.self_attn for layer in ours.layers))


@pytest.mark.hf
def test_hf_backbone_with_pooler_to_qkv(tmp_path: Path) -> None:
    theirs = hf().ViTModel(hf_config(num_channels=1, patch_size=4)).eval()
    randomize_(theirs)
    theirs.save_pretrained(tmp_path)
    ours = qkv.interop.from_pretrained(tmp_path)
    assert ours.config.num_labels == 0 and ours.config.pooler
    pixels = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref, out = theirs(pixels), ours(pixels)
    assert out.logits is None
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.hf
def test_hf_backbone_without_pooler_is_refused_clearly(tmp_path: Path) -> None:
    hf().ViTModel(hf_config(), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="add_pooling_layer=False"):
        qkv.interop.from_pretrained(tmp_path)


def random_vit(**overrides) -> ViT:
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=3, d_model=32, n_layers=2, n_heads=4,
        d_ff=48, **{"num_labels": 6, **overrides},
    )  # fmt: skip
    model = ViT(config).eval()
    randomize_(model)
    return model


@pytest.mark.hf
@pytest.mark.parametrize("head", ["classifier", "pooler", "bare"])
def test_qkv_to_hf(tmp_path: Path, head: str) -> None:
    transformers = hf()
    overrides = {"classifier": {}, "pooler": {"num_labels": 0, "pooler": True}}
    ours = random_vit(**overrides.get(head, {"num_labels": 0}))
    ours.save_pretrained(tmp_path)
    hf_class = transformers.ViTModel if head == "pooler" else transformers.ViTForImageClassification
    theirs, info = hf_class.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref, out = theirs.eval()(pixels), ours(pixels)
    if head == "classifier":
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    elif head == "pooler":
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    else:  # num_labels=0: transformers' head is the identity on the class token
        torch.testing.assert_close(out.last_hidden_state[:, 0], ref.logits, atol=ATOL, rtol=0)
    again = qkv.interop.from_pretrained(tmp_path)  # and back into qkv, exactly
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = ViT(PRESETS[name])
    assert model.num_parameters() == EXPECTED_PARAMS[name]


def test_every_preset_builds_on_meta() -> None:
    for config in PRESETS.values():
        with torch.device("meta"):
            model = ViT(config)
        assert model.num_parameters() > 0


@pytest.mark.parametrize("name", ["tiny", "vit-digits"])
def test_forward_backward_smoke(name: str) -> None:
    model = ViT(PRESETS[name]).train()
    c = model.config
    pixels = torch.randn(4, c.num_channels, c.image_size, c.image_size)
    out = model(pixels, labels=torch.randint(0, c.num_labels, (4,)), output_hidden_states=True)
    assert out.logits.shape == (4, c.num_labels)
    assert len(out.hidden_states) == c.n_layers + 1
    assert out.hidden_states[0].shape == (4, 1 + c.num_patches, c.d_model)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_32x32_rgb_images_in_4x4_patches() -> None:
    config = ViTConfig(
        image_size=32, patch_size=4, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_labels=10
    )
    out = ViT(config)(torch.randn(2, 3, 32, 32), output_attentions=True)
    assert config.num_patches == 64
    assert out.logits.shape == (2, 10) and out.attentions[0].shape == (2, 4, 65, 65)


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = ViT(PRESETS["tiny"]).train()
    pixels, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_patch_order_is_row_major() -> None:
    """Patch n covers rows (n // 2) and columns (n % 2) of a 2 x 2 grid of 4 x 4 patches."""
    model = ViT(PRESETS["tiny"])
    pixels = torch.zeros(1, 1, 8, 8)
    pixels[0, 0, 4:, :4] = 1.0  # bottom-left patch: n = 2
    with torch.no_grad():
        z0 = model.embed(pixels) - model.embed(torch.zeros(1, 1, 8, 8))  # (1, 5, D)
    changed = z0.abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False, False, True, False]  # [cls, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 10, "patch_size": 4}, "not divisible by patch_size"),
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"num_labels": -1}, "num_labels"),
        ({"pooler": True}, "pooler=True is for a backbone"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "tanh"}, "unknown activation"),
        ({"patch_size": 0}, "patch_size must be positive"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**overrides)


def test_wrong_pixel_shapes_are_named() -> None:
    model = ViT(PRESETS["tiny"])
    for bad in (torch.randn(2, 3, 8, 8), torch.randn(2, 1, 16, 16), torch.randn(1, 8, 8)):
        with pytest.raises(ValueError, match=r"pixel_values must be \(B, C, I, I\)"):
            model(bad)
    with pytest.raises(ValueError, match="num_labels > 0"):
        ViT(dataclasses.replace(PRESETS["tiny"], num_labels=0))(
            torch.randn(1, 1, 8, 8), labels=torch.tensor([0])
        )
