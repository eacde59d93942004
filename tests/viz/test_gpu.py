"""Capturing attention on a GPU: the weights recorded from a model on CUDA equal the same model's
on the CPU, every real row sums to 1, and the check (weights @ V == the fast output) passes
against the GPU's fused kernels.

Run on the ``gpu_device`` (``QKV_TEST_DEVICE=cpu`` runs them on the CPU, to check them on a
machine without a GPU). Shape legend: B batch · L layers · H heads · T query positions ·
S key positions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qkv.viz.capture import capture_attention, record_attention
from tests.conftest import ATOL
from tests.viz.test_capture import FAMILIES, build, inputs

pytestmark = pytest.mark.gpu

TOL = ATOL[torch.float32]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_captured_on_the_device_equal_those_on_the_cpu(
    family: str, gpu_device: torch.device
) -> None:
    on_cpu = build(family)
    on_device = copy.deepcopy(on_cpu).to(gpu_device)
    batch = inputs(family)
    batch_on_device = {k: v.to(gpu_device) for k, v in batch.items()}

    expected = record_attention(on_cpu, **batch)
    recording = record_attention(on_device, **batch_on_device)
    assert recording.max_error is not None and recording.max_error < TOL  # the check passed
    assert set(recording.weights) == set(expected.weights)
    for kind, w in recording.weights.items():  # (B, L, H, T, S), on the CPU already
        assert w.dtype == torch.float32 and w.device.type == "cpu"
        torch.testing.assert_close(w, expected.weights[kind], atol=TOL, rtol=0)

    for example in range(2):  # each row of the batch, its padding trimmed
        theirs = capture_attention(on_cpu, **batch, example=example)
        ours = capture_attention(on_device, **batch_on_device, example=example)
        assert set(ours.maps) == set(theirs.maps)
        for kind, maps in ours.maps.items():
            n_layers, n_heads, t, _ = maps.weights.shape  # (L, H, T, S)
            torch.testing.assert_close(
                maps.weights.sum(-1), torch.ones(n_layers, n_heads, t), atol=TOL, rtol=0
            )
            torch.testing.assert_close(maps.weights, theirs[kind].weights, atol=TOL, rtol=0)
