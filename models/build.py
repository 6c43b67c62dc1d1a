"""Builders for the MaSSFormer variants and the Mask2Former / MaskFormer baselines (segment-anything style), and a
parameter-count summary.

``r50`` is the released configuration (docs/design.md §1.6). ``lite_r18`` is an inferred Lite configuration
(docs/design.md §1.6: C = 64, D = 128, 6 layers, FFN 1024). ``tiny`` is a small configuration of the same code
for CPU tests and the demo. Every MaSSFormer builder takes ``pixel_decoder="fpn"`` for the mask-classification
baseline (ablation row #1).

``mask2former_r50`` and ``maskformer_r50`` are the baselines of the MaSS13K paper's Tab. 2 (docs/design.md §1.8),
``mask2former_tiny`` and ``maskformer_tiny`` small versions of them for CPU tests and quick runs. They have their
own pixel decoders (``"msdeform"``, ``"fpn"``) and take no other. ``semask_fpn_swint`` is the SeMask FPN baseline
(Swin-T, docs/design.md §1.9) in the same container, ``semask_fpn_tiny`` a small version; their pixel decoder is
``"semantic_fpn"``. Builders return untrained models; `models.weights` loads weights into them (ImageNet
ResNets into the ResNet backbones, an ImageNet Swin-T into SeMask's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from addclass.common.errors import InputError
from addclass.models.mask2former.msdeform_decoder import MSDeformAttnPixelDecoder
from addclass.models.maskformer.detr_decoder import StandardTransformerDecoder
from addclass.models.maskformer.fpn_decoder import FPNPixelDecoder
from addclass.models.massformer.model import MaSSFormer, PixelDecoder, TransformerDecoder
from addclass.models.massformer.pixel_decoder import HRPixelDecoder
from addclass.models.parts.backbone import ResNetBackbone
from addclass.models.parts.transformer_decoder import MaskedTransformerDecoder
from addclass.models.semask.heads import FixedClassHead, SemanticFPNDecoder
from addclass.models.semask.semask import SeMaskSwinBackbone, SwinStage

PIXEL_DECODERS = ("hr", "fpn", "msdeform", "semantic_fpn")  # every pixel decoder name (the CLI's choices)
MASSFORMER_PIXEL_DECODERS = ("hr", "fpn")  # what the MaSSFormer variants take; "hr" is their own
# The baselines' own pixel decoders; a baseline takes no other.
BASELINE_PIXEL_DECODERS = {
    "mask2former_r50": "msdeform",
    "mask2former_tiny": "msdeform",
    "maskformer_r50": "fpn",
    "maskformer_tiny": "fpn",
    "semask_fpn_swint": "semantic_fpn",
    "semask_fpn_tiny": "semantic_fpn",
}


def build_massformer_r50(num_classes: int, *, pixel_decoder: str | None = "hr") -> MaSSFormer:
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


def build_massformer_lite_r18(num_classes: int, *, pixel_decoder: str | None = "hr") -> MaSSFormer:
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


def build_massformer_tiny(num_classes: int, *, pixel_decoder: str | None = "hr") -> MaSSFormer:
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


def build_mask2former_r50(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """Mask2Former R50 (semantic config): ResNet-50, MSDeformAttn pixel decoder (6 layers, 8 heads, 4 points, FFN
    1024), masked-attention decoder with 9 layers, 100 queries, D = 256, FFN 2048 (44.00M at K = 7)."""
    _check_own_pixel_decoder("mask2former_r50", pixel_decoder)
    return _build_mask2former(
        num_classes=num_classes,
        backbone_block=Bottleneck,
        backbone_layers=(3, 4, 6, 3),
        hidden_dim=256,
        encoder_layers=6,
        encoder_ffn_dim=1024,
        num_points=4,
        num_queries=100,
        num_heads=8,
        ffn_dim=2048,
        num_layers=9,
    )


def build_mask2former_tiny(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """Tiny Mask2Former for CPU tests and quick runs: the tiny ResNet, D = 64 (GroupNorm 32), 2 encoder layers
    (4 heads, 2 points, FFN 128), 3 decoder layers, 16 queries, 4 heads, FFN 128."""
    _check_own_pixel_decoder("mask2former_tiny", pixel_decoder)
    return _build_mask2former(
        num_classes=num_classes,
        backbone_block=BasicBlock,
        backbone_layers=(1, 1, 1, 1),
        hidden_dim=64,
        encoder_layers=2,
        encoder_ffn_dim=128,
        num_points=2,
        num_queries=16,
        num_heads=4,
        ffn_dim=128,
        num_layers=3,
    )


def build_maskformer_r50(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """MaskFormer R50 (semantic config): ResNet-50, FPN pixel decoder (256 channels, masks at s4), DETR decoder
    on C5 with 6 layers, 100 queries, D = 256, FFN 2048, dropout 0.1 (41.27M at K = 7)."""
    _check_own_pixel_decoder("maskformer_r50", pixel_decoder)
    return _build_maskformer(
        num_classes=num_classes,
        backbone_block=Bottleneck,
        backbone_layers=(3, 4, 6, 3),
        hidden_dim=256,
        num_queries=100,
        num_heads=8,
        ffn_dim=2048,
        num_layers=6,
    )


def build_maskformer_tiny(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """Tiny MaskFormer for CPU tests and quick runs: the tiny ResNet, D = 64 (GroupNorm 32), 3 decoder layers,
    16 queries, 4 heads, FFN 128."""
    _check_own_pixel_decoder("maskformer_tiny", pixel_decoder)
    return _build_maskformer(
        num_classes=num_classes,
        backbone_block=BasicBlock,
        backbone_layers=(1, 1, 1, 1),
        hidden_dim=64,
        num_queries=16,
        num_heads=4,
        ffn_dim=128,
        num_layers=3,
    )


def build_semask_fpn_swint(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """SeMask FPN Swin-T (ADE20K config): Swin-T (patch 4, window 7, C = 96, depths 2/2/6/2, heads 3/6/12/24,
    drop path 0.3) with a SeMask semantic layer after each stage, Semantic FPN head of width 256 on the backbone
    outputs (no neck), fixed per-class head (docs/design.md §1.9; 34.21M at K = 7, 34.66M at K = 150)."""
    _check_own_pixel_decoder("semask_fpn_swint", pixel_decoder)
    return _build_semask_fpn(num_classes=num_classes, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                             channels=256)


def build_semask_fpn_tiny(num_classes: int, *, pixel_decoder: str | None = None) -> MaSSFormer:
    """Tiny SeMask FPN for CPU tests and quick runs: Swin with C = 32, two blocks per stage (one shifted),
    heads 1/2/4/8, window 7, head width 32."""
    _check_own_pixel_decoder("semask_fpn_tiny", pixel_decoder)
    return _build_semask_fpn(num_classes=num_classes, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                             channels=32)


MODEL_BUILDERS: dict[str, Callable[..., MaSSFormer]] = {
    "r50": build_massformer_r50,
    "lite_r18": build_massformer_lite_r18,
    "tiny": build_massformer_tiny,
    "mask2former_r50": build_mask2former_r50,
    "mask2former_tiny": build_mask2former_tiny,
    "maskformer_r50": build_maskformer_r50,
    "maskformer_tiny": build_maskformer_tiny,
    "semask_fpn_swint": build_semask_fpn_swint,
    "semask_fpn_tiny": build_semask_fpn_tiny,
}


def default_pixel_decoder(variant: str) -> str:
    """The pixel decoder a variant builds when none is named: a baseline's own, ``"hr"`` for MaSSFormer."""
    return BASELINE_PIXEL_DECODERS.get(variant, "hr")


