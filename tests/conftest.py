"""Shared test settings. Tolerances per dtype live here and only here; loosening one needs a
comment saying why."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Absolute tolerance of float32 paths against a float64 reference (the 1e-5).
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# Half precision is judged relatively: a fast path's error against a float64 reference may be at
# most HALF_FACTOR times the error of the reference path run in the same dtype.
HALF_FACTOR = 2.0

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_seed(request: pytest.FixtureRequest) -> None:
    """Fresh random inputs every run, reproducible from the seed printed on failure."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "torch_seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({value})")


@pytest.fixture(autouse=True, scope="session")
def _offline_hub() -> None:
    """Tests never reach a model hub: Hugging Face libraries look only at local files."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


# -- tests marked gpu ---------------------------------------------------------------------------
# They run on CUDA, and skip without it. QKV_TEST_DEVICE=cpu runs them on the CPU instead, so a
# machine without a GPU can check that they work (`QKV_TEST_DEVICE=cpu pytest -m gpu`).
GPU_TEST_DEVICE = torch.device(os.environ.get("QKV_TEST_DEVICE", "cuda"))

# Float32 on a GPU against the same computation elsewhere (another path on the GPU, or the CPU),
# with TF32 off: cuBLAS and the fused attention kernels sum in other orders and tiles than the
# CPU's kernels, and logits of width-512 models gather that rounding: 1e-4, where ATOL says 1e-5.
GPU_ATOL = {torch.float32: 1e-4}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU_TEST_DEVICE.type != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (QKV_TEST_DEVICE=cpu runs it on the CPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def gpu_device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """The device of a test marked gpu, with TF32 off for the test: float32 means float32."""
    if request.node.get_closest_marker("gpu") is None:
        pytest.fail("a test that takes gpu_device must be marked @pytest.mark.gpu")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield GPU_TEST_DEVICE
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# -- optional packages ---------------------------------------------------------------------------
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.requires("module", ...)``: skip without a module, fail on CI (see
    ``tests/optional.py``)."""
    from tests.optional import missing, skip_or_fail

    for marker in item.iter_markers("requires"):
        for module in marker.args:
            reason = missing(module)
            if reason is not None:
                skip_or_fail(reason)


@pytest.fixture
def fresh_probes() -> Iterator[None]:
    """The oneDNN kernel is checked anew for each dtype in the test (which may fake it), and
    again by whoever comes after it (``qkv._kernels``)."""
    import qkv._kernels as kernels

    kernels._onednn_probe.cache_clear()
    try:
        yield
    finally:
        kernels._onednn_probe.cache_clear()  # the next caller probes the real build again
