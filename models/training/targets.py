"""Per-image training targets for the set criterion, built from a semantic label map.

The target dict (``docs/interfaces.md``) holds one binary mask per class present, the per-class
``is_pseudo`` flag that selects the loss weights (docs/design.md §2.8), the union of the pseudo-class pixels
(for the near-pseudo band) and the 2-px semantic edge map for the edge loss (docs/design.md §2.6).

Ignore pixels (``ignore_index``, 255) are in no class mask, so every predicted mask is pushed to 0 there, as
in the reference code (mmdet/Mask2Former semantic targets). In the edge target they are 255, i.e. excluded
from the edge loss: the reference only has 255 in padding, but our label maps also carry 255 "ignore" pixels
inside images, whose boundary status is unknown.
"""

from __future__ import annotations

from collections.abc import Set

import torch
import torch.nn.functional as F
from torch import Tensor

EDGE_IGNORE = 255


def generate_edge(label_map: Tensor, *, edge_width: int = 2, ignore_index: int = 255) -> Tensor:
    """Semantic boundary map, the behaviour of mmseg ``GenerateEdge`` (docs/design.md §2.6).

    A pixel ``(i, j)`` is marked when its label differs from one of the neighbours the mmseg code compares it
    with (its variable names in brackets): ``(i-1, j)`` ["down"], ``(i, j+1)`` ["left"], ``(i+1, j+1)``
    ["up-left"] and ``(i+1, j-1)`` ["up-right"], provided neither label is ``ignore_index``. The marks are
    then dilated with an ``edge_width`` x ``edge_width`` rectangle anchored like ``cv2.dilate``'s default
    (anchor ``edge_width // 2``; for width 2 a mark spreads one pixel down and right).

    Args:
        label_map: H x W integer labels.
        edge_width: Side of the square structuring element.
        ignore_index: Label never compared.

    Returns:
        H x W uint8 map in {0, 1}. Ignore pixels are not set to 255 here (see ``build_targets``).
    """
    if label_map.dim() != 2:
        raise ValueError(f"Expected an H x W label map. Got shape {tuple(label_map.shape)} instead.")
    if edge_width < 1:
        raise ValueError(f"Expected edge_width >= 1. Got {edge_width} instead.")
    lab = label_map.long()
    valid = lab != ignore_index
    marks = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
    # (i, j) vs (i-1, j)
    marks[1:, :] |= (lab[1:, :] != lab[:-1, :]) & valid[1:, :] & valid[:-1, :]
    # (i, j) vs (i, j+1)
    marks[:, :-1] |= (lab[:, :-1] != lab[:, 1:]) & valid[:, :-1] & valid[:, 1:]
    # (i, j) vs (i+1, j+1)
    marks[:-1, :-1] |= (lab[:-1, :-1] != lab[1:, 1:]) & valid[:-1, :-1] & valid[1:, 1:]
    # (i, j) vs (i+1, j-1)
    marks[:-1, 1:] |= (lab[:-1, 1:] != lab[1:, :-1]) & valid[:-1, 1:] & valid[1:, :-1]

    # cv2.dilate with a k x k rectangle and anchor a = k // 2: out(i, j) = max over src(i+dy, j+dx),
    # dy, dx in [-a, k-1-a]. Zero padding is neutral for a max over {0, 1}.
    a = edge_width // 2
    b = edge_width - 1 - a
    m = marks.float()[None, None]  # 1 x 1 x H x W
    m = F.pad(m, (a, b, a, b))  # 1 x 1 x (H+k-1) x (W+k-1)
    dilated = F.max_pool2d(m, kernel_size=edge_width, stride=1)[0, 0]  # H x W
    return dilated.to(torch.uint8)


def build_targets(
    label_map: Tensor,
    *,
    pseudo_classes: Set[int],
    ignore_index: int = 255,
    pad_mask: Tensor | None = None,
    edge_width: int = 2,
    reviewed: Tensor | None = None,
) -> dict[str, Tensor]:
    """Builds the per-image target dict of ``docs/interfaces.md``.

    Args:
        label_map: H x W integer label map (uint8 or int64); ``ignore_index`` marks ignore pixels.
        pseudo_classes: Class ids whose labels come from a pseudo labeler (``is_pseudo`` in the store
            registry).
        ignore_index: Label of ignore pixels.
        pad_mask: Optional H x W bool, True on padding. Padding is treated as ignore: in no class mask and
            255 in the edge target, whatever its label value.
        edge_width: Width of the edge target (MaSSFormer's default: 2).
        reviewed: Optional H x W bool, True on pixels a person reviewed (provenance 3): they are left out of
            ``pseudo_region``, so the loss weights treat them like precise pixels.

    Returns:
        A dict on ``label_map``'s device with
        ``labels`` (G int64, sorted class ids present, ignore excluded),
        ``masks`` (G x H x W float32, 1 where label == class),
        ``is_pseudo`` (G bool),
        ``pseudo_region`` (H x W bool, union of the pseudo-class pixels not reviewed),
        ``reviewed`` (H x W bool) and
        ``edge`` (H x W uint8 in {0, 1, 255}; 255 on ignore and padding pixels).
    """
    if label_map.dim() != 2:
        raise ValueError(f"Expected an H x W label map. Got shape {tuple(label_map.shape)} instead.")
    if label_map.is_floating_point() or label_map.dtype == torch.bool:
        raise ValueError(f"Expected an integer label map. Got dtype {label_map.dtype} instead.")
    lab = label_map.long()
    if pad_mask is not None:
        if pad_mask.shape != lab.shape:
            raise ValueError(
                f"Expected pad_mask of shape {tuple(lab.shape)}. Got {tuple(pad_mask.shape)} instead."
            )
        lab = lab.masked_fill(pad_mask.to(device=lab.device, dtype=torch.bool), ignore_index)
    ignore = lab == ignore_index

    labels = torch.unique(lab)  # sorted
    labels = labels[labels != ignore_index]  # G
    masks = (lab[None] == labels[:, None, None]).float()  # G x H x W
    pseudo = sorted(int(c) for c in pseudo_classes)
    is_pseudo = torch.tensor([int(c) in pseudo_classes for c in labels.tolist()], dtype=torch.bool,
                             device=lab.device)
    if reviewed is None:
        reviewed = torch.zeros(lab.shape, dtype=torch.bool, device=lab.device)
    elif reviewed.shape != lab.shape:
        raise ValueError(f"Expected reviewed of shape {tuple(lab.shape)}. Got {tuple(reviewed.shape)} instead.")
    reviewed = reviewed.to(device=lab.device, dtype=torch.bool) & ~ignore
    pseudo_region = torch.isin(lab, torch.tensor(pseudo, dtype=torch.long, device=lab.device)) & ~ignore & ~reviewed

    edge = generate_edge(lab, edge_width=edge_width, ignore_index=ignore_index)
    edge = edge.masked_fill(ignore, EDGE_IGNORE)
    return {
        "labels": labels,
        "masks": masks,
        "is_pseudo": is_pseudo,
        "pseudo_region": pseudo_region,
        "reviewed": reviewed,
        "edge": edge,
    }
