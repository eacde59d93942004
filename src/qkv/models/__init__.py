"""The model families, one file each with its config and presets, in learning-path order.

Importing this package registers every family, so that ``qkv.from_pretrained`` finds the class
of any checkpoint written by qkv.
"""

from qkv.models.bart import Bart, BartConfig
from qkv.models.base import FAMILIES, ModelOutput, QkvModel
from qkv.models.bert import Bert, BertConfig
from qkv.models.gpt import GPT, GPTConfig
from qkv.models.llama import Llama, LlamaConfig
from qkv.models.mixtral import Mixtral, MixtralConfig
from qkv.models.prefix_lm import PrefixLM, PrefixLMConfig
from qkv.models.t5 import T5, T5Config
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.models.transformer_xl import TransformerXL, TransformerXLConfig
from qkv.models.vit import ViT, ViTConfig

__all__ = [
    "FAMILIES",
    "GPT",
    "T5",
    "Bart",
    "BartConfig",
    "Bert",
    "BertConfig",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "Mixtral",
    "MixtralConfig",
    "ModelOutput",
    "PrefixLM",
    "PrefixLMConfig",
    "QkvModel",
    "T5Config",
    "Transformer",
    "TransformerConfig",
    "TransformerXL",
    "TransformerXLConfig",
    "ViT",
    "ViTConfig",
]
