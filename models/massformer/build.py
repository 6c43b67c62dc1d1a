"""Builders for the MaSSFormer variants (segment-anything style) and a parameter-count summary.

``r50`` is the released configuration (docs/design.md §1.6). ``lite_r18`` is an inferred Lite configuration
(docs/design.md §1.6: C = 64, D = 128, 6 layers, FFN 1024). ``tiny`` is a small configuration of the same code
for CPU tests and the demo. Every builder takes ``pixel_decoder="fpn"`` for the mask-classification baseline
(ablation row #1). Builders return untrained models; `models.massformer.weights` loads weights into them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.errors import InputError
from models.massformer.backbone import ResNetBackbone
from models.massformer.fpn_decoder import FPNPixelDecoder
from models.massformer.model import MaSSFormer
from models.massformer.pixel_decoder import HRPixelDecoder
from models.massformer.transformer_decoder import MaskedTransformerDecoder

PIXEL_DECODERS = ("hr", "fpn")


def build_massformer_r50(num_classes: int, *, pixel_decoder: str = "hr") -> MaSSFormer:
    """MaSSFormer R50: ResNet-50, C = 128, D = 256, 6 layers, 100 queries, FFN 2048 (37.58M at K = 7)."""
    return _build_massformer(
        num_classes=num_classes,
        pixel_decoder=pixel_decoder,
        backbone_block=Bottleneck,
        backbone_layers=(3, 4, 6, 3),
        decoder_channels=128,
        hidden_dim=256,
        num_queries=100,
        num_heads=8,
        ffn_dim=2048,
        num_layers=6,
        attn_ffn_dim=1024,
    )


def build_massformer_lite_r18(num_classes: int, *, pixel_decoder: str = "hr") -> MaSSFormer:
    """MaSSFormer Lite: ResNet-18, C = 64, D = 128, 6 layers, 100 queries, FFN 1024 (docs/design.md §1.6)."""
    return _build_massformer(
        num_classes=num_classes,
        pixel_decoder=pixel_decoder,
        backbone_block=BasicBlock,
        backbone_layers=(2, 2, 2, 2),
        decoder_channels=64,
        hidden_dim=128,
        num_queries=100,
        num_heads=8,
        ffn_dim=1024,
        num_layers=6,
        attn_ffn_dim=1024,
    )


def build_massformer_tiny(num_classes: int, *, pixel_decoder: str = "hr") -> MaSSFormer:
    """Tiny MaSSFormer for CPU tests and the demo.

    ResNet (BasicBlock, one block per stage), C = 16, D = 64, 3 layers, 16 queries, 4 heads, FFN 128.
    """
    return _build_massformer(
        num_classes=num_classes,
        pixel_decoder=pixel_decoder,
        backbone_block=BasicBlock,
        backbone_layers=(1, 1, 1, 1),
        # C = 16 (not 32) keeps a batch-2 256 x 256 train step at ~0.55 CPU-s instead of ~0.77 on this CPU.
        decoder_channels=16,
        hidden_dim=64,
        num_queries=16,
        num_heads=4,
        ffn_dim=128,
        num_layers=3,
        attn_ffn_dim=128,
    )


MODEL_BUILDERS: dict[str, Callable[..., MaSSFormer]] = {
    "r50": build_massformer_r50,
    "lite_r18": build_massformer_lite_r18,
    "tiny": build_massformer_tiny,
}


def _build_massformer(
    *,
    num_classes: int,
    pixel_decoder: str,
    backbone_block: type[BasicBlock] | type[Bottleneck],
    backbone_layers: Sequence[int],
    decoder_channels: int,
    hidden_dim: int,
    num_queries: int,
    num_heads: int,
    ffn_dim: int,
    num_layers: int,
    attn_ffn_dim: int,
) -> MaSSFormer:
    if num_classes < 1:
        raise InputError(f"num_classes must be >= 1. Got {num_classes} instead.")
    if pixel_decoder not in PIXEL_DECODERS:
        raise InputError(f"pixel_decoder must be one of {PIXEL_DECODERS}. Got {pixel_decoder!r} instead.")
    backbone = ResNetBackbone(block=backbone_block, layers=backbone_layers)
    decoder: HRPixelDecoder | FPNPixelDecoder
    if pixel_decoder == "hr":
        decoder = HRPixelDecoder(
            in_channels=backbone.out_channels,
            channels=decoder_channels,
            out_channels=hidden_dim,
            num_heads=num_heads,
            attn_ffn_dim=attn_ffn_dim,
        )
    else:
        decoder = FPNPixelDecoder(
            in_channels=backbone.out_channels, channels=hidden_dim, out_channels=hidden_dim
        )
    model = MaSSFormer(
        backbone=backbone,
        pixel_decoder=decoder,
        transformer_decoder=MaskedTransformerDecoder(
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
        ),
    )
    return model


def _count(module: nn.Module | Sequence[nn.Module]) -> int:
    modules = [module] if isinstance(module, nn.Module) else list(module)
    return sum(p.numel() for m in modules for p in m.parameters())


def model_info(variant: str, *, num_classes: int, pixel_decoder: str = "hr") -> dict[str, Any]:
    """Parameter counts per component (all parameters incl. frozen BN affines; buffers excluded).

    Builds the model on the meta device, so it is instant and allocates nothing.

    Args:
        variant: a `MODEL_BUILDERS` key.
        num_classes: K.
        pixel_decoder: ``"hr"`` (MaSSFormer) or ``"fpn"`` (baseline).

    Returns:
        JSON-serialisable dict: ``variant``, ``pixel_decoder``, ``num_classes``, ``components`` (backbone,
        pixel_decoder, transformer_decoder = layers + post-norm, heads = queries + level embedding + class and
        mask heads), ``pixel_decoder_parts`` (per-block counts), ``total`` and ``trainable``.
    """
    if variant not in MODEL_BUILDERS:
        raise InputError(f"variant must be one of {sorted(MODEL_BUILDERS)}. Got {variant!r} instead.")
    with torch.device("meta"):
        model = MODEL_BUILDERS[variant](num_classes, pixel_decoder=pixel_decoder)
    td = model.transformer_decoder
    pd = model.pixel_decoder
    if isinstance(pd, HRPixelDecoder):
        parts = {
            "in_projections": _count(pd.in_projections),
            "conv_avg": _count(pd.conv_avg),
            "seb": _count(pd.seb),
            "cst": _count(pd.cst),
            "rfb": _count(pd.rfb),
            "lse": _count(pd.lse),
            "egf": _count([pd.erm, pd.edge_head]),
            "out_convs": _count(pd.out),
        }
    else:
        parts = {
            "lateral": _count(pd.lateral),
            "output": _count(pd.output),
            "mask_features": _count(pd.mask_features),
        }
    components = {
        "backbone": _count(model.backbone),
        "pixel_decoder": _count(pd),
        "transformer_decoder": _count([td.layers, td.post_norm]),
        "heads": _count([td.query_feat, td.query_embed, td.level_embed, td.class_embed, td.mask_embed]),
    }
    total = _count(model)
    assert sum(components.values()) == total, "a parameter is not assigned to any component"
    return {
        "variant": variant,
        "pixel_decoder": pixel_decoder,
        "num_classes": num_classes,
        "components": components,
        "pixel_decoder_parts": parts,
        "total": total,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
