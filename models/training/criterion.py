"""MaSSFormer training losses: set criterion with deep supervision, reweighted point losses and the edge loss.

After Mask2Former's ``SetCriterion`` (facebookresearch/Mask2Former ``mask2former/modeling/criterion.py``)
and the MaSSFormer head (xiechenxi99/MaSS13K ``massformer_head.py``), with the project decisions of
docs/design.md §2:

- per decoder output (the last one plus every ``aux_outputs`` entry): softmax CE x2 (no-object weight 0.1),
  point-sampled weighted BCE x5 and dice x5 on the Hungarian-matched masks;
- once, on ``pred_edge``: BCE x10 against the intended edge target ``edge == 1``, pixels with ``edge == 255``
  excluded from the mean (the released code's target is the constant 1, docs/design.md §2.6);
- BCE point weights from ``models.training.loss_weights`` (``reweight`` = ``"none"`` / ``"edge"`` /
  ``"inverse"``), and importance sampling on ``-|logit| * (1 - W)`` (docs/design.md §2.5; plain ``-|logit|``
  when ``reweight="none"``);
- SeMask FPN only (docs/design.md §1.9), keys other models' outputs do not have: with ``query_classes`` the
  segment of class k goes to the query of class k (no Hungarian matching), the query of a class absent from the
  image gets an empty target mask (`with_every_class`), and the class loss, a constant of the fixed class head,
  is left out; with ``aux_semantic``, once, softmax CE x0.4 of those logits against the class
  map (unweighted by the point weights), mean over the labelled pixels.

Ground-truth masks stay at full target resolution; the predicted masks (1/2 or 1/4) and the targets are
read at the same normalized points, as in the reference. The loss terms themselves are in
`models.training.loss_terms`; this module matches, samples the points and weighs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from addclass.common.errors import InputError
from addclass.models import release
from addclass.models.training.loss_terms import (
    classification_loss,
    dice_loss,
    edge_loss,
    semantic_loss,
    weighted_sigmoid_ce_loss,
)
from addclass.models.training.loss_weights import (
    ReweightMode,
    bce_weight_map,
    edge_weight_map,
    parse_reweight_mode,
)
from addclass.models.training.matcher import HungarianMatcher
from addclass.models.training.point_sample import (
    PointRng,
    image_generator,
    point_sample,
    uncertain_point_coords_with_randomness,
)
from addclass.models.training.targets import EDGE_IGNORE

LOSS_NAMES: tuple[str, ...] = ("labels", "masks", "edge", "semantic")


def class_assignment(
    query_classes: Tensor, targets: Sequence[Mapping[str, Tensor]]
) -> list[tuple[Tensor, Tensor]]:
    """Assigns each target segment to the query of its class (fixed per-class heads, `query_classes`).

    Args:
        query_classes: Q int64, the class of each query.
        targets: B dicts with ``labels`` (G, distinct class ids).

    Returns:
        B pairs ``(query_idx, target_idx)`` of int64 CPU tensors, sorted by query index, as the matcher's.
    """
    owner = {int(c): q for q, c in enumerate(query_classes.tolist())}
    indices = []
    for tgt in targets:
        labels = [int(c) for c in tgt["labels"].tolist()]
        if len(set(labels)) != len(labels) or any(c not in owner for c in labels):
            raise InputError(f"Expected distinct target labels, each owned by a query. Got {labels} instead.")
        pairs = sorted((owner[c], g) for g, c in enumerate(labels))
        indices.append((torch.tensor([q for q, _ in pairs], dtype=torch.int64),
                        torch.tensor([g for _, g in pairs], dtype=torch.int64)))
    return indices


def with_every_class(target: Mapping[str, Tensor], query_classes: Tensor) -> dict[str, Tensor]:
    """``target`` with an empty segment (all-zero mask, not pseudo) for every query class it lacks, so that the
    fixed per-class queries of a class absent from the image are trained towards an empty mask (a per-class
    sigmoid segmentation loss: what softmax CE over the classes does for a per-pixel model). Other keys are
    unchanged; segments stay sorted by class."""
    labels = target["labels"]
    present = set(labels.tolist())
    absent = [int(c) for c in query_classes.tolist() if int(c) not in present]
    if not absent:
        return dict(target)
    masks = target["masks"]  # G x H x W
    all_labels = torch.cat([labels, torch.tensor(absent, dtype=labels.dtype, device=labels.device)])
    order = torch.argsort(all_labels)
    empty = masks.new_zeros((len(absent), *masks.shape[-2:]))  # A x H x W
    is_pseudo = target["is_pseudo"]
    return {
        **target,
        "labels": all_labels[order],
        "masks": torch.cat([masks, empty])[order],  # K x H x W
        "is_pseudo": torch.cat([is_pseudo, is_pseudo.new_zeros(len(absent))])[order],
    }


class LossNormalizers(NamedTuple):
    """The denominators of the batch-mean losses. A batch split over processes (DDP) or micro-batches (gradient
    accumulation) counts them over the whole batch (`SetCriterion.count`, summed), so that the gradients summed
    over the parts equal those of the batch in one piece; DDP, which averages gradients over processes, passes
    them divided by the number of processes."""

    num_masks: float  # ground-truth masks (>= 1)
    class_weight: float  # sum over queries of the class weight of their target (matched class or no-object)
    edge_pixels: float  # valid edge-target pixels


class PreparedTarget(NamedTuple):
    """One image's full-resolution maps, computed once for all decoder layers."""

    masks: Tensor  # G x H x W, float
    edge_w: Tensor | None  # G x H x W edge weights (None without reweighting)
    bce_dev: Tensor | None  # G x H x W, BCE weight minus 1 (None without reweighting)


