"""Shared test settings. Tolerances per dtype live here and only here; loosening one needs a
comment saying why."""

from __future__ import annotations

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