def pixel_decoder_problem(variant: str, pixel_decoder: str | None) -> str | None:
    """Why ``variant`` cannot be built with ``pixel_decoder`` (one line), or None (None means the default)."""
    if variant not in MODEL_BUILDERS:
        return f"variant must be one of {sorted(MODEL_BUILDERS)}. Got {variant!r} instead."
    if pixel_decoder is None:
        return None
    own = BASELINE_PIXEL_DECODERS.get(variant)
    if own is not None:
        if pixel_decoder != own:
            return (
                f"pixel_decoder applies to the MaSSFormer variants only: {variant} has its own {own!r} "
                f"decoder. Got {pixel_decoder!r} instead."
            )
        return None
    if pixel_decoder not in MASSFORMER_PIXEL_DECODERS:
        return f"pixel_decoder must be one of {MASSFORMER_PIXEL_DECODERS}. Got {pixel_decoder!r} instead."
    return None


def _check_own_pixel_decoder(variant: str, pixel_decoder: str | None) -> None:
    problem = pixel_decoder_problem(variant, pixel_decoder)
    if problem is not None:
        raise InputError(problem)


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise InputError(f"num_classes must be >= 1. Got {num_classes} instead.")


def _build_mask2former(
    *,
    num_classes: int,
    backbone_block: type[BasicBlock] | type[Bottleneck],
    backbone_layers: Sequence[int],
    hidden_dim: int,
    encoder_layers: int,
    encoder_ffn_dim: int,
    num_points: int,
    num_queries: int,
    num_heads: int,
    ffn_dim: int,
    num_layers: int,
) -> MaSSFormer:
    _check_num_classes(num_classes)
    backbone = ResNetBackbone(block=backbone_block, layers=backbone_layers)
    return MaSSFormer(
        backbone=backbone,
        pixel_decoder=MSDeformAttnPixelDecoder(
            in_channels=backbone.out_channels,
            channels=hidden_dim,
            out_channels=hidden_dim,
            num_layers=encoder_layers,
            num_heads=num_heads,
            num_points=num_points,
            ffn_dim=encoder_ffn_dim,
        ),
        transformer_decoder=MaskedTransformerDecoder(
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            activation="relu",
            init="xavier_uniform",
        ),
        size_divisor=32,
    )


