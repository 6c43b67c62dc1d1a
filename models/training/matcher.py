"""Hungarian matching between predicted queries and ground-truth segments, on sampled points.

After Mask2Former's ``HungarianMatcher`` (facebookresearch/Mask2Former ``mask2former/modeling/matcher.py``)
with the MaSSFormer settings (docs/design.md §2.1): costs class 2, sigmoid BCE 5, dice 5 (eps 1), on
``num_points`` (`models.release.NUM_POINTS`) uniform random points per image, shared by all queries and all ground-truth masks of
that image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from addclass.models import release
from addclass.models.training.point_sample import PointRng, image_generator, point_sample, uniform_points


def batch_class_cost(pred_logits: Tensor, tgt_labels: Tensor) -> Tensor:
    """Classification cost ``-p(class)``, the usual approximation of the NLL.

    Args:
        pred_logits: Q x (K+1) class logits.
        tgt_labels: G int64 class ids.

    Returns:
        Q x G cost.
    """
    prob = pred_logits.float().softmax(-1)  # Q x (K+1)
    return -prob[:, tgt_labels]  # Q x G


def batch_sigmoid_ce_cost(pred: Tensor, tgt: Tensor) -> Tensor:
    """Mean sigmoid BCE between every prediction and every target, over points.

    Args:
        pred: Q x P mask logits at the sampled points.
        tgt: G x P target values in [0, 1] at the same points.

    Returns:
        Q x G cost.
    """
    pred = pred.float()
    tgt = tgt.float()
    num_points = pred.shape[1]
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")  # Q x P
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")  # Q x P
    cost = torch.einsum("qp,gp->qg", pos, tgt) + torch.einsum("qp,gp->qg", neg, 1.0 - tgt)  # Q x G
    return cost / num_points


def batch_dice_cost(pred: Tensor, tgt: Tensor, *, eps: float = 1.0) -> Tensor:
    """Naive dice cost ``1 - (2 |p t| + eps) / (|p| + |t| + eps)`` with ``p = sigmoid(pred)``.

    Args:
        pred: Q x P mask logits at the sampled points.
        tgt: G x P target values in [0, 1] at the same points.
        eps: Smoothing term (MaSSFormer's default: 1).

    Returns:
        Q x G cost.
    """
    prob = pred.float().sigmoid()
    tgt = tgt.float()
    numerator = 2.0 * torch.einsum("qp,gp->qg", prob, tgt)  # Q x G
    denominator = prob.sum(-1)[:, None] + tgt.sum(-1)[None, :]  # Q x G
    return 1.0 - (numerator + eps) / (denominator + eps)


def matching_cost(
    pred_logits: Tensor,
    pred_masks: Tensor,
    tgt_labels: Tensor,
    tgt_masks: Tensor,
    point_coords: Tensor,
    *,
    cost_class: float = 2.0,
    cost_mask: float = 5.0,
    cost_dice: float = 5.0,
) -> Tensor:
    """Total matching cost of one image on given points.

    Args:
        pred_logits: Q x (K+1) class logits.
        pred_masks: Q x h x w mask logits (any resolution).
        tgt_labels: G class ids.
        tgt_masks: G x H x W binary masks (any resolution).
        point_coords: P x 2 normalized ``(x, y)`` points, shared by predictions and targets.
        cost_class: Weight of the class cost.
        cost_mask: Weight of the sigmoid BCE cost.
        cost_dice: Weight of the dice cost.

    Returns:
        Q x G cost matrix (float32).
    """
    coords = point_coords.float()[None]  # 1 x P x 2
    # One sample call with the masks as channels samples every mask at the same points.
    pred_pts = point_sample(pred_masks.float()[None], coords)[0]  # Q x P
    tgt_pts = point_sample(tgt_masks.float()[None], coords)[0]  # G x P
    return (
        cost_class * batch_class_cost(pred_logits, tgt_labels)
        + cost_mask * batch_sigmoid_ce_cost(pred_pts, tgt_pts)
        + cost_dice * batch_dice_cost(pred_pts, tgt_pts)
    )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments, per image.

    Args:
        cost_class: Weight of the class cost (MaSSFormer's default: 2).
        cost_mask: Weight of the sigmoid BCE cost (MaSSFormer's default: 5).
        cost_dice: Weight of the dice cost (MaSSFormer's default: 5).
        num_points: Uniform random points per image (MaSSFormer's default: `models.release.NUM_POINTS`).
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = release.NUM_POINTS,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("Expected at least one non-zero matching cost. Got all three 0 instead.")
        if num_points < 1:
            raise ValueError(f"Expected num_points >= 1. Got {num_points} instead.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        *,
        point_coords: Sequence[Tensor] | None = None,
        generator: PointRng = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Matches one decoder output against the targets.

        Runs in fp32 with autocast off, without gradient.

        Args:
            outputs: ``pred_logits`` B x Q x (K+1) and ``pred_masks`` B x Q x h x w.
            targets: B dicts with ``labels`` (G) and ``masks`` (G x H x W).
            point_coords: Optional B tensors of P x 2 points (tests); random uniform points otherwise.
            generator: Optional RNG for the random points: one generator, or one per image.

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors of length min(Q, G), so that query
            ``query_idx[i]`` is matched to ground truth ``target_idx[i]``; sorted by query index.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"Expected {pred_logits.shape[0]} targets. Got {len(targets)} instead.")
        indices: list[tuple[Tensor, Tensor]] = []
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            for b, tgt in enumerate(targets):
                labels = tgt["labels"]
                if labels.numel() == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                if point_coords is not None:
                    coords = point_coords[b].to(pred_masks.device)
                else:
                    coords = uniform_points((self.num_points, 2), device=pred_masks.device,
                                            generator=image_generator(generator, b))
                cost = matching_cost(
                    pred_logits[b], pred_masks[b], labels, tgt["masks"], coords,
                    cost_class=self.cost_class, cost_mask=self.cost_mask, cost_dice=self.cost_dice,
                )  # Q x G
                if not torch.isfinite(cost).all():
                    raise FloatingPointError(f"Non-finite matching cost for image {b} (NaN/inf outputs?).")
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append(
                    (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                )
        return indices
