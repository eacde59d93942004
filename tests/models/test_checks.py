"""The config checks every family shares: each family's config rejects the same bad values of the
fields they have in common, with a message that names the field.

The families are those of ``FAMILIES`` that qkv defines, each starting from its module's valid
``PRESETS["tiny"]``; a family added later is held to the same checks.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Any

import pytest

from qkv.models import FAMILIES, checks

# Fields several families share, and values no config may accept.
COMMON_BAD_VALUES: dict[str, list[Any]] = {
    "vocab_size": [0],
    "src_vocab_size": [0],
    "tgt_vocab_size": [0],
    "d_model": [0],
    "n_heads": [0],
    "n_layers": [0],
    "n_encoder_layers": [0],
    "d_ff": [0],
    "max_seq_len": [0],
    "norm_eps": [0.0, -1e-5, math.nan],
    "dropout": [1.0, -0.1],
}

# qkv's own families; tests register toy ones too, which must not change what is collected.
OWN_FAMILIES = {
    family: model_class
    for family, model_class in FAMILIES.items()
    if model_class.__module__.startswith("qkv.models.")
}

CASES = [
    pytest.param(family, name, value, id=f"{family}-{name}={value}")
    for family, model_class in sorted(OWN_FAMILIES.items())
    for name, values in COMMON_BAD_VALUES.items()
    if name in {f.name for f in dataclasses.fields(model_class.config_class)}
    for value in values
]


def test_every_family_has_the_common_fields() -> None:
    # Guards the parametrisation: were a field renamed, its cases would silently vanish.
    counts = {family: sum(case.values[0] == family for case in CASES) for family in OWN_FAMILIES}
    assert len(counts) >= 10, counts
    assert all(count >= 6 for count in counts.values()), counts


def tiny(family: str) -> Any:
    """The family's smallest preset, a valid config."""
    return importlib.import_module(OWN_FAMILIES[family].__module__).PRESETS["tiny"]


@pytest.mark.parametrize(("family", "name", "value"), CASES)
def test_config_rejects_a_bad_common_field(family: str, name: str, value: Any) -> None:
    config = tiny(family)
    dataclasses.replace(config)  # the preset passes its checks, so what fails is the change
    with pytest.raises(ValueError, match=re.escape(name)):
        dataclasses.replace(config, **{name: value})


def test_require_eps() -> None:
    @dataclasses.dataclass
    class Config:
        norm_eps: float = 1e-6
        layer_norm_eps: float = 1e-12

    checks.require_eps(Config())
    checks.require_eps(Config(), "layer_norm_eps")
    with pytest.raises(ValueError, match=r"^norm_eps must be positive, got 0\.0$"):
        checks.require_eps(Config(norm_eps=0.0))
    with pytest.raises(ValueError, match=r"^layer_norm_eps must be positive, got -1\.0$"):
        checks.require_eps(Config(layer_norm_eps=-1.0), "layer_norm_eps")
