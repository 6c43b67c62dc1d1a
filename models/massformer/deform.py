# Behaviour ported from MaSS13K `mmseg/models/decode_heads/mass_decoder.py` (DeformLayer) @ 1afadb9,
# which uses mmcv's ModulatedDeformConv2d; here it is torchvision.ops.deform_conv2d (same 2k^2 offset layout).
"""Modulated deformable convolution (DCNv2) layers.

`deform_conv2d` computes ``torchvision.ops.deform_conv2d`` (with a modulation mask) by one of three
implementations that agree to float rounding (zero outside the map, bilinear inside; tested in float64):

- ``"torchvision"``: the im2col kernel. Used on accelerators and on the meta device (FLOP counting).
- ``"grid_sample"``: bilinear sampling with ``grid_sample`` plus a contraction with the weights. Used for CPU
  training, where torchvision's kernel is ~2x slower forward and ~10x slower backward. Without gradient on a
  large map it samples one tap at a time and never allocates the C_in * k^2 * H * W column buffer (several GB
  at 1/2 resolution of a 4096 x 3072 image).
- ``"embedding_bag"``: per tap, a projection by the tap's weight then ``F.embedding_bag`` over the 4 bilinear
  corners in channels-last rows. Used for CPU inference on large maps (~2x faster than ``grid_sample``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d as tv_deform_conv2d

# On accelerators, im2col buffers above this size (bytes) use the grid-sample path when no gradient is needed.
LOW_MEMORY_BYTES = 256 * 2**20

DeformImpl = Literal["auto", "torchvision", "grid_sample", "embedding_bag"]
# Without gradient on CPU, maps with at least this many output pixels use the embedding-bag path.
EMBEDDING_BAG_MIN_PIXELS = 32768


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    *,
    padding: int,
    impl: DeformImpl = "auto",
) -> Tensor:
    """Stride-1 modulated deformable convolution without bias.

    Args:
        x: B x C_in x H x W input.
        offset: B x 2k^2 x h x w offsets, interleaved (dy, dx) per kernel tap (row-major taps).
        mask: B x k^2 x h x w modulation scalars.
        weight: C_out x C_in x k x k.
        padding: zero padding, k // 2 for a "same" convolution.
        impl: ``"auto"`` picks, on CPU, ``"embedding_bag"`` for large maps without gradient and
            ``"grid_sample"`` otherwise; elsewhere ``"grid_sample"`` for large maps without gradient and
            ``"torchvision"`` otherwise (always on the meta device).

    Returns:
        B x C_out x h x w.
    """
    big = _sample_bytes(x, weight, offset) > LOW_MEMORY_BYTES
    if impl == "auto":
        device = x.device.type
        if device == "meta":
            impl = "torchvision"
        elif device == "cpu":
            large = offset.shape[-2] * offset.shape[-1] >= EMBEDDING_BAG_MIN_PIXELS
            impl = "embedding_bag" if large and not torch.is_grad_enabled() else "grid_sample"
        else:
            impl = "grid_sample" if big and not torch.is_grad_enabled() else "torchvision"
    if impl == "grid_sample":
        per_tap = big and not torch.is_grad_enabled()
        return _deform_conv2d_grid_sample(x, offset, mask, weight, padding=padding, per_tap=per_tap)
    if impl == "embedding_bag":
        return _deform_conv2d_embedding_bag(x, offset, mask, weight, padding=padding)
    if impl == "torchvision":
        return tv_deform_conv2d(x, offset, weight, padding=(padding, padding), mask=mask)
    raise ValueError(
        f"impl must be 'auto', 'torchvision', 'grid_sample' or 'embedding_bag'. Got {impl!r} instead."
    )


def _sample_bytes(x: Tensor, weight: Tensor, offset: Tensor) -> int:
    """Size of the all-taps sampled tensor (the im2col buffer, or its projected form if C_out < C_in)."""
    c_out, c_in, kh, kw = weight.shape
    c = min(c_out, c_in)
    return x.shape[0] * c * kh * kw * offset.shape[-2] * offset.shape[-1] * x.element_size()


def _deform_conv2d_grid_sample(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, *, padding: int, per_tap: bool
) -> Tensor:
    """torchvision's result (zero outside the map, bilinear inside) from ``grid_sample``, to float rounding.

    Bilinear sampling commutes with a per-tap channel map, so when C_out < C_in each tap's weight is applied
    first (a 1x1 conv) and only C_out channels are sampled. ``per_tap`` processes one tap at a time (memory of
    one sampled map instead of k^2); otherwise all taps go through one ``grid_sample`` call (faster for small
    maps).
    """
    c_out, c_in, kh, kw = weight.shape
    taps = kh * kw
    b = x.shape[0]
    out_h, out_w = offset.shape[-2:]
    shift = 0
    if min(x.shape[-2:]) == 1:
        # align_corners=True cannot normalise a size-1 axis; a zero border (size 3) changes no value.
        x = F.pad(x, (1, 1, 1, 1))
        shift = 1
    h, w = x.shape[-2:]
    project_first = c_out < c_in
    # Pixel coordinates of every tap before the learned offsets; align_corners=True maps -1..1 onto pixel
    # centres 0..size-1, so normalising is a scale and a shift.
    ki = torch.arange(kh, device=x.device, dtype=x.dtype).repeat_interleave(kw)  # k^2
    kj = torch.arange(kw, device=x.device, dtype=x.dtype).repeat(kh)  # k^2
    ys = torch.arange(out_h, device=x.device, dtype=x.dtype) + (shift - padding)
    xs = torch.arange(out_w, device=x.device, dtype=x.dtype) + (shift - padding)
    ys = ys.view(1, 1, out_h, 1)  # 1 x 1 x h x 1
    xs = xs.view(1, 1, 1, out_w)  # 1 x 1 x 1 x w
    off = offset.reshape(b, taps, 2, out_h, out_w)  # B x k^2 x (dy, dx) x h x w
    py = ys + ki.view(1, taps, 1, 1) + off[:, :, 0]  # B x k^2 x h x w
    px = xs + kj.view(1, taps, 1, 1) + off[:, :, 1]  # B x k^2 x h x w
    gx = px * (2.0 / (w - 1)) - 1.0
    gy = py * (2.0 / (h - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)  # B x k^2 x h x w x 2, (x, y) order for grid_sample
    w_taps = weight.flatten(2).permute(2, 0, 1)  # k^2 x C_out x C_in

    if per_tap:
        out = x.new_zeros(b, c_out, out_h, out_w)
        for k in range(taps):
            src = F.conv2d(x, w_taps[k, :, :, None, None]) if project_first else x  # B x C x H x W
            sampled = F.grid_sample(
                src, grid[:, k], mode="bilinear", padding_mode="zeros", align_corners=True
            )
            sampled = sampled * mask[:, k : k + 1]  # B x C x h x w (C = C_out or C_in)
            if project_first:
                out += sampled
            else:
                out += torch.einsum("oc,bchw->bohw", w_taps[k], sampled)  # B x C_out x h x w
            del src, sampled
        return out

    if project_first:
        src = F.conv2d(x, w_taps.reshape(taps * c_out, c_in, 1, 1))  # B x (k^2 C_out) x H x W
        src = src.view(b * taps, c_out, h, w)  # (B k^2) x C_out x H x W
        grid = grid.view(b * taps, out_h, out_w, 2)  # (B k^2) x h x w x 2
        sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        sampled = sampled.view(b, taps, c_out, out_h, out_w)  # B x k^2 x C_out x h x w
        sampled = sampled * mask.reshape(b, taps, 1, out_h, out_w)  # mask: B x k^2 x 1 x h x w
        return sampled.sum(dim=1)  # B x C_out x h x w
    # All taps stacked along the grid's rows: one call samples B x C_in x (k^2 h) x w.
    grid = grid.view(b, taps * out_h, out_w, 2)  # B x (k^2 h) x w x 2
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    sampled = sampled * mask.reshape(b, 1, taps * out_h, out_w)  # B x C_in x (k^2 h) x w
    sampled = sampled.view(b, c_in, taps, out_h * out_w)  # B x C_in x k^2 x hw
    out = torch.einsum("ock,bckp->bop", weight.flatten(2), sampled)  # B x C_out x hw
    return out.view(b, c_out, out_h, out_w)  # B x C_out x h x w


def _deform_conv2d_embedding_bag(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, *, padding: int
) -> Tensor:
    """torchvision's result from ``F.embedding_bag``, one tap at a time (CPU inference on large maps).

    Per tap, the input is projected by that tap's weight in channels-last rows (B H W) x C_out, and every
    output pixel is a bag of the 4 bilinear corners with per-sample weights ``bilinear * mask * inside``. The
    bags read contiguous C_out-vectors, which is ~2x faster than ``grid_sample`` on CPU for wide maps.
    """
    b, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    out_h, out_w = offset.shape[-2:]
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c_in)  # (B H W) x C_in
    w_taps = weight.flatten(2).permute(2, 1, 0)  # k^2 x C_in x C_out
    off = offset.reshape(b, taps, 2, out_h, out_w)  # B x k^2 x (dy, dx) x h x w
    ys = torch.arange(out_h, device=x.device, dtype=x.dtype).view(1, out_h, 1) - padding  # 1 x h x 1
    xs = torch.arange(out_w, device=x.device, dtype=x.dtype).view(1, 1, out_w) - padding  # 1 x 1 x w
    base = torch.arange(b, device=x.device).view(b, 1, 1) * (h * w)  # B x 1 x 1 row offset per image
    out = x.new_zeros(b * out_h * out_w, c_out)  # (B h w) x C_out
    for k in range(taps):
        i, j = divmod(k, kw)
        py = ys + i + off[:, k, 0]  # B x h x w
        px = xs + j + off[:, k, 1]  # B x h x w
        y0, x0 = py.floor(), px.floor()
        fy, fx = py - y0, px - x0
        y0l, x0l = y0.long(), x0.long()
        indices, weights = [], []
        for dy, wy in ((0, 1 - fy), (1, fy)):
            yy = y0l + dy
            inside_y = (yy >= 0) & (yy < h)
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xx = x0l + dx
                inside = inside_y & (xx >= 0) & (xx < w)
                indices.append(base + yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1))
                weights.append(wy * wx * mask[:, k] * inside)
        idx = torch.stack(indices, dim=-1).view(-1, 4)  # (B h w) x 4 corner rows
        per_sample = torch.stack(weights, dim=-1).view(-1, 4)  # (B h w) x 4
        src = rows @ w_taps[k]  # (B H W) x C_out
        out += F.embedding_bag(idx, src, per_sample_weights=per_sample, mode="sum")
        del src, idx, per_sample, indices, weights
    return out.view(b, out_h, out_w, c_out).permute(0, 3, 1, 2)  # B x C_out x h x w (channels-last memory)


def bilinear_deconv_init_(weight: Tensor) -> None:
    """Bilinear init of a ConvTranspose2d weight, written only into output channel 0 as in the reference.

    The reference (CenterNet's ``fill_up_weights``) was written for depthwise deconvs; with groups=1 it fills
    ``w[c, 0]`` for every input channel c and leaves the other output channels at their default init. Kept as
    written so that training starts from the same distribution.
    """
    f = math.ceil(weight.size(2) / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    with torch.no_grad():
        for i in range(weight.size(2)):
            for j in range(weight.size(3)):
                weight[0, 0, i, j] = (1 - math.fabs(i / f - c)) * (1 - math.fabs(j / f - c))
        weight[1:, 0] = weight[0, 0]


class DeformLayer(nn.Module):
    """DCNv2 -> BN -> ReLU, optionally followed by a 2x transposed-conv upsampling -> BN -> ReLU.

    The offset/mask conv is zero-initialised, so training starts from a plain conv with mask sigmoid(0) = 0.5.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        upsample: bool = False,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        """Builds the layer.

        Args:
            in_channels: input channels.
            out_channels: output channels (also of the upsampling branch).
            kernel_size: odd kernel size k; padding is k // 2.
            upsample: add the ConvTranspose2d(4, stride 2, pad 1) branch and return (x, x_up).
            norm_layer: normalization after the DCN and after the upsampling.
        """
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        # 3k^2 channels: dy/dx interleaved offsets (2k^2) then the modulation logits (k^2).
        self.offset_conv = nn.Conv2d(in_channels, 3 * kernel_size**2, kernel_size, padding=self.padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.norm = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.up: nn.ConvTranspose2d | None
        self.up_norm: nn.Module | None
        if upsample:
            self.up = nn.ConvTranspose2d(out_channels, out_channels, 4, stride=2, padding=1, bias=False)
            self.up_norm = norm_layer(out_channels)
            bilinear_deconv_init_(self.up.weight)
        else:
            self.up = None
            self.up_norm = None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)  # type: ignore[arg-type]  # built with bias=True

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Applies the layer.

        Args:
            x: B x C_in x h x w.

        Returns:
            B x C_out x h x w, or (that, B x C_out x 2h x 2w) when built with ``upsample=True``.
        """
        k2 = self.kernel_size**2
        offset_mask = self.offset_conv(x)  # B x 3k^2 x h x w
        offset = offset_mask[:, : 2 * k2]  # B x 2k^2 x h x w
        mask = offset_mask[:, 2 * k2 :].sigmoid()  # B x k^2 x h x w
        x = deform_conv2d(x, offset, mask, self.weight, padding=self.padding)
        x = self.relu(self.norm(x))
        if self.up is None or self.up_norm is None:
            return x
        x_up = self.relu(self.up_norm(self.up(x)))  # B x C_out x 2h x 2w
        return x, x_up
