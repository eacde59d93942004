"""Ours vs PyTorch: EncoderLayer and DecoderLayer equal torch.nn.TransformerEncoderLayer and
torch.nn.TransformerDecoderLayer, post-norm and pre-norm, in outputs and gradients.

The weights move from torch's layers into ours (``copy_*`` below). Masks differ in polarity:
qkv's boolean masks say True = may attend, torch's ``*_key_padding_mask`` say True = ignore.

Two modes are checked: training mode with dropout=0 and gradients on (torch's plain Python
path), and eval mode under ``torch.no_grad()``, where torch's encoder layer takes its fused
"fast path" (``torch._transformer_encoder_layer_fwd``) when it can.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv import masks
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks import DecoderLayer, EncoderLayer, FeedForward
from tests.conftest import ATOL

D, H, F = 16, 4, 48  # model width, heads, feed-forward width
B, T, S = 3, 6, 7  # batch, target positions, memory positions


def randomize_(module: nn.Module) -> None:
    """Give every parameter random values, so that zero biases and unit gains hide nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)


@torch.no_grad()
def copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    """torch packs W_Q, W_K, W_V into one ``in_proj_weight`` (3 D, D), in that order."""
    for proj, w, b in zip(
        (ours.q_proj, ours.k_proj, ours.v_proj),
        theirs.in_proj_weight.chunk(3, dim=0),
        theirs.in_proj_bias.chunk(3, dim=0),
        strict=True,
    ):
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.weight.copy_(theirs.out_proj.weight)
    ours.out_proj.bias.copy_(theirs.out_proj.bias)


@torch.no_grad()
def copy_mlp(ours: nn.Module, linear1: nn.Linear, linear2: nn.Linear) -> None:
    assert isinstance(ours, FeedForward)
    ours.up_proj.load_state_dict(linear1.state_dict())
    ours.down_proj.load_state_dict(linear2.state_dict())


def copy_encoder(ours: EncoderLayer, theirs: nn.TransformerEncoderLayer) -> None:
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_mlp(ours.mlp, theirs.linear1, theirs.linear2)
    ours.attn_norm.load_state_dict(theirs.norm1.state_dict())
    ours.mlp_norm.load_state_dict(theirs.norm2.state_dict())


def copy_decoder(ours: DecoderLayer, theirs: nn.TransformerDecoderLayer) -> None:
    assert ours.cross_attn is not None and ours.cross_norm is not None
    copy_attention(ours.self_attn, theirs.self_attn)
    copy_attention(ours.cross_attn, theirs.multihead_attn)
    copy_mlp(ours.mlp, theirs.linear1, theirs.linear2)
    ours.attn_norm.load_state_dict(theirs.norm1.state_dict())
    ours.cross_norm.load_state_dict(theirs.norm2.state_dict())
    ours.mlp_norm.load_state_dict(theirs.norm3.state_dict())


def random_lengths(n: int, max_len: int) -> torch.Tensor:
    """Lengths in [1, max_len], with at least one full and one padded sequence."""
    lengths = torch.randint(1, max_len + 1, (n,))
    lengths[0], lengths[1] = max_len, max(1, max_len - 3)
    return lengths


def input_grad(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, *args, **kwargs):
    """The output of ``layer`` and the gradient of sum(output * weights) w.r.t. ``x``."""
    x = x.clone().requires_grad_(True)
    out = layer(x, *args, **kwargs)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch_in_training_mode(norm_first: bool, activation: str) -> None:
    theirs = nn.TransformerEncoderLayer(
        D, H, F, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    ours = EncoderLayer(D, H, F, activation=activation, norm_first=norm_first)  # type: ignore[arg-type]
    randomize_(theirs)
    copy_encoder(ours, theirs)
    x, g = torch.randn(B, T, D), torch.randn(B, T, D)
    lengths = random_lengths(B, T)
    keep = masks.padding(lengths, max_len=T)  # (B, 1, 1, T), True = real token

    out, grad = input_grad(ours, x, g, mask=keep)
    ref, ref_grad = input_grad(theirs, x, g, src_key_padding_mask=~keep[:, 0, 0])
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_encoder_layer_matches_torch_fast_path_in_eval_mode(
    norm_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused = torch._transformer_encoder_layer_fwd
    fast_path_calls = []

    def counting_fused(*args):
        fast_path_calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting_fused)
    theirs = nn.TransformerEncoderLayer(
        D, H, F, dropout=0.1, batch_first=True, norm_first=norm_first
    ).eval()
    ours = EncoderLayer(D, H, F, dropout=0.1, norm_first=norm_first).eval()
    randomize_(theirs)
    copy_encoder(ours, theirs)
    x = torch.randn(B, T, D)
    keep = masks.padding(random_lengths(B, T), max_len=T)  # (B, 1, 1, T)
    with torch.no_grad():
        out = ours(x, mask=keep)
        ref = theirs(x, src_key_padding_mask=~keep[:, 0, 0])
    assert fast_path_calls, "torch did not take its fast path; this test no longer checks it"
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_layer_matches_torch(norm_first: bool, mode: str) -> None:
    theirs = nn.TransformerDecoderLayer(
        D, H, F, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    )
    ours = DecoderLayer(D, H, F, activation="gelu", norm_first=norm_first)
    randomize_(theirs)
    copy_decoder(ours, theirs)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x, memory, g = torch.randn(B, T, D), torch.randn(B, S, D), torch.randn(B, T, D)
    tgt_keep = masks.padding(random_lengths(B, T), max_len=T)  # (B, 1, 1, T)
    memory_keep = masks.padding(random_lengths(B, S), max_len=S)  # (B, 1, 1, S)

    out, grad = input_grad(
        ours, x, g, memory, self_mask=tgt_keep, memory_mask=memory_keep, causal=True
    )
    ref, ref_grad = input_grad(
        theirs,
        x,
        g,
        memory,
        tgt_mask=torch.ones(T, T, dtype=torch.bool).triu(diagonal=1),  # True = future: hide
        tgt_is_causal=True,
        tgt_key_padding_mask=~tgt_keep[:, 0, 0],
        memory_key_padding_mask=~memory_keep[:, 0, 0],
    )
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=ATOL[torch.float32], rtol=0)


def test_parameter_gradients_match_torch() -> None:
    """Gradients reach the weights as in torch: W_Q, W_K, W_V are torch's in_proj_weight rows."""
    theirs = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, batch_first=True)
    ours = EncoderLayer(D, H, F)
    randomize_(theirs)
    copy_encoder(ours, theirs)
    x, g = torch.randn(B, T, D), torch.randn(B, T, D)
    (ours(x) * g).sum().backward()
    (theirs(x) * g).sum().backward()
    attn = ours.self_attn
    ours_in_proj = torch.cat(
        [attn.q_proj.weight.grad, attn.k_proj.weight.grad, attn.v_proj.weight.grad]
    )
    assert theirs.self_attn.in_proj_weight.grad is not None
    torch.testing.assert_close(
        ours_in_proj, theirs.self_attn.in_proj_weight.grad, atol=ATOL[torch.float32], rtol=0
    )
    torch.testing.assert_close(
        ours.mlp_norm.weight.grad, theirs.norm2.weight.grad, atol=ATOL[torch.float32], rtol=0
    )
