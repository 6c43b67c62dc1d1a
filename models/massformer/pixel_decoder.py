# Behaviour ported from MaSS13K `mmseg/models/decode_heads/mass_decoder.py` (HR_Pixel_Decoder and its blocks)
# @ a6f8923 (EGF upsamples y4, 4 output convs); see docs/design.md §1.3.
"""MaSSFormer's high-resolution pixel decoder: SEB x4, CST, RFB, LSE and EGF.

Data flow (s = stride w.r.t. the padded input; C = ``channels``, D = ``out_channels``)::

    C2..C5 --1x1--> P1..P4 --SEB--> S1 (s4), S2 (s8), S3 (s16), S4 (s32);  g = 1x1(GAP(C5))
    CST:  D4, u16 = DCN_up(S4 + g);  t = CSAttn(u16, S3);  D3, u8 = DCN_up(t)
    RFB:  D2 = fuse(DCN_k(u8 + S2), k = 1, 3, 5, 7);  y4 = conv3x3(up2(D2))
    LSE:  S_detail (s2) from the normalized image and up(S1)
    EGF:  u2 = up(y4 -> s2);  P_edge = head(u2 + S_detail);  D1 = ERM(S_detail, u2)
    out:  mask_features = out0(D1) (s2);  memories = [out1(D4) s32, out2(D3) s16, out3(D2) s8]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.massformer.deform import DeformLayer
from addclass.models.parts.position_encoding import sine_position_encoding


@dataclass
class PixelDecoderOutput:
    """What every pixel decoder hands to the transformer decoder.

    Attributes:
        mask_features: B x D x H/s x W/s per-pixel embeddings, s = ``mask_stride``.
        memories: multi-scale features for masked attention, low to high resolution: strides 32, 16, 8,
            each B x D x h x w.
        edge_logits: B x 1 x H/2 x W/2 edge logits, or None for decoders without an edge head.
        mask_stride: stride of ``mask_features`` (2 for the HR decoder, 4 for the FPN baseline).
        aux_semantic: B x K x H/4 x W/4 semantic-prior logits (SeMask's semantic decoder), or None.
    """

    mask_features: Tensor
    memories: list[Tensor]
    edge_logits: Tensor | None
    mask_stride: int
    aux_semantic: Tensor | None = None


class ConvBNReLU(nn.Sequential):
    """k x k conv (no bias, "same" padding) -> norm -> ReLU, kaiming-normal (a=1) init as in the reference."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, a=1)
        super().__init__(conv, norm_layer(out_channels), nn.ReLU(inplace=True))


class SEB(nn.Module):
    """Semantic enhancement block: ``x + x * sigmoid(sigmoid(MLP(GAP(x))))``.

    The double sigmoid is the reference's (its MLP ends in a Sigmoid, then ``.sigmoid()`` again), so the gate
    lies in (0.5, 0.73); kept as written.
    """

    def __init__(
        self, *, channels: int, reduction: int = 2, norm_layer: type[nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            norm_layer(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """B x C x h x w -> B x C x h x w."""
        gate = self.mlp(x.mean(dim=(2, 3), keepdim=True)).sigmoid().sigmoid()  # B x C x 1 x 1
        return x + x * gate


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """B x C x h x w -> (B * h/ws * w/ws) x ws^2 x C tokens, windows in row-major order."""
    b, c, h, w = x.shape
    ws = window_size
    x = x.view(b, c, h // ws, ws, w // ws, ws)  # B x C x nh x ws x nw x ws
    x = x.permute(0, 2, 4, 3, 5, 1)  # B x nh x nw x ws x ws x C
    return x.reshape(-1, ws * ws, c)  # (B*nh*nw) x ws^2 x C


def window_reverse(tokens: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B * nh * nw) x ws^2 x C -> B x C x h x w."""
    nh, nw = height // window_size, width // window_size
    c = tokens.shape[-1]
    x = tokens.view(-1, nh, nw, window_size, window_size, c)  # B x nh x nw x ws x ws x C
    x = x.permute(0, 5, 1, 3, 2, 4)  # B x C x nh x ws x nw x ws
    return x.reshape(-1, c, height, width)  # B x C x h x w


class FFN(nn.Sequential):
    """Linear -> ReLU -> Linear (the residual is added by the caller)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))


class CSAttn(nn.Module):
    """Windowed cross-attention (query from the upsampled s32 branch, key/value S3) then self-attention.

    Residuals everywhere, no LayerNorm (as in the reference). ``pos`` is a window-local sine encoding.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn1 = FFN(dim=dim, hidden_dim=ffn_dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn2 = FFN(dim=dim, hidden_dim=ffn_dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        """Applies cross- then self-attention inside non-overlapping windows.

        Args:
            query: B x C x h x w (s16), h and w multiples of the window size.
            key: B x C x h x w (S3).

        Returns:
            B x C x h x w.
        """
        _, c, h, w = query.shape
        ws = self.window_size
        if h % ws or w % ws:
            raise ValueError(
                f"CSAttn needs a stride-16 map whose sides are multiples of {ws} "
                f"(input multiple of {16 * ws}). "
                f"Got {h} x {w} instead; MaSSFormer.forward pads inputs for you."
            )
        q = window_partition(query, ws)  # N x ws^2 x C
        kv = window_partition(key, ws)  # N x ws^2 x C
        pos = sine_position_encoding(
            ws, ws, num_feats=c // 2, device=q.device, dtype=q.dtype
        )  # 1 x C x ws x ws
        pos = pos.flatten(2).transpose(1, 2)  # 1 x ws^2 x C
        t = q + self.cross_attn(q + pos, kv + pos, kv, need_weights=False)[0]  # N x ws^2 x C
        t = t + self.ffn1(t)
        tp = t + pos
        t = t + self.self_attn(tp, tp, t, need_weights=False)[0]  # N x ws^2 x C
        t = t + self.ffn2(t)
        return window_reverse(t, ws, h, w)  # B x C x h x w


class CST(nn.Module):
    """Cross-scale transformer (global branch): DCN-up(S4 + g) -> CSAttn with S3 -> DCN-up."""

    def __init__(
        self,
        *,
        channels: int,
        num_heads: int,
        ffn_dim: int,
        window_size: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.dcn1 = DeformLayer(
            in_channels=channels, out_channels=channels, kernel_size=3, upsample=True, norm_layer=norm_layer
        )
        self.attn = CSAttn(dim=channels, num_heads=num_heads, ffn_dim=ffn_dim, window_size=window_size)
        self.dcn2 = DeformLayer(
            in_channels=channels, out_channels=channels, kernel_size=3, upsample=True, norm_layer=norm_layer
        )

    def forward(self, g: Tensor, s4: Tensor, s3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Runs the global branch.

        Args:
            g: B x C x 1 x 1 global context (GAP of C5, projected).
            s4: B x C x h/32 x w/32.
            s3: B x C x h/16 x w/16.

        Returns:
            D4 (B x C at s32), D3 (B x C at s16) and u8 (B x C at s8).
        """
        d4, u16 = self.dcn1(s4 + g)
        d3, u8 = self.dcn2(self.attn(u16, s3))
        return d4, d3, u8


class RFB(nn.Module):
    """Receptive-field block: parallel DCNs with k = 1, 3, 5, 7, fused; also returns a conv'd 2x upsample."""

    def __init__(
        self,
        *,
        channels: int,
        kernel_sizes: Sequence[int] = (1, 3, 5, 7),
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        branch = channels // len(kernel_sizes)
        self.branches = nn.ModuleList(
            DeformLayer(in_channels=channels, out_channels=branch, kernel_size=k, norm_layer=norm_layer)
            for k in kernel_sizes
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(branch * len(kernel_sizes), channels, 1), norm_layer(channels), nn.ReLU(inplace=True)
        )
        self.up_conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), norm_layer(channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """B x C x h x w (s8) -> (D2: B x C x h x w, y4: B x C x 2h x 2w)."""
        d2 = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))  # B x C x h x w
        y4 = F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False)  # B x C x 2h x 2w
        return d2, self.up_conv(y4)


class LSE(nn.Module):
    """Local structure enhancement at 1/2 resolution: image + S1 through a 1x1 and a DCN branch.

    Each branch gets a spatial attention ``conv7x7(sigmoid(cat(mean_c, max_c)))`` applied as ``x * a + x``.
    The sigmoid sits before the conv and none after it (unlike CBAM); kept as written in the reference.
    """

    def __init__(
        self, *, channels: int, image_channels: int = 3, norm_layer: type[nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        half = channels // 2
        self.conv_branch = ConvBNReLU(half + image_channels, half, norm_layer=norm_layer)
        self.dcn_branch = DeformLayer(
            in_channels=half + image_channels, out_channels=half, kernel_size=3, norm_layer=norm_layer
        )
        self.attn_conv1 = nn.Conv2d(2, 1, 7, padding=3)
        self.attn_conv2 = nn.Conv2d(2, 1, 7, padding=3)
        self.fuse = ConvBNReLU(2 * half, channels, norm_layer=norm_layer)

    @staticmethod
    def _spatial_attention(x: Tensor, conv: nn.Conv2d) -> Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # B x 2 x h x w
        return x * conv(stats.sigmoid()) + x

    def forward(self, image: Tensor, s1: Tensor) -> Tensor:
        """Builds S_detail.

        Args:
            image: B x 3 x H x W normalized (padded) image.
            s1: B x C x H/4 x W/4.

        Returns:
            B x C x H/2 x W/2.
        """
        size = (image.shape[-2] // 2, image.shape[-1] // 2)
        s1 = F.interpolate(s1, size=size, mode="bilinear", align_corners=False)  # B x C x H/2 x W/2
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)  # B x 3 x H/2 x W/2
        a, b = torch.chunk(s1, 2, dim=1)  # 2 x (B x C/2 x H/2 x W/2)
        x1 = self._spatial_attention(self.conv_branch(torch.cat([image, a], dim=1)), self.attn_conv1)
        x2 = self._spatial_attention(self.dcn_branch(torch.cat([image, b], dim=1)), self.attn_conv2)
        return self.fuse(torch.cat([x1, x2], dim=1))  # B x C x H/2 x W/2


class ERM(nn.Module):
    """Edge refinement (EGF's refinement): ``D1 = BN(1x1(DCN(1x1(sigmoid(S_detail) * u2)))) + u2``."""

    def __init__(
        self, *, channels: int, hidden_channels: int, norm_layer: type[nn.Module] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden_channels, 1)
        self.dcn = DeformLayer(
            in_channels=hidden_channels, out_channels=hidden_channels, kernel_size=3, norm_layer=norm_layer
        )
        self.expand = nn.Conv2d(hidden_channels, channels, 1)
        self.norm = norm_layer(channels)

    def forward(self, detail: Tensor, body: Tensor) -> Tensor:
        """(S_detail, u2), both B x C x H/2 x W/2 -> D1, B x C x H/2 x W/2."""
        z = detail.sigmoid() * body
        z = self.norm(self.expand(self.dcn(self.reduce(z))))
        return z + body


class HRPixelDecoder(nn.Module):
    """MaSSFormer's HR pixel decoder (docs/design.md §1.3).

    Inputs must be multiples of 16 * ``window_size``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        channels: int = 128,
        out_channels: int = 256,
        num_heads: int = 8,
        attn_ffn_dim: int = 1024,
        window_size: int = 16,
        rfb_kernel_sizes: Sequence[int] = (1, 3, 5, 7),
        edge_channels: int = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        """Builds the decoder.

        Args:
            in_channels: channels of C2, C3, C4, C5 (strides 4, 8, 16, 32).
            channels: internal width C (128 in the reference).
            out_channels: width D of mask features and memories (the transformer width).
            num_heads: heads of the CST attentions.
            attn_ffn_dim: hidden width of the CST FFNs (mmcv's default 1024 in the reference).
            window_size: CST window side on the s16 grid.
            rfb_kernel_sizes: DCN kernel sizes of the RFB branches; ``channels`` must divide evenly.
            edge_channels: hidden width of the edge head.
            norm_layer: normalization layer class (plain BatchNorm2d in the reference decoder).
        """
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"in_channels must list C2..C5 (4 values). Got {list(in_channels)} instead.")
        self.window_size = window_size
        self.in_projections = nn.ModuleList(
            ConvBNReLU(c, channels, norm_layer=norm_layer) for c in in_channels
        )
        self.conv_avg = ConvBNReLU(in_channels[-1], channels, norm_layer=norm_layer)
        # One SEB per level, not shared: index 0 = S4 (s32), 1 = S3, 2 = S2, 3 = S1 (s4), as in the reference.
        self.seb = nn.ModuleList(SEB(channels=channels, norm_layer=norm_layer) for _ in range(4))
        self.cst = CST(
            channels=channels,
            num_heads=num_heads,
            ffn_dim=attn_ffn_dim,
            window_size=window_size,
            norm_layer=norm_layer,
        )
        self.rfb = RFB(channels=channels, kernel_sizes=rfb_kernel_sizes, norm_layer=norm_layer)
        self.lse = LSE(channels=channels, norm_layer=norm_layer)
        self.edge_head = nn.Sequential(
            ConvBNReLU(channels, edge_channels, norm_layer=norm_layer), nn.Conv2d(edge_channels, 1, 1)
        )
        self.erm = ERM(channels=channels, hidden_channels=channels // 2, norm_layer=norm_layer)
        # out[0] -> mask features (D1), out[1..3] -> memories (D4, D3, D2).
        self.out = nn.ModuleList(ConvBNReLU(channels, out_channels, norm_layer=norm_layer) for _ in range(4))

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this (the CST windows tile the s16 grid)."""
        return 16 * self.window_size

    def forward(self, features: Sequence[Tensor]) -> PixelDecoderOutput:
        """Decodes backbone features.

        Args:
            features: (normalized image B x 3 x H x W, C2 s4, C3 s8, C4 s16, C5 s32), H and W multiples of
                `size_divisor`.

        Returns:
            `PixelDecoderOutput` with mask features at s2 and the edge logits.
        """
        image, *pyramid = features
        projections = zip(self.in_projections, pyramid, strict=True)
        p1, p2, p3, p4 = (proj(c) for proj, c in projections)  # B x C at s4, s8, s16, s32
        g = self.conv_avg(pyramid[-1].mean(dim=(2, 3), keepdim=True))  # B x C x 1 x 1
        s4, s3, s2, s1 = self.seb[0](p4), self.seb[1](p3), self.seb[2](p2), self.seb[3](p1)
        d4, d3, u8 = self.cst(g, s4, s3)
        d2, y4 = self.rfb(u8 + s2)
        detail = self.lse(image, s1)  # B x C x H/2 x W/2
        u2 = F.interpolate(
            y4, size=detail.shape[-2:], mode="bilinear", align_corners=False
        )  # B x C x H/2 x W/2
        edge = self.edge_head(u2 + detail)  # B x 1 x H/2 x W/2
        d1 = self.erm(detail, u2)  # B x C x H/2 x W/2
        return PixelDecoderOutput(
            mask_features=self.out[0](d1),
            memories=[self.out[1](d4), self.out[2](d3), self.out[3](d2)],
            edge_logits=edge,
            mask_stride=2,
        )
