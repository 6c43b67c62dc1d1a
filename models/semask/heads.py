# Follows SeMask (Jain et al., "SeMask: Semantically Masked Transformers for Semantic Segmentation", 2021),
# Picsart-AI-Research/SeMask-Segmentation `SeMask-FPN/mmseg/models/decode_heads/branch_fpn_head.py` (Semantic FPN
# head with the semantic decoder) and `configs/_base_/models/semfpn_semask_swin.py`. Own code; docs/design.md §1.9.
"""SeMask FPN's heads for the `models.massformer.model.MaSSFormer` container: the Semantic FPN pixel decoder on
the SeMask Swin backbone's outputs (`models.semask.semask`) and the fixed per-class head (data flow: the
`models.semask.semask` docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.common.errors import InputError
from addclass.models.massformer.pixel_decoder import PixelDecoderOutput

# The fixed class logit of a query's own class in `FixedClassHead` (all other entries: -FIXED_CLASS_LOGIT).
# softmax then gives the own class 1 - (K) * exp(-2 * 30), i.e. 1 in float32.
FIXED_CLASS_LOGIT = 30.0


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule's init
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SemanticFPNDecoder(nn.Module):
    """SeMask's ``BranchFPNHead`` (the Semantic FPN head of Kirillov et al. 2019, on the backbone's outputs: the
    released config has no FPN neck), as a pixel decoder: the "mask features" are the K per-pixel class logits at
    stride 4; ``aux_semantic`` is the sum of the backbone's semantic maps brought to stride 4 by repeated 2x
    bilinear upsampling (the semantic decoder, no parameters)."""

    def __init__(self, *, in_channels: Sequence[int], num_classes: int, channels: int = 256,
                 dropout: float = 0.1) -> None:
        """Builds the decoder.

        Args:
            in_channels: channels of C2..C5 (strides 4, 8, 16, 32).
            num_classes: K, the classifier's outputs.
            channels: width of the per-level branches (256).
            dropout: dropout before the 1x1 classifier (0.1).
        """
        super().__init__()
        if len(in_channels) != 4:
            raise InputError(f"in_channels must list C2..C5 (4 values). Got {list(in_channels)} instead.")
        branches = []
        for level, c in enumerate(in_channels):
            layers: list[nn.Module] = []
            for k in range(max(1, level)):  # level 0: one conv; level i > 0: i x (conv, 2x upsampling)
                layers += _conv_bn_relu(c if k == 0 else channels, channels)
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False))
            branches.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(branches)
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.cls_seg.weight, std=0.01)  # mmseg decode head's init
        nn.init.zeros_(self.cls_seg.bias)  # type: ignore[arg-type]  # bias=True

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (exact 2x steps between levels)."""
        return 32

    def forward(self, features: Sequence[Tensor | list[Tensor]]) -> PixelDecoderOutput:
        """Decodes backbone features.

        Args:
            features: (normalized image, C2 s4, C3 s8, C4 s16, C5 s32, [semantic maps s4 .. s32]).

        Returns:
            `PixelDecoderOutput` with the class logits B x K x H/4 x W/4 as mask features, no memories, no edge
            logits and ``aux_semantic`` B x K x H/4 x W/4.
        """
        if len(features) != 6 or not isinstance(features[5], list):
            raise InputError(
                f"expected the SeMask backbone's 6 outputs (C2..C5, semantic maps). Got {len(features)} instead."
            )
        pyramid = [f for f in features[1:5] if isinstance(f, Tensor)]
        sems = features[5]
        y = self.scale_heads[0](pyramid[0])  # B x c x H/4 x W/4
        semantic = sems[0]  # B x K x H/4 x W/4
        size = y.shape[-2:]
        for i in range(1, 4):
            y = y + F.interpolate(self.scale_heads[i](pyramid[i]), size=size, mode="bilinear", align_corners=False)
            sem = sems[i]
            for _ in range(i):  # the reference's chain of 2x upsamplings, then a resize (a no-op here)
                sem = F.interpolate(sem, scale_factor=2.0, mode="bilinear", align_corners=False)
            semantic = semantic + F.interpolate(sem, size=size, mode="bilinear", align_corners=False)
        return PixelDecoderOutput(
            mask_features=self.cls_seg(self.dropout(y)),  # B x K x H/4 x W/4
            memories=[],
            edge_logits=None,
            mask_stride=4,
            aux_semantic=semantic,
        )


class FixedClassHead(nn.Module):
    """The "transformer decoder" of SeMask FPN in the container: K queries, query k always class k.

    Class logits are a fixed buffer (`FIXED_CLASS_LOGIT` on the query's class, its negative elsewhere and on
    no-object; not trained, not saved); the mask logits of query k are the per-pixel logits of class k,
    upsampled 2x to stride 2 (the container's contract). No parameters and no auxiliary predictions. The output
    dict's ``query_classes`` tells `models.training.criterion.SetCriterion` to assign segments by class.
    """

    class_logits: Tensor  # K x (K+1) buffer

    def __init__(self, *, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        logits = torch.full((num_classes, num_classes + 1), -FIXED_CLASS_LOGIT)
        logits[:, :num_classes] += 2 * FIXED_CLASS_LOGIT * torch.eye(num_classes)  # K x (K+1)
        self.register_buffer("class_logits", logits, persistent=False)

    @property
    def num_queries(self) -> int:
        """Q = K."""
        return self.num_classes

    def forward(
        self, mask_features: Tensor, memories: list[Tensor], *, mask_stride: int, keep_aux: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Args: class logits B x K x H/4 x W/4; memories (unused); mask_stride (must be 4); keep_aux (no aux).

        Returns: [(class logits B x K x (K+1), mask logits B x K x H/2 x W/2)]."""
        if mask_stride != 4:
            raise InputError(f"mask_stride must be 4. Got {mask_stride} instead.")
        if mask_features.shape[1] != self.num_classes:
            raise InputError(f"expected {self.num_classes} class maps. Got {mask_features.shape[1]} instead.")
        b = mask_features.shape[0]
        logits = self.class_logits.to(mask_features.dtype).unsqueeze(0).expand(b, -1, -1)  # B x K x (K+1)
        masks = F.interpolate(mask_features, scale_factor=2.0, mode="bilinear", align_corners=False)
        return [(logits, masks)]