class SetCriterion(nn.Module):
    """Matches every decoder output to the ground truth and returns the weighted named losses.

    Args:
        num_classes: K, the number of real classes; logits have K+1 entries (the last is no-object).
        matcher: The Hungarian matcher.
        class_weight: Weight of the classification loss (MaSSFormer's default: 2).
        mask_weight: Weight of the point BCE loss (MaSSFormer's default: 5).
        dice_weight: Weight of the dice loss (MaSSFormer's default: 5).
        edge_weight: Weight of the edge loss (MaSSFormer's default: 10), applied once.
        no_object_weight: CE class weight of the no-object class (MaSSFormer's default: 0.1).
        losses: Subset of ``("labels", "masks", "edge", "semantic")``. ``"edge"`` is skipped for outputs whose
            ``pred_edge`` is None (the fpn baseline), ``"semantic"`` for outputs without ``aux_semantic`` (all
            but SeMask FPN).
        num_points: Points per matched mask P (MaSSFormer's default: `models.release.NUM_POINTS`; tests and the CPU demo use fewer).
        oversample_ratio: Candidates per point for importance sampling (MaSSFormer's default: 3).
        importance_sample_ratio: Fraction of points chosen by uncertainty (MaSSFormer's default: 0.75).
        reweight: ``"none"``, ``"edge"`` or ``"inverse"`` (``models.training.loss_weights``).
        edge_lambda: lambda in ``1 + lambda * W`` (MaSSFormer's default: 5).
        inverse_weight_near_pseudo: Precise-class pixels near pseudo pixels get ``1 - W`` (``"inverse"``
            only).
        near_pseudo_radius: Chessboard radius of that band (2 px).
        weight_kernel_size: Average-pool window of W (MaSSFormer's default: 5).
        semantic_weight: Weight of the semantic-prior loss on ``aux_semantic`` (SeMask's config: 0.4).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        edge_weight: float = 10.0,
        no_object_weight: float = 0.1,
        losses: Sequence[str] = LOSS_NAMES,
        num_points: int = release.NUM_POINTS,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        reweight: ReweightMode = "inverse",
        edge_lambda: float = 5.0,
        inverse_weight_near_pseudo: bool = True,
        near_pseudo_radius: int = 2,
        weight_kernel_size: int = 5,
        semantic_weight: float = 0.4,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"Expected loss names in {LOSS_NAMES}. Got unknown {unknown} instead.")
        if num_classes < 1:
            raise ValueError(f"Expected num_classes >= 1. Got {num_classes} instead.")
        if num_points < 1:
            raise ValueError(f"Expected num_points >= 1. Got {num_points} instead.")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.edge_weight = edge_weight
        self.no_object_weight = no_object_weight
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.reweight: ReweightMode = parse_reweight_mode(reweight)
        self.edge_lambda = edge_lambda
        self.inverse_weight_near_pseudo = inverse_weight_near_pseudo
        self.near_pseudo_radius = near_pseudo_radius
        self.weight_kernel_size = weight_kernel_size
        self.semantic_weight = semantic_weight
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.empty_weight: Tensor
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        *,
        generator: PointRng = None,
        normalizers: LossNormalizers | None = None,
    ) -> dict[str, Tensor]:
        """Computes all losses.

        Args:
            outputs: The model output dict of ``docs/interfaces.md``: ``pred_logits`` B x Q x (K+1),
                ``pred_masks`` B x Q x h x w, optional ``aux_outputs`` (list of dicts with the same two keys,
                any mask resolution) and ``pred_edge`` B x 1 x h x w or None.
            targets: B dicts from ``models.training.targets.build_targets`` on the outputs' device.
            generator: Optional RNG for the matcher's and the losses' random points, for reproducibility
                (on any device: the points move to the outputs'): one generator, or one per image.
            normalizers: The batch means' denominators counted over a larger batch these images are part of
                (`count`); None: over these images.

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` for the last output, the same with suffix ``_i`` for
            ``aux_outputs[i]``, and ``loss_edge``; each already multiplied by its weight, so the total loss is
            ``sum(losses.values())``. Outputs with ``query_classes`` have no ``loss_ce``; outputs with
            ``aux_semantic`` add ``loss_semantic``.
        """
        self._check(outputs, targets)
        device_type = outputs["pred_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):  # losses in fp32 (docs/design.md §2.7)
            return self._losses(outputs, targets, generator, normalizers)

    def count(self, targets: Sequence[Mapping[str, Tensor]], *, num_queries: int) -> Tensor:
        """This part's share of `LossNormalizers` (float64, 3), to be summed over the parts of a batch.

        The class weights' sum follows from the targets: Hungarian matching gives min(Q, G) queries their
        target's class (weight 1) and the others no-object (``no_object_weight``).
        """
        masks = sum(int(t["labels"].numel()) for t in targets)
        matched = sum(min(num_queries, int(t["labels"].numel())) for t in targets)
        class_weight = matched + (len(targets) * num_queries - matched) * self.no_object_weight
        pixels = sum(int((t["edge"] != EDGE_IGNORE).sum()) for t in targets) if "edge" in targets[0] else 0
        return torch.tensor([masks, class_weight, pixels], dtype=torch.float64)

    def _losses(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        generator: PointRng,
        normalizers: LossNormalizers | None,
    ) -> dict[str, Tensor]:
        # Mask losses are normalized by the number of ground-truth masks in the batch (the reference averages it
        # over GPUs: `normalizers`), not by the number of matched ones.
        if normalizers is None:
            num_masks: float = max(sum(int(t["labels"].numel()) for t in targets), 1)
            weight_sum = edge_pixels = None
        else:
            num_masks, weight_sum, edge_pixels = max(normalizers.num_masks, 1.0), normalizers.class_weight, \
                normalizers.edge_pixels
        query_classes = outputs.get("query_classes")
        if query_classes is not None:  # fixed per-class queries: absent classes learn an empty mask
            targets = [with_every_class(t, query_classes) for t in targets]
        prepared = [self._prepare_target(t) for t in targets] if "masks" in self.losses else []

        losses: dict[str, Tensor] = {}
        layers: list[tuple[str, Mapping[str, Tensor]]] = [("", outputs)]
        layers += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
        for suffix, layer in layers:
            if query_classes is not None:  # fixed per-class queries: by class; their class logits are constant
                indices = class_assignment(query_classes, targets)
            else:
                indices = self.matcher(layer, targets, generator=generator)
            if "labels" in self.losses and query_classes is None:
                losses["loss_ce" + suffix] = self.class_weight * self._loss_labels(layer, targets, indices,
                                                                                   weight_sum)
            if "masks" in self.losses:
                loss_mask, loss_dice = self._loss_masks(layer, prepared, indices, num_masks, generator)
                losses["loss_mask" + suffix] = self.mask_weight * loss_mask
                losses["loss_dice" + suffix] = self.dice_weight * loss_dice
        pred_edge = outputs.get("pred_edge")
        if "edge" in self.losses and pred_edge is not None:
            losses["loss_edge"] = self.edge_weight * edge_loss(pred_edge, [t["edge"] for t in targets],
                                                               num_pixels=edge_pixels)
        aux_semantic = outputs.get("aux_semantic")
        if "semantic" in self.losses and aux_semantic is not None:
            losses["loss_semantic"] = self.semantic_weight * semantic_loss(aux_semantic, targets,
                                                                           num_pixels=edge_pixels)
        return losses

    def _check(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> None:
        pred_logits = outputs["pred_logits"]
        if pred_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"Expected pred_logits with K+1 = {self.num_classes + 1} entries. "
                f"Got shape {tuple(pred_logits.shape)} instead."
            )
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"Expected {pred_logits.shape[0]} targets. Got {len(targets)} instead.")
        for t in targets:
            labels = t["labels"]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"Expected target labels in [0, {self.num_classes}). Got {labels.tolist()} instead."
                )

    def _prepare_target(self, target: Mapping[str, Tensor]) -> PreparedTarget:
        """Full-resolution maps sampled at the loss points, computed once for all decoder outputs."""
        masks = target["masks"].float()  # G x H x W
        if self.reweight == "none" or masks.shape[0] == 0:
            return PreparedTarget(masks, None, None)
        w_edge = edge_weight_map(masks, kernel_size=self.weight_kernel_size)  # G x H x W
        bce_dev = bce_weight_map(
            masks,
            is_pseudo=target["is_pseudo"],
            pseudo_region=target["pseudo_region"],
            reviewed=target.get("reviewed"),
            mode=self.reweight,
            edge_weights=w_edge,
            edge_lambda=self.edge_lambda,
            inverse_weight_near_pseudo=self.inverse_weight_near_pseudo,
            near_pseudo_radius=self.near_pseudo_radius,
        ) - 1.0  # G x H x W, weight minus 1
        return PreparedTarget(masks, w_edge, bce_dev)

    def _loss_labels(
        self,
        layer: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        weight_sum: float | None,
    ) -> Tensor:
        pred_logits = layer["pred_logits"]  # B x Q x (K+1)
        target_classes = torch.full(
            pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=pred_logits.device
        )  # B x Q
        for b, (src, tgt) in enumerate(indices):
            if src.numel():
                labels = targets[b]["labels"].to(pred_logits.device)
                target_classes[b, src.to(pred_logits.device)] = labels[tgt.to(pred_logits.device)]
        return classification_loss(pred_logits, target_classes, self.empty_weight, weight_sum)

    def _loss_masks(
        self,
        layer: Mapping[str, Tensor],
        prepared: list[PreparedTarget],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
        generator: PointRng,
    ) -> tuple[Tensor, Tensor]:
        pred_masks = layer["pred_masks"]  # B x Q x h x w
        logits_list: list[Tensor] = []
        labels_list: list[Tensor] = []
        weights_list: list[Tensor] = []
        for b, (src, tgt) in enumerate(indices):
            if src.numel() == 0:
                continue
            src = src.to(pred_masks.device)
            tgt = tgt.to(pred_masks.device)
            prep = prepared[b]
            matched = pred_masks[b, src].float().unsqueeze(1)  # n x 1 x h x w
            masks = prep.masks[tgt].unsqueeze(1)  # n x 1 x H x W
            edge_w = prep.edge_w
            scale = None if edge_w is None else (1.0 - edge_w[tgt]).unsqueeze(1)  # n x 1 x H x W
            coords = uncertain_point_coords_with_randomness(
                matched,
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                uncertainty_scale=scale,
                generator=image_generator(generator, b),
            )  # n x P x 2
            with torch.no_grad():
                labels_list.append(point_sample(masks, coords)[:, 0])  # n x P
                bce_dev = prep.bce_dev
                if bce_dev is not None:
                    # 1 + sample(w - 1): equals 1 + lambda * W_p for the edge rule, as the reference samples W
                    # and not w, so the zero padding of grid_sample reads weight 1 outside the image.
                    dev = point_sample(bce_dev[tgt].unsqueeze(1), coords)[:, 0]  # n x P
                    weights_list.append(1.0 + dev)
            logits_list.append(point_sample(matched, coords)[:, 0])  # n x P
        if not logits_list:
            zero = pred_masks.sum() * 0.0  # keeps the graph when the batch has no ground truth
            return zero, zero.clone()
        point_logits = torch.cat(logits_list)  # N x P
        point_labels = torch.cat(labels_list)  # N x P
        point_weights = torch.cat(weights_list) if weights_list else None  # N x P
        return (
            weighted_sigmoid_ce_loss(point_logits, point_labels, point_weights, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )


def build_criterion(
    *,
    num_classes: int,
    num_points: int = release.NUM_POINTS,
    reweight: ReweightMode = "inverse",
    inverse_weight_near_pseudo: bool = True,
    losses: Sequence[str] = LOSS_NAMES,
) -> SetCriterion:
    """The MaSSFormer criterion (weights: docs/design.md §2.7) and a matcher on the same number of points.

    Args:
        num_classes: K (real classes, without no-object).
        num_points: Points for the matcher and the mask losses.
        reweight: BCE weighting mode (``"inverse"`` is the project default).
        inverse_weight_near_pseudo: Near-pseudo band option (default on).
        losses: Loss names; drop ``"edge"`` for models without an edge head if preferred.

    Returns:
        A ``SetCriterion``; move it to the training device with ``.to(device)``.
    """
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        losses=losses,
        num_points=num_points,
        reweight=reweight,
        inverse_weight_near_pseudo=inverse_weight_near_pseudo,
    )
