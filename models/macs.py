"""MACs of one forward pass, counted on the meta device (no memory, no compute): `count_macs`.

Counted with ``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2. Counted ops: convolutions,
linear/matmul/bmm (einsums and attention lower to these), torchvision's deformable convolution (custom formula,
C_out * C_in * k^2 per output pixel) and ``grid_sample`` (custom formula, 4 MACs per output value: the bilinear
corners; Mask2Former's deformable-attention sampling). The MaSS13K paper's "FLOPs" are fvcore MACs
(docs/design.md §1.6); fvcore skips custom autograd ops such as mmcv's modulated deformable conv and
Mask2Former's MSDeformAttn CUDA op, so the comparable figure is ``macs_excluding_sampling_g``. fvcore's small
elementwise extras (normalisation, upsampling, softmax: ~1-2 %) are not counted here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from addclass.models.build import MODEL_BUILDERS


def _deform_conv2d_flops(
    input_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    b, c_out, h, w = out_shape
    _, c_in_per_group, kh, kw = weight_shape
    return 2 * b * c_out * c_in_per_group * kh * kw * h * w


def _grid_sample_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * 4 * math.prod(out_shape)  # 4 bilinear corners per sampled value


def count_macs(
    variant: str, *, height: int, width: int, num_classes: int = 7, pixel_decoder: str | None = None
) -> dict[str, Any]:
    """MACs (in G) of one eval ``model(images)`` forward of a 1 x 3 x ``height`` x ``width`` image.

    Args:
        variant: a `models.build.MODEL_BUILDERS` key.
        height: input height (the model pads it to its size divisor, as in a real run).
        width: input width.
        num_classes: K.
        pixel_decoder: as the builders take it (None: the variant's own).

    Returns:
        JSON-serialisable dict: ``macs_g`` (all counted ops), ``macs_excluding_deform_g`` (without deformable
        convolutions), ``macs_excluding_sampling_g`` (without deformable convolutions and ``grid_sample``: the
        fvcore-comparable figure), ``deform_conv_macs_g``, ``grid_sample_macs_g``, ``per_component_g``
        (backbone, pixel_decoder, transformer_decoder) and ``by_op_g``.
    """
    with torch.device("meta"):
        model = MODEL_BUILDERS[variant](num_classes, pixel_decoder=pixel_decoder).eval()
        images = torch.empty(1, 3, height, width)
    counter = FlopCounterMode(
        display=False,
        depth=2,
        custom_mapping={
            torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops,
            torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
        },
    )
    with counter:  # no torch.no_grad(): the module tracker needs autograd; on meta it costs nothing
        model(images)
    counts = counter.get_flop_counts()
    glob = counts["Global"]
    deform = sum(v for k, v in glob.items() if "deform_conv2d" in str(k))
    sampling = sum(v for k, v in glob.items() if "grid_sampler" in str(k))
    total = sum(glob.values())
    root = type(model).__name__
    return {
        "macs_g": round(total / 2e9, 3),
        "macs_excluding_deform_g": round((total - deform) / 2e9, 3),
        "macs_excluding_sampling_g": round((total - deform - sampling) / 2e9, 3),
        "deform_conv_macs_g": round(deform / 2e9, 3),
        "grid_sample_macs_g": round(sampling / 2e9, 3),
        "per_component_g": {
            name: round(sum(counts.get(f"{root}.{name}", {}).values()) / 2e9, 3)
            for name in ("backbone", "pixel_decoder", "transformer_decoder")
        },
        "by_op_g": {str(k): round(v / 2e9, 3) for k, v in glob.items()},
    }
