# Same values as mmdet 3.x `SinePositionalEncoding(num_feats, normalize=True)` with an all-zero padding mask,
# which is how both MaSSFormer's CSAttn and its Mask2Former head call it.
"""Normalized 2D sine positional encoding (DETR / Mask2Former)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_encoding(
    height: int,
    width: int,
    *,
    num_feats: int,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    eps: float = 1e-6,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sine/cosine encoding of normalized (y, x) positions.

    Args:
        height: grid height h.
        width: grid width w.
        num_feats: features per axis; the output has 2 * num_feats channels (y features first, then x).
        temperature: frequency base.
        scale: positions are normalized to (0, scale].
        eps: added to the normalizer, as in mmdet.
        device: device of the result.
        dtype: dtype of the result.

    Returns:
        1 x (2 * num_feats) x h x w.
    """
    y_embed = torch.arange(1, height + 1, device=device, dtype=torch.float32)  # h
    x_embed = torch.arange(1, width + 1, device=device, dtype=torch.float32)  # w
    y_embed = y_embed / (height + eps) * scale
    x_embed = x_embed / (width + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # num_feats
    pos_y = y_embed[:, None] / dim_t  # h x F
    pos_x = x_embed[:, None] / dim_t  # w x F
    # Interleave sin (even features) and cos (odd features): h x F/2 x 2 -> h x F.
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # h x F
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # w x F
    pos = torch.cat(
        (
            pos_y[:, None, :].expand(height, width, num_feats),  # h x w x F
            pos_x[None, :, :].expand(height, width, num_feats),  # h x w x F
        ),
        dim=2,
    )  # h x w x 2F
    return pos.permute(2, 0, 1).unsqueeze(0).to(dtype)  # 1 x 2F x h x w
