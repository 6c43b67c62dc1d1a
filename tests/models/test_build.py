"""Builders and parameter accounting against docs/design.md §1.6."""

from __future__ import annotations

import json

import pytest
import torch

from addclass.models.build import (
    BASELINE_PIXEL_DECODERS,
    MASSFORMER_PIXEL_DECODERS,
    MODEL_BUILDERS,
    build_massformer_tiny,
    model_info,
)
from addclass.models.maskformer.fpn_decoder import FPNPixelDecoder
from addclass.models.massformer.pixel_decoder import HRPixelDecoder

# docs/design.md §1.6 (MaSSFormer R50, K = 7): all parameters incl. BN affines, buffers excluded.
SPEC_R50 = {
    "backbone": 23_508_032,
    "pixel_decoder": 4_345_720,
    "transformer_decoder": 9_473_024,  # 6 x 1,578,752 + post-norm 512
    "heads": 251_400,  # query_feat + query_embed, level_embed, cls_embed, mask_embed MLP
}
SPEC_R50_PIXEL_DECODER = {
    "in_projections": 492_544,
    "conv_avg": 262_400,
    "seb": 66_048,
    "cst": 1_541_174,
    "rfb": 1_702_652,
    "lse": 76_282,
    "egf": 71_500,
    "out_convs": 133_120,
}
SPEC_R50_TOTAL = 37_578_176


def test_r50_parameter_count_matches_spec_table() -> None:
    info = model_info("r50", num_classes=7)
    assert info["total"] == SPEC_R50_TOTAL
    assert abs(info["total"] - 37.58e6) / 37.58e6 < 0.005
    assert info["components"] == SPEC_R50
    assert info["pixel_decoder_parts"] == SPEC_R50_PIXEL_DECODER
    # Frozen BN affines of the backbone (53 BN layers, 2 x channels each) are counted but not trainable.
    assert info["total"] - info["trainable"] == 53_120


def test_r50_block_level_counts_from_spec() -> None:
    with torch.device("meta"):
        model = MODEL_BUILDERS["r50"](7)
    pd = model.pixel_decoder
    assert isinstance(pd, HRPixelDecoder)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert [count(b) for b in pd.rfb.branches] == [4_547, 68_059, 342_539, 1_122_899]
    assert count(pd.cst.dcn1) + count(pd.cst.dcn2) == 882_486
    assert count(pd.cst.attn.cross_attn) + count(pd.cst.attn.self_attn) == 132_096
    assert count(pd.cst.attn.ffn1) + count(pd.cst.attn.ffn2) == 526_592
    assert count(pd.erm) == 69_403 and count(pd.edge_head) == 2_097
    layer = model.transformer_decoder.layers[0]
    assert count(layer) == 1_578_752
    assert count(layer.cross_attn) + count(layer.self_attn) == 526_336
    assert count(layer.ffn) == 1_050_880


def test_lite_parameter_count_matches_spec_estimate() -> None:
    info = model_info("lite_r18", num_classes=7)
    assert info["components"]["backbone"] == 11_176_512  # ResNet-18 without fc
    assert abs(info["components"]["pixel_decoder"] - 1.451e6) < 0.5e3
    head = info["components"]["transformer_decoder"] + info["components"]["heads"]
    assert abs(head - 2.454e6) < 0.5e3
    assert abs(info["total"] - 15.081e6) / 15.081e6 < 0.005


# Every variant with every pixel decoder it takes (the baselines take only their own).
VARIANT_DECODERS = [
    (v, d)
    for v in sorted(MODEL_BUILDERS)
    for d in ((BASELINE_PIXEL_DECODERS[v],) if v in BASELINE_PIXEL_DECODERS else MASSFORMER_PIXEL_DECODERS)
]


@pytest.mark.parametrize(("variant", "pixel_decoder"), VARIANT_DECODERS)
def test_model_info_is_json_and_consistent(variant: str, pixel_decoder: str) -> None:
    info = model_info(variant, num_classes=9, pixel_decoder=pixel_decoder)
    assert json.loads(json.dumps(info)) == info
    assert sum(info["components"].values()) == info["total"]
    assert sum(info["pixel_decoder_parts"].values()) == info["components"]["pixel_decoder"]
    assert 0 < info["trainable"] <= info["total"]  # SeMask FPN has no frozen parameters
    assert info["variant"] == variant and info["pixel_decoder"] == pixel_decoder and info["num_classes"] == 9


def test_num_classes_only_changes_the_class_head() -> None:
    a = model_info("r50", num_classes=7)
    b = model_info("r50", num_classes=8)
    assert b["total"] - a["total"] == 257  # one more output row of the 256 -> K+1 linear layer


def test_pixel_decoder_selection() -> None:
    assert isinstance(build_massformer_tiny(3, pixel_decoder="hr").pixel_decoder, HRPixelDecoder)
    assert isinstance(build_massformer_tiny(3, pixel_decoder="fpn").pixel_decoder, FPNPixelDecoder)
    with pytest.raises(ValueError, match="pixel_decoder"):
        build_massformer_tiny(3, pixel_decoder="msdeform")
    with pytest.raises(ValueError, match="variant"):
        model_info("r101", num_classes=7)
    with pytest.raises(ValueError, match="num_classes"):
        build_massformer_tiny(0)

