"""Loading and saving checkpoints, in Hugging Face's layout and qkv's own.

Each ``hf_<family>.py`` module maps one family's weights and config in both directions and
registers a converter; they are all imported here so that ``from_pretrained`` knows every one.
"""

import importlib
import pkgutil

from qkv.interop.files import CheckpointError
from qkv.interop.pretrained import (
    from_pretrained,
    load_state_dict_strict,
    resolve_checkpoint,
    save_pretrained,
)
from qkv.interop.registry import Converter, register, supported_model_types

# Import every hf_<family>.py so that its converter registers itself.
for _module in pkgutil.iter_modules(__path__):
    if _module.name.startswith("hf_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CheckpointError",
    "Converter",
    "from_pretrained",
    "load_state_dict_strict",
    "register",
    "resolve_checkpoint",
    "save_pretrained",
    "supported_model_types",
]
