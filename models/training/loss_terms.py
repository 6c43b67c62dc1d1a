"""The loss terms of the MaSSFormer criterion (`models.training.criterion.SetCriterion`): softmax CE over the
queries, point-sampled weighted BCE and dice on matched masks, the edge BCE and SeMask's semantic-prior CE.

Each is a plain function of logits and targets, unweighted by its loss weight; docs/design.md §2 gives the
project decisions they follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from addclass.models.training.targets import EDGE_IGNORE


def classification_loss(pred_logits: Tensor, target_classes: Tensor, class_weights: Tensor,
                        weight_sum: float | None = None) -> Tensor:
    """Softmax cross-entropy over all queries, weighted mean by class weight.

    Equals ``sum_i c[y_i] * CE_i / sum_i c[y_i]``, as mmdet's ``avg_factor=class_weight[labels].sum()`` and
    Mask2Former's ``F.cross_entropy(..., weight)``.

    Args:
        pred_logits: B x Q x (K+1) logits.
        target_classes: B x Q int64 class ids, K (no-object) for unmatched queries.
        class_weights: (K+1) weights, the last one the no-object weight.
        weight_sum: The denominator ``sum_i c[y_i]`` when it is counted over more than these images (a batch
            split over processes or micro-batches, `LossNormalizers`); None: over these.

    Returns:
        Scalar loss (unweighted by the loss weight).
    """
    logits = pred_logits.float().transpose(1, 2)  # B x (K+1) x Q
    if weight_sum is None:
        return F.cross_entropy(logits, target_classes, weight=class_weights.float())
    return F.cross_entropy(logits, target_classes, weight=class_weights.float(), reduction="sum") / weight_sum


def weighted_sigmoid_ce_loss(
    point_logits: Tensor, point_labels: Tensor, point_weights: Tensor | None, num_masks: float
) -> Tensor:
    """``sum_p w_p * BCE(logit_p, label_p) / (num_masks * P)`` (docs/design.md §2.4).

    The denominator is not the sum of the weights, so the weights also raise the overall scale (as released).

    Args:
        point_logits: N x P mask logits at the sampled points.
        point_labels: N x P targets in [0, 1] at the same points.
        point_weights: N x P weights, or ``None`` for all ones.
        num_masks: Number of ground-truth masks in the batch (>= 1).

    Returns:
        Scalar loss.
    """
    loss = F.binary_cross_entropy_with_logits(point_logits.float(), point_labels.float(), reduction="none")
    if point_weights is not None:
        loss = loss * point_weights.float()
    return loss.mean(1).sum() / num_masks


def dice_loss(point_logits: Tensor, point_labels: Tensor, num_masks: float, *, eps: float = 1.0) -> Tensor:
    """Naive dice ``1 - (2 |p t| + eps) / (|p| + |t| + eps)`` per mask, summed, divided by ``num_masks``.

    Args:
        point_logits: N x P mask logits at the sampled points.
        point_labels: N x P targets in [0, 1] at the same points.
        num_masks: Number of ground-truth masks in the batch (>= 1).
        eps: Smoothing term (MaSSFormer's default: 1).

    Returns:
        Scalar loss.
    """
    prob = point_logits.float().sigmoid()
    labels = point_labels.float()
    numerator = 2.0 * (prob * labels).sum(-1)  # N
    denominator = prob.sum(-1) + labels.sum(-1)  # N
    return (1.0 - (numerator + eps) / (denominator + eps)).sum() / num_masks


def edge_loss(
    edge_logits: Tensor, edge_targets: Sequence[Tensor], *, ignore_value: int = EDGE_IGNORE,
    num_pixels: float | None = None,
) -> Tensor:
    """BCE between upsampled edge logits and ``edge == 1``, mean over the non-ignored pixels of the batch.

    Args:
        edge_logits: B x 1 x h x w edge logits (1/2 resolution).
        edge_targets: B maps H x W uint8 in {0, 1, ignore_value}; the logits are upsampled bilinearly
            (``align_corners=False``) to each map's size.
        ignore_value: Target value excluded from the mean (padding and ignore pixels).
        num_pixels: The denominator when it is counted over more than these images (`LossNormalizers`);
            None: the valid pixels of these.

    Returns:
        Scalar loss (0, with gradient, when no pixel is valid).
    """
    if len(edge_targets) != edge_logits.shape[0]:
        raise ValueError(f"Expected {edge_logits.shape[0]} edge targets. Got {len(edge_targets)} instead.")
    total = edge_logits.new_zeros((), dtype=torch.float32)
    count = edge_logits.new_zeros((), dtype=torch.float32)
    for b, tgt in enumerate(edge_targets):
        tgt = tgt.to(edge_logits.device)
        up = F.interpolate(
            edge_logits[b : b + 1].float(), size=tuple(tgt.shape[-2:]), mode="bilinear", align_corners=False
        )[0, 0]  # H x W
        valid = tgt != ignore_value  # H x W
        bce = F.binary_cross_entropy_with_logits(up, (tgt == 1).float(), reduction="none")  # H x W
        total = total + (bce * valid).sum()
        count = count + valid.sum()
    if num_pixels is not None:
        return total / max(num_pixels, 1.0)
    return total / count.clamp(min=1.0)


def semantic_loss(
    logits: Tensor, targets: Sequence[Mapping[str, Tensor]], *, num_pixels: float | None = None
) -> Tensor:
    """Softmax cross-entropy of per-pixel class logits against each target's class map, mean over the labelled
    pixels of the batch (SeMask's semantic-prior loss; mmseg's CE with ``ignore_index``).

    The class map is rebuilt from ``labels`` and ``masks``: pixels in no mask (ignore, padding) are left out.

    Args:
        logits: B x K x h x w; upsampled bilinearly (``align_corners=False``) to each target's size.
        targets: B target dicts with ``labels`` (G) and ``masks`` (G x H x W).
        num_pixels: The denominator when it is counted over more than these images (`LossNormalizers`: the
            edge target's valid pixels, which are exactly the labelled ones); None: the labelled pixels of these.

    Returns:
        Scalar loss (0, with gradient, when no pixel is labelled).
    """
    if len(targets) != logits.shape[0]:
        raise ValueError(f"Expected {logits.shape[0]} targets. Got {len(targets)} instead.")
    total = logits.new_zeros((), dtype=torch.float32)
    count = 0
    for b, tgt in enumerate(targets):
        masks = tgt["masks"].to(logits.device)  # G x H x W
        labels = tgt["labels"].to(logits.device)  # G
        class_map = torch.full(masks.shape[-2:], -100, dtype=torch.int64, device=logits.device)  # H x W
        for g in range(masks.shape[0]):
            class_map[masks[g] > 0.5] = labels[g]
        up = F.interpolate(
            logits[b : b + 1].float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False
        )  # 1 x K x H x W
        total = total + F.cross_entropy(up, class_map[None], ignore_index=-100, reduction="sum")
        count += int((class_map != -100).sum())
    if num_pixels is not None:
        return total / max(num_pixels, 1.0)
    return total / max(count, 1)