def _build_maskformer(
    *,
    num_classes: int,
    backbone_block: type[BasicBlock] | type[Bottleneck],
    backbone_layers: Sequence[int],
    hidden_dim: int,
    num_queries: int,
    num_heads: int,
    ffn_dim: int,
    num_layers: int,
) -> MaSSFormer:
    _check_num_classes(num_classes)
    backbone = ResNetBackbone(block=backbone_block, layers=backbone_layers)
    return MaSSFormer(
        backbone=backbone,
        pixel_decoder=FPNPixelDecoder(
            in_channels=backbone.out_channels, channels=hidden_dim, out_channels=hidden_dim, memory_source="res5"
        ),
        transformer_decoder=StandardTransformerDecoder(
            num_classes=num_classes,
            in_channels=backbone.out_channels[-1],
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            mask_dim=hidden_dim,
        ),
        size_divisor=32,
    )


def _build_semask_fpn(
    *,
    num_classes: int,
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    channels: int,
) -> MaSSFormer:
    _check_num_classes(num_classes)
    backbone = SeMaskSwinBackbone(num_classes=num_classes, embed_dim=embed_dim, depths=depths, num_heads=num_heads)
    return MaSSFormer(
        backbone=backbone,
        pixel_decoder=SemanticFPNDecoder(in_channels=backbone.out_channels, num_classes=num_classes, channels=channels),
        transformer_decoder=FixedClassHead(num_classes=num_classes),
        size_divisor=32,
    )


