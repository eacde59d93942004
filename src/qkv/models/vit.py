"""ViT, the Vision Transformer: an image cut into patches is a sequence of tokens.

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          patches embedded, class token first
    z_l = z'_l + MLP(LN(z'_l)),  z'_l = z_{l-1} + MSA(LN(z_{l-1}))      l = 1 .. L (pre-norm)
    y   = LN(z_L^0)                                          the class token's final state

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", 2020 (arXiv:2010.11929), section 3.1, equations 1-4.

The encoder is BERT's, almost unchanged; only the input differs. The image is cut into N square
patches of P x P pixels, each flattened and projected to D numbers by one shared matrix E. A
convolution with kernel = stride = P does exactly that, one patch per output pixel. A learned
class token is put in front, learned position embeddings (one per patch and one for the class
token) are added, and pre-norm encoder layers follow. After a final LayerNorm, the class
token's vector is the image's representation; a linear head turns it into class scores::

    pixels (B, C, I, I) --conv PxP, stride P--> (B, D, I/P, I/P) --flatten--> (B, N, D)
    [cls] + patches --> (B, 1 + N, D) + positions --> L x EncoderLayer --> LayerNorm
    --> take position 0 (the class token) --> head --> (B, num_labels)

Shape legend: B batch · C channels · I image side in pixels · P patch side · N patches (I/P)² ·
T positions (1 + N) · D model width · H heads · F MLP hidden width · L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.blocks import ActivationName, EncoderLayer, LayerNorm, LayerSpec
from qkv.blocks.moe import Experts
from qkv.models import checks
from qkv.models.base import ModelOutput, QkvModel
from qkv.models.common import IGNORE_INDEX, recording_attentions
from qkv.models.lm import encoder_stack
from qkv.positional import LearnedPositionalEmbedding

__all__ = ["PRESETS", "ViT", "ViTConfig"]


# --8<-- [start:config]
@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Sizes and switches of a Vision Transformer (square images, square patches)."""

    image_size: int = 224  # I, the side of the (square) input image in pixels
    patch_size: int = 16  # P; I must be a multiple of P
    num_channels: int = 3  # C: 3 for RGB, 1 for grey
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    num_labels: int = 1000  # classes of the head; 0: no head (a backbone)
    pooler: bool = False  # backbone only: pooler_output = tanh(W h_class + b)
    dropout: float = 0.0
    norm_eps: float = 1e-12
    activation: ActivationName = "gelu"
    attn_impl: str = "auto"
    # A mixture of experts in place of every layer's feed-forward network, each expert of the
    # network's shape: qkv.blocks.moe.Experts, or a dict of its fields ({"n_experts": 4,
    # "top_k": 2}); None: dense. See docs/learn/13-cheaper-models.md.
    experts: Experts | None = None

    def __post_init__(self) -> None:
        checks.require_experts(self)
        sizes = ("image_size", "patch_size", "num_channels", "d_model", "n_layers", "d_ff")
        checks.require_positive(self, *sizes)
        advice = "choose a patch size that tiles the image exactly (e.g. 2 or 4 for 8x8 images)"
        checks.require_divisible(self, "image_size", "patch_size", advice=advice)
        checks.require_divisible(self, "d_model", "n_heads", advice="change one of them")
        if self.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0 (0 = no head), got {self.num_labels}")
        if self.pooler and self.num_labels:
            raise ValueError(
                "pooler=True is for a backbone (num_labels=0), as in Hugging Face's ViTModel; "
                "the classifier reads the class token directly, so set pooler=False"
            )
        checks.require_rate(self, "dropout")
        checks.require_eps(self)
        checks.require_activation(self)

    @property
    def num_patches(self) -> int:
        """N = (I / P)²."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS: dict[str, ViTConfig] = {
    # Dosovitskiy et al. 2020, Table 1 (ViT-Base, "86M"); google/vit-base-patch16-224 on the
    # Hugging Face Hub. 86,567,656 parameters with the 1000-class ImageNet head (transformers'
    # ViTForImageClassification reports the same); the table's 86M is the rounded count.
    "vit-base-patch16-224": ViTConfig(),
    # Table 1 (ViT-Large, "307M"); google/vit-large-patch16-224. 304,326,632 parameters with the
    # 1000-class head, as transformers reports. The table gives one count per model size, whatever
    # the patch size, image size and head, which all change it (a 32x32 patch projection alone
    # holds 2.4M more than a 16x16 one).
    "vit-large-patch16-224": ViTConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
    # A ViT small enough to train on scikit-learn's 8x8 digits in seconds: 16 patches of 2x2
    # grey pixels, 10 classes. 102,218 parameters.
    "vit-digits": ViTConfig(
        image_size=8, patch_size=2, num_channels=1, d_model=64, n_layers=2, n_heads=4,
        d_ff=256, num_labels=10,
    ),
    # Smoke tests: 2 layers of width 32 on 8x8 grey images in 4x4 patches.
    "tiny": ViTConfig(
        image_size=8, patch_size=4, num_channels=1, d_model=32, n_layers=2, n_heads=4,
        d_ff=64, num_labels=10,
    ),
}  # fmt: skip


# --8<-- [end:config]


class ViT(QkvModel[ViTConfig]):
    """The Vision Transformer: patch embedding, class token, pre-norm encoder, linear head.

    Initialisation follows timm and Hugging Face: weights of the linear layers, the patch
    projection, the class token and the position embeddings from normal(0, 0.02²) (through
    ``trunc_normal_``, whose cut at ±2 never bites at this scale), biases 0, LayerNorms 1 and 0
    (the JAX original zero-initialises the class token and the head; either trains).

    Args:
        config: a ``ViTConfig``.

    Example:
        >>> import torch
        >>> model = ViT(PRESETS["tiny"])
        >>> out = model(torch.randn(2, 1, 8, 8), labels=torch.tensor([3, 7]))
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 10]), torch.Size([]))
    """

    family = "vit"

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        c = config
        # One P x P patch of C channels -> D numbers: the matrix E of equation 1, as a conv.
        self.patch_emb = nn.Conv2d(c.num_channels, c.d_model, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))  # (1, 1, D)
        self.pos_emb = LearnedPositionalEmbedding(1 + c.num_patches, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        spec = LayerSpec(
            d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout,
            activation=c.activation, norm_eps=c.norm_eps, norm_first=True, attn_impl=c.attn_impl,
            experts=c.experts,
        )  # fmt: skip
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(c.n_layers))
        self.final_norm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.num_labels) if c.num_labels else None
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooler else None
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LearnedPositionalEmbedding):
            nn.init.trunc_normal_(module.emb.weight, std=0.02)

    # --8<-- [start:embed]
    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patches, class token and positions: z_0 of equation 1 (before dropout).

        Args:
            pixel_values: (B, C, I, I) float images.

        Returns:
            (B, 1 + N, D); position 0 is the class token.
        """
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (B, C, I, I) = (B, {c.num_channels}, {c.image_size}, "
                f"{c.image_size}) for this config, got {tuple(pixel_values.shape)}; resize the "
                "images or build the model with matching image_size and num_channels"
            )
        x = self.patch_emb(pixel_values.to(self.patch_emb.weight.dtype))  # (B, D, I/P, I/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        positions = torch.arange(x.shape[1], device=x.device)  # (1 + N,)
        return x + self.pos_emb(positions)  # (B, 1 + N, D)

    # --8<-- [end:embed]

    # --8<-- [start:forward]
    def forward(
        self,
        pixel_values: Tensor,
        *,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        """Classify images (or, without a head, encode them).

        Args:
            pixel_values: (B, C, I, I) float images, normalised as in training.
            labels: (B,) class indices; -100 marks an example to ignore.
            output_hidden_states: also return z_0 and every layer's output, each (B, T, D)
                (without the final LayerNorm, as transformers returns them).
            output_attentions: also return every layer's attention weights (B, H, T, T).

        Returns:
            ``ModelOutput`` with ``logits`` (B, num_labels) (None without a head), ``loss``
            (cross-entropy) when labels are given, ``last_hidden_state`` (B, T, D) after the
            final LayerNorm, and ``pooler_output`` (B, D) for a backbone with a pooler.
        """
        x = self.dropout(self.embed(pixel_values))  # (B, T, D)
        with recording_attentions(self.layers, output_attentions) as weights:
            states = encoder_stack(self.layers, x)  # z_0 .. z_L, each (B, T, D)
        h = self.final_norm(states[-1])  # (B, T, D)
        cls = h[:, 0]  # (B, D), the class token: y of equation 4
        logits = self.head(cls) if self.head is not None else None  # (B, num_labels)
        pooled = torch.tanh(self.pooler(cls)) if self.pooler is not None else None  # (B, D)
        loss = None
        if labels is not None:
            if logits is None:
                raise ValueError("labels need a classification head; build with num_labels > 0")
            loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return ModelOutput(
            logits=logits,
            loss=loss,
            last_hidden_state=h,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
            pooler_output=pooled,
        )

    # --8<-- [end:forward]
