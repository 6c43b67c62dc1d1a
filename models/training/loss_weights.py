"""Per-pixel weight maps for the mask BCE loss (docs/design.md §2.3, §2.4, §2.8).

``W = |avgpool_5x5(G) - G|`` (zero padding counted) is the edge map of one ground-truth mask G: 0 away from
edges, 0.4 / 0.2 on the first / second pixel on each side of a straight edge, up to 0.96 on an isolated pixel,
and non-zero along the image border of a positive mask. From it:

- ``reweight="none"``: weight 1 everywhere (vanilla Mask2Former; no edge term in the point sampling either).
- ``reweight="edge"``: ``1 + lambda * W`` for every class (the released MaSSFormer loss, lambda = 5).
- ``reweight="inverse"`` (our decision): ``1 + lambda * W`` for precise classes, ``1 - W`` for
  pseudo-labelled classes. With ``inverse_weight_near_pseudo`` (default on) a precise mask also gets ``1 - W``
  on pixels within ``near_pseudo_radius`` px (chessboard distance, i.e. a 5 x 5 square for 2 px) of any
  pseudo-class pixel, because a boundary shared with a pseudo region comes from the pseudo mask.

The weight map covers every pixel of the image, on both sides of the mask boundary (W is two-sided), so
"pixels near a pseudo region" includes the pseudo region itself (distance 0).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from addclass.common.errors import InputError

ReweightMode = Literal["none", "edge", "inverse"]
REWEIGHT_MODES: tuple[str, ...] = get_args(ReweightMode)


def parse_reweight_mode(mode: str) -> ReweightMode:
    """Validates a reweight mode name.

    Args:
        mode: One of ``"none"``, ``"edge"``, ``"inverse"``.

    Returns:
        The same string, typed.

    Raises:
        ValueError: Quoting the bad value.
    """
    if mode not in REWEIGHT_MODES:
        raise InputError(f"Expected reweight mode in {REWEIGHT_MODES}. Got {mode!r} instead.")
    return mode  # type: ignore[return-value]


def edge_weight_map(masks: Tensor, *, kernel_size: int = 5) -> Tensor:
    """``W = |avgpool_k(G) - G|`` per mask, zero padding counted in the average (docs/design.md §2.3).

    Args:
        masks: N x H x W binary masks (any dtype).
        kernel_size: Odd pooling window k (MaSSFormer's default: 5).

    Returns:
        N x H x W float32 edge weights in ``[0, 1]``.
    """
    if kernel_size % 2 != 1:
        raise InputError(f"Expected an odd kernel_size. Got {kernel_size} instead.")
    g = masks.float().unsqueeze(1)  # N x 1 x H x W
    avg = F.avg_pool2d(g, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    return (avg - g).abs().squeeze(1)  # N x H x W


def dilate_chessboard(region: Tensor, *, radius: int) -> Tensor:
    """Pixels within ``radius`` px (chessboard distance) of ``region``, the region itself included.

    Args:
        region: H x W bool.
        radius: Dilation radius r; the structuring element is a (2r+1) x (2r+1) square.

    Returns:
        H x W bool.
    """
    if radius < 0:
        raise InputError(f"Expected radius >= 0. Got {radius} instead.")
    if radius == 0:
        return region.bool()
    r = region.float()[None, None]  # 1 x 1 x H x W
    near = F.max_pool2d(r, kernel_size=2 * radius + 1, stride=1, padding=radius)  # 1 x 1 x H x W
    return near[0, 0] > 0


def bce_weight_map(
    masks: Tensor,
    *,
    is_pseudo: Tensor,
    pseudo_region: Tensor,
    mode: ReweightMode,
    edge_weights: Tensor | None = None,
    edge_lambda: float = 5.0,
    inverse_weight_near_pseudo: bool = True,
    near_pseudo_radius: int = 2,
    kernel_size: int = 5,
    reviewed: Tensor | None = None,
) -> Tensor:
    """Per-pixel BCE weights for the ground-truth masks of one image (docs/design.md §2.4, §2.8).

    Args:
        masks: G x H x W binary masks.
        is_pseudo: G bool, True for pseudo-labelled classes.
        pseudo_region: H x W bool, union of the pseudo-class pixels.
        mode: ``"none"``, ``"edge"`` or ``"inverse"`` (module docstring).
        edge_weights: Optional precomputed ``edge_weight_map(masks)`` (G x H x W).
        edge_lambda: lambda in ``1 + lambda * W`` (MaSSFormer's default: 5).
        inverse_weight_near_pseudo: In ``"inverse"`` mode, give precise masks ``1 - W`` near pseudo pixels.
        near_pseudo_radius: Chessboard radius of that band (2 px).
        kernel_size: Pooling window of W when ``edge_weights`` is not given.
        reviewed: Optional H x W bool: pixels a person reviewed; in ``"inverse"`` mode a pseudo class's mask is
            weighted like a precise one (``1 + lambda * W``) there and within ``kernel_size // 2`` of them (the
            reach of W: both sides of a reviewed edge).

    Returns:
        G x H x W float32 weights.
    """
    mode = parse_reweight_mode(mode)
    if mode == "none":
        return torch.ones(masks.shape, dtype=torch.float32, device=masks.device)
    w_edge = edge_weights if edge_weights is not None else edge_weight_map(masks, kernel_size=kernel_size)
    boosted = 1.0 + edge_lambda * w_edge  # G x H x W
    if mode == "edge":
        return boosted
    inverse = 1.0 - w_edge  # G x H x W
    use_inverse = is_pseudo.to(device=masks.device, dtype=torch.bool)[:, None, None]  # G x 1 x 1
    if reviewed is not None and bool(reviewed.any()):
        trusted = dilate_chessboard(reviewed.to(device=masks.device, dtype=torch.bool), radius=kernel_size // 2)
        use_inverse = use_inverse & ~trusted[None]  # G x H x W
    if inverse_weight_near_pseudo:
        near = dilate_chessboard(pseudo_region.to(masks.device), radius=near_pseudo_radius)  # H x W
        use_inverse = use_inverse | near[None]  # G x H x W
    return torch.where(use_inverse, inverse, boosted)
