# Follows Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR
# 2022), facebookresearch/Mask2Former `mask2former/modeling/pixel_decoder/msdeformattn.py` (MSDeformAttnPixelDecoder,
# MSDeformAttnTransformerEncoderOnly) and `.../pixel_decoder/ops/modules/ms_deform_attn.py` (MSDeformAttn, after
# Deformable DETR, Zhu et al. 2021), with the sampling written as Deformable DETR's pure-PyTorch fallback
# (`ms_deform_attn_core_pytorch`: F.grid_sample, bilinear, zeros padding, align_corners=False). Own code.
"""Mask2Former's multi-scale deformable-attention pixel decoder (`MSDeformAttnPixelDecoder`).

Data flow (s = stride w.r.t. the padded input; D = ``channels``)::

    C3, C4, C5 --1x1 conv + GN--> three D-channel maps (s8, s16, s32)
    tokens of s32, s16, s8 (in that order) + sine PE + level embedding
        --6 x [MSDeformAttn (8 heads, 3 levels, 4 points) -> add & LN -> FFN -> add & LN]--> memories s32, s16, s8
    C2 --1x1 conv + GN (lateral)--> + bilinear up(memory s8) --3x3 conv + GN + ReLU--> s4 map
    mask_features = 1x1 conv(s4 map)

No edge head; memories are returned low to high resolution, as the masked transformer decoder cycles them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.maskformer.fpn_decoder import conv_norm
from addclass.models.massformer.pixel_decoder import PixelDecoderOutput
from addclass.models.parts.position_encoding import sine_position_encoding


def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention's sampling and weighting (Deformable DETR's PyTorch path).

    Each query reads, per head, ``L x P`` bilinear samples of its head's value channels at normalised
    locations (0..1 over each level's map, pixel centres at ``(i + 0.5) / size``; outside the map is zero) and
    sums them with its attention weights.

    Args:
        value: B x S x heads x Dh value tokens of all levels, concatenated in ``spatial_shapes`` order
            (S = sum of h_l * w_l, row-major within a level).
        spatial_shapes: (h_l, w_l) of each of the L levels.
        locations: B x Nq x heads x L x P x 2 sampling locations as (x, y) in [0, 1].
        weights: B x Nq x heads x L x P attention weights.

    Returns:
        B x Nq x (heads * Dh).
    """
    b, _, heads, dh = value.shape
    _, nq, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    w_ = weights.transpose(1, 2).reshape(b * heads, 1, nq, levels, points)  # (B heads) x 1 x Nq x L x P
    # Level by level, weighted and summed at once: only one level's samples are alive at a time (Deformable
    # DETR stacks all levels first; the sums agree to float rounding).
    out: Tensor | None = None
    for level, (h, w) in enumerate(spatial_shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(b * heads, dh, h, w)  # (B heads) x Dh x h x w
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B heads) x Nq x P x 2
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # .. x Nq x P
        term = (sampled * w_[..., level, :]).sum(dim=-1)  # (B heads) x Dh x Nq
        out = term if out is None else out + term
    assert out is not None, "spatial_shapes is empty"
    return out.view(b, heads * dh, nq).transpose(1, 2)  # B x Nq x (heads Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), with its initialisation."""

    def __init__(self, *, dim: int = 256, num_levels: int = 3, num_heads: int = 8, num_points: int = 4) -> None:
        """Builds the module.

        Args:
            dim: model width D; must be divisible by ``num_heads``.
            num_levels: feature levels L.
            num_heads: attention heads.
            num_points: sampling points P per head and level.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}. Got {dim} instead.")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on rings of radius 1..P around the reference point, one
        direction per head; uniform attention weights; xavier-uniform value and output projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], dim=-1)  # heads x 2
        grid = grid / grid.abs().max(dim=-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())  # heads x L x P x 2, flattened
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Attends from each query to P points per head and level around its reference point.

        Args:
            query: B x Nq x D (position embedding already added).
            reference_points: B x Nq x L x 2 (x, y) in [0, 1].
            value: B x S x D tokens of all levels (no position embedding).
            spatial_shapes: (h_l, w_l) per level.

        Returns:
            B x Nq x D.
        """
        b, nq, d = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(b, value.shape[1], heads, d // heads)  # B x S x heads x Dh
        offsets = self.sampling_offsets(query).view(b, nq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, nq, heads, levels * points).softmax(dim=-1)
        weights = weights.view(b, nq, heads, levels, points)
        # Offsets are in pixels of each level: normalise by that level's (w, h). Built with as_tensor/stack, not
        # torch.tensor, so that an ONNX trace keeps the sizes symbolic (torch.tensor would freeze them).
        sides = [torch.as_tensor(s, dtype=query.dtype, device=query.device) for h, w in spatial_shapes for s in (w, h)]
        normaliser = torch.stack(sides).view(len(spatial_shapes), 2)  # L x 2
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(v, spatial_shapes, locations, weights))


class MSDeformEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention -> add & LN -> FFN (ReLU) -> add & LN."""

    def __init__(
        self, *, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """B x S x D tokens (+ B x S x D position/level embedding) -> B x S x D."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], *, device: torch.device | str | None = None, dtype: torch.dtype
) -> Tensor:
    """Normalised pixel centres of every token, the same for every level (no padding masks here).

    Returns:
        1 x S x L x 2 (x, y) in (0, 1).
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # h x w each
        points.append(torch.stack([xx.flatten(), yy.flatten()], dim=-1))  # hw x 2
    ref = torch.cat(points, dim=0)  # S x 2
    return ref[None, :, None, :].expand(1, -1, len(spatial_shapes), 2)  # 1 x S x L x 2


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, *, relu: bool) -> nn.Sequential:
    """detectron2's Conv2d(bias=False, norm=GN(32)) [+ ReLU] with c2_xavier_fill (the FPN decoder's block)."""
    return conv_norm(in_channels, out_channels, kernel_size, partial(nn.GroupNorm, 32), relu=relu)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: a deformable-attention encoder over s8..s32, an FPN step to s4."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        channels: int = 256,
        out_channels: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        """Builds the decoder (Mask2Former R50 semantic config by default).

        Args:
            in_channels: channels of C2, C3, C4, C5 (strides 4, 8, 16, 32).
            channels: encoder / FPN width ("conv_dim"); it is the memory width, so it must equal the
                transformer width.
            out_channels: width of the mask features ("mask_dim").
            num_layers: deformable encoder layers.
            num_heads: heads of the deformable attention.
            num_points: sampling points per head and level.
            ffn_dim: encoder FFN hidden width.
            dropout: encoder dropout (0 in Mask2Former).
            num_groups: GroupNorm groups.
        """
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list C2..C5 (4 values). Got {list(in_channels)} instead.")
        self.num_levels = 3
        # Index 0 = C5 (s32), 1 = C4, 2 = C3: the encoder's level order.
        projections = []
        for c in reversed(in_channels[1:]):
            conv = nn.Conv2d(c, channels, 1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # bias=True
            projections.append(nn.Sequential(conv, nn.GroupNorm(num_groups, channels)))
        self.input_proj = nn.ModuleList(projections)
        self.encoder = nn.ModuleList(
            MSDeformEncoderLayer(
                dim=channels,
                ffn_dim=ffn_dim,
                num_levels=self.num_levels,
                num_heads=num_heads,
                num_points=num_points,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(self.num_levels, channels))
        # MSDeformAttnTransformerEncoderOnly._reset_parameters: xavier on every matrix, then each MSDeformAttn's
        # own init, then a normal level embedding.
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        self.lateral = _conv_gn(in_channels[0], channels, 1, relu=False)
        self.output = _conv_gn(channels, channels, 3, relu=True)
        self.mask_features = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)  # c2_xavier_fill
        nn.init.zeros_(self.mask_features.bias)  # type: ignore[arg-type]  # bias=True

    @property
    def size_divisor(self) -> int:
        """Input sides should be multiples of this (exact 2x steps between levels)."""
        return 32

    def forward(self, features: Sequence[Tensor]) -> PixelDecoderOutput:
        """Decodes backbone features.

        Args:
            features: (normalized image, C2 s4, C3 s8, C4 s16, C5 s32); the image is not used.

        Returns:
            `PixelDecoderOutput`: mask features at s4, memories = the encoder outputs at s32, s16, s8, no edge
            logits.
        """
        _, c2, *pyramid = features
        srcs, pos, shapes = [], [], []
        for level, x in enumerate(reversed(pyramid)):  # C5, C4, C3
            y = self.input_proj[level](x)  # B x D x h x w
            d, h, w = y.shape[1:]
            shapes.append((h, w))
            srcs.append(y.flatten(2).transpose(1, 2))  # B x hw x D
            pe = sine_position_encoding(h, w, num_feats=d // 2, device=y.device, dtype=y.dtype)  # 1 x D x h x w
            pos.append(pe.flatten(2).transpose(1, 2) + self.level_embed[level])  # 1 x hw x D
        src = torch.cat(srcs, dim=1)  # B x S x D
        pos_all = torch.cat(pos, dim=1)  # 1 x S x D
        ref = encoder_reference_points(shapes, device=src.device, dtype=src.dtype)  # 1 x S x L x 2
        ref = ref.expand(src.shape[0], -1, -1, -1)  # B x S x L x 2
        for layer in self.encoder:
            src = layer(src, pos_all, ref, shapes)
        b, _, d = src.shape
        memories = [
            t.transpose(1, 2).reshape(b, d, h, w)  # B x D x h x w
            for t, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
        ]
        lateral = self.lateral(c2)  # B x D x H/4 x W/4
        y = lateral + F.interpolate(memories[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return PixelDecoderOutput(
            mask_features=self.mask_features(self.output(y)),  # B x D x H/4 x W/4
            memories=memories,
            edge_logits=None,
            mask_stride=4,
        )