def _build_massformer(
    *,
    num_classes: int,
    pixel_decoder: str | None,
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
    _check_num_classes(num_classes)
    pixel_decoder = "hr" if pixel_decoder is None else pixel_decoder
    if pixel_decoder not in MASSFORMER_PIXEL_DECODERS:
        raise InputError(
            f"pixel_decoder must be one of {MASSFORMER_PIXEL_DECODERS}. Got {pixel_decoder!r} instead."
        )
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


def _pixel_decoder_parts(pd: PixelDecoder) -> dict[str, int]:
    """Parameter counts per block of a pixel decoder (`model_info`'s ``pixel_decoder_parts``)."""
    parts: dict[str, int]
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
    elif isinstance(pd, MSDeformAttnPixelDecoder):
        parts = {
            "input_projections": _count(pd.input_proj),
            "encoder": _count(pd.encoder),
            "level_embed": pd.level_embed.numel(),
            "lateral": _count(pd.lateral),
            "output": _count(pd.output),
            "mask_features": _count(pd.mask_features),
        }
    elif isinstance(pd, SemanticFPNDecoder):
        parts = {"scale_heads": _count(pd.scale_heads), "cls_seg": _count(pd.cls_seg)}
    else:
        parts = {
            "lateral": _count(pd.lateral),
            "output": _count(pd.output),
            "mask_features": _count(pd.mask_features),
        }
    return parts


def _transformer_decoder_counts(td: TransformerDecoder) -> tuple[int, int]:
    """(transformer_decoder, heads) parameter counts of a transformer decoder, as `model_info` splits them."""
    if isinstance(td, FixedClassHead):
        transformer = heads = 0
    elif isinstance(td, StandardTransformerDecoder):
        transformer = _count([td.input_proj, td.layers, td.decoder_norm])
        heads = _count([td.query_embed, td.class_embed, td.mask_embed])
    else:
        transformer = _count([td.layers, td.post_norm])
        heads = _count([td.query_feat, td.query_embed, td.level_embed, td.class_embed, td.mask_embed])
    return transformer, heads


def _backbone_parts(backbone: nn.Module) -> dict[str, Any]:
    """SeMask's backbone split into Swin, semantic layers and output norms (``backbone_parts``); {} for the
    other backbones."""
    extra: dict[str, Any] = {}
    if isinstance(backbone, SeMaskSwinBackbone):
        bb = backbone
        semantic = _count([stage.semantic_layer for stage in bb.layers if isinstance(stage, SwinStage)])
        out_norms = _count([bb.norm0, bb.norm1, bb.norm2, bb.norm3])
        extra["backbone_parts"] = {
            "swin": _count(bb) - semantic - out_norms,
            "semantic_layers": semantic,
            "out_norms": out_norms,
        }
    return extra


def model_info(variant: str, *, num_classes: int, pixel_decoder: str | None = None) -> dict[str, Any]:
    """Parameter counts per component (all parameters incl. frozen BN affines; buffers excluded).

    Builds the model on the meta device, so it is instant and allocates nothing.

    Args:
        variant: a `MODEL_BUILDERS` key.
        num_classes: K.
        pixel_decoder: ``"hr"`` (MaSSFormer) or ``"fpn"`` (baseline) for the MaSSFormer variants; a baseline's
            own (``"msdeform"``, ``"fpn"``, ``"semantic_fpn"``) or None for the baselines; None: the variant's
            default.

    Returns:
        JSON-serialisable dict: ``variant``, ``pixel_decoder``, ``num_classes``, ``components`` (backbone,
        pixel_decoder, transformer_decoder, heads), ``pixel_decoder_parts`` (per-block counts), ``total`` and
        ``trainable``. With a masked-attention decoder, transformer_decoder = layers + post-norm and heads =
        queries + level embedding + class and mask heads; with MaskFormer's decoder, transformer_decoder =
        input projection of C5 + layers + decoder norm and heads = query embedding + class and mask heads. SeMask
        FPN: backbone = Swin + semantic layers + output norms (``backbone_parts``), pixel_decoder = Semantic FPN
        head incl. the 1x1 classifier, transformer_decoder = heads = 0 (the fixed class head has no parameters).
    """
    problem = pixel_decoder_problem(variant, pixel_decoder)
    if problem is not None:
        raise InputError(problem)
    pixel_decoder = default_pixel_decoder(variant) if pixel_decoder is None else pixel_decoder
    with torch.device("meta"):
        model = MODEL_BUILDERS[variant](num_classes, pixel_decoder=pixel_decoder)
    td = model.transformer_decoder
    pd = model.pixel_decoder
    parts = _pixel_decoder_parts(pd)
    transformer, heads = _transformer_decoder_counts(td)
    components = {
        "backbone": _count(model.backbone),
        "pixel_decoder": _count(pd),
        "transformer_decoder": transformer,
        "heads": heads,
    }
    total = _count(model)
    assert sum(components.values()) == total, "a parameter is not assigned to any component"
    extra = _backbone_parts(model.backbone)
    return {
        "variant": variant,
        "pixel_decoder": pixel_decoder,
        "num_classes": num_classes,
        "components": components,
        "pixel_decoder_parts": parts,
        **extra,
        "total": total,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
