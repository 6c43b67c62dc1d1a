# After MaskFormer's BasePixelDecoder
# (facebookresearch/MaskFormer, mask_former/modeling/heads/pixel_decoder.py),
# extended to hand three FPN levels to the masked-attention decoder.
"""MaskFormer's pixel decoder (its ``BasePixelDecoder``): the ``maskformer_*`` variants' own, and ablation row #1
of the MaSS13K paper inside MaSSFormer (``pixel_decoder="fpn"``).

Top-down FPN with GroupNorm: the s32 level is a 3x3 conv of C5; every finer level is
``3x3(lateral1x1(C_i) + up(previous))`` (nearest upsampling). The mask features are a 3x3 conv of the s4 output
(256 channels at stride 4 in MaskFormer R50). No edge head. Memories: with ``memory_source="fpn"`` (MaSSFormer's
masked-attention decoder) the FPN outputs at strides 32, 16 and 8; with ``"res5"`` (MaskFormer's transformer
decoder, its ``TRANSFORMER_IN_FEATURE: res5``) the backbone's C5 itself, which that decoder projects to D.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.massformer.pixel_decoder import PixelDecoderOutput


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm_layer: Callable[[int], nn.Module],
    relu: bool,
) -> nn.Sequential:
    """detectron2's Conv2d(bias=False, norm) [+ ReLU] with c2_xavier_fill (MaskFormer's and Mask2Former's
    decoder block)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # c2_xavier_fill, as in detectron2
    layers: list[nn.Module] = [conv, norm_layer(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPNPixelDecoder(nn.Module):
    """MaskFormer-style FPN pixel decoder. Mask features at stride 4."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        channels: int = 256,
        out_channels: int = 256,
        num_groups: int = 32,
        memory_source: Literal["fpn", "res5"] = "fpn",
    ) -> None:
        """Builds the decoder.

        Args:
            in_channels: channels of C2, C3, C4, C5 (strides 4, 8, 16, 32).
            channels: FPN width; it is also the memory width, so it must equal the transformer width.
            out_channels: width of the mask features (the transformer width).
            num_groups: GroupNorm groups.
            memory_source: ``"fpn"``: memories are the FPN outputs at s32, s16, s8; ``"res5"``: one memory,
                the backbone's C5 (MaskFormer).
        """
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list C2..C5 (4 values). Got {list(in_channels)} instead.")
        if memory_source not in ("fpn", "res5"):
            raise ValueError(f"memory_source must be 'fpn' or 'res5'. Got {memory_source!r} instead.")
        self.memory_source = memory_source
        norm = partial(nn.GroupNorm, num_groups)
        # Index 0 = C2 (s4) ... 3 = C5 (s32); C5 has no lateral conv (MaskFormer).
        self.lateral = nn.ModuleList(conv_norm(c, channels, 1, norm, relu=False) for c in in_channels[:-1])
        self.output = nn.ModuleList(
            conv_norm(in_channels[-1] if i == 3 else channels, channels, 3, norm, relu=True)
            for i in range(4)
        )
        self.mask_features = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)  # type: ignore[arg-type]  # bias=True

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (exact 2x steps between levels)."""
        return 32

    def forward(self, features: Sequence[Tensor]) -> PixelDecoderOutput:
        """Decodes backbone features.

        Args:
            features: (normalized image, C2 s4, C3 s8, C4 s16, C5 s32); the image is not used.

        Returns:
            `PixelDecoderOutput` with mask features at s4 and no edge logits; memories per ``memory_source``.
        """
        _, *pyramid = features
        y = self.output[3](pyramid[3])  # B x C x H/32 x W/32
        outs = [y]
        for level in (2, 1, 0):
            lateral = self.lateral[level](pyramid[level])  # B x C x h x w
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = self.output[level](y)
            outs.append(y)
        # outs: s32, s16, s8, s4
        return PixelDecoderOutput(
            mask_features=self.mask_features(outs[3]),  # B x D x H/4 x W/4
            memories=outs[:3] if self.memory_source == "fpn" else [pyramid[3]],
            edge_logits=None,
            mask_stride=4,
        )
