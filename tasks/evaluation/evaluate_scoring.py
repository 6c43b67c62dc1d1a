"""The scoring behind `tasks.evaluation.evaluate`, on arrays (pure): the ground-truth rules 1-3 of one image, the counts
of a split summed over its images, and the class-vs-rest summaries (rules: `tasks.evaluation.evaluate`'s module
docstring, docs/design.md §4.7). Counts and scores are ``models.metrics``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from addclass.common.errors import InputError
from addclass.models.metrics import (
    COUNT_KEYS,
    binary_counts,
    class_vs_rest,
    image_counts,
    metrics_from_counts,
    metrics_summary,
)
from addclass.storage.registry import IGNORE_INDEX
from addclass.tasks.evaluation.evaluation_results import ClassResult, MetricSummary, SplitResult

__all__ = [
    "Counts",
    "SplitScores",
    "add_counts",
    "all_classes_ground_truth",
    "binary_summary",
    "class_scores",
    "fold_new_classes",
    "new_class_indices",
    "score_prediction",
    "zero_counts",
]

Counts = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# The ground-truth rules on arrays
# ----------------------------------------------------------------------------------------------------------


def fold_new_classes(pred: np.ndarray, num_precise: int) -> np.ndarray:
    """Rule 1: every class id >= ``num_precise`` (a new class) becomes 0 ("others"); other values are kept.

    Args:
        pred: H x W integer predicted labels.
        num_precise: Number of precise classes (7).

    Returns:
        H x W uint8 labels.
    """
    pred = np.asarray(pred)
    out = pred.astype(np.uint8)
    out[(pred >= num_precise) & (pred != IGNORE_INDEX)] = 0
    return out


def all_classes_ground_truth(precise: np.ndarray, hand_masks: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """Rule 3: v1 labels with the hand masks carved in where the label is still 0.

    Args:
        precise: H x W uint8 v1 labels (0..6, 255).
        hand_masks: ``(class id, H x W mask)`` pairs in id order; masks are 0 rest, 1 the class, 255 ignore.

    Returns:
        H x W uint8 K-class ground truth.
    """
    gt = np.asarray(precise).astype(np.uint8, copy=True)
    for class_id, mask in hand_masks:
        mask = np.asarray(mask)
        if mask.shape != gt.shape:
            raise InputError(f"Hand mask is {mask.shape}, labels are {gt.shape}.")
        free = gt == 0  # still "others": not a precise class, not an earlier new class, not ignore
        gt[free & (mask == 1)] = class_id
        gt[free & (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return gt


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _means(counts: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    m = metrics_from_counts(counts)
    return {k: _json_float(m[k]) for k in ("miou", "mbiou", "mbf1", "aAcc")}


def class_scores(counts: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """``class_vs_rest`` of binary counts, NaN written as None."""
    return {k: _json_float(v) for k, v in class_vs_rest(metrics_from_counts(counts)).items()}


def score_prediction(
    pred: np.ndarray,
    precise: np.ndarray,
    hand_masks: Mapping[int, np.ndarray | None],
    *,
    num_precise: int,
    num_classes: int,
) -> dict[str, Any]:
    """Rules 1-3 for one image: counts and the image's own scores.

    Args:
        pred: H x W K-class predicted labels.
        precise: H x W v1 labels.
        hand_masks: New class id -> hand mask (0/1/255), or None where the image has none.
        num_precise: Number of precise classes (7).
        num_classes: K, all classes of the label version.

    Returns:
        ``{"counts": {"precise": counts, "new_classes": {id: counts}, "all": counts | None},
        "scores": {"precise": means, "new_classes": {id: class scores}, "all": means | None}}``; classes
        without a hand mask are left out of ``new_classes``.
    """
    pred = np.asarray(pred)
    if pred.shape != precise.shape:
        raise InputError(f"Prediction is {pred.shape}, ground truth is {precise.shape}.")
    counts: dict[str, Any] = {"new_classes": {}, "all": None}
    scores: dict[str, Any] = {"new_classes": {}, "all": None}
    counts["precise"] = image_counts(fold_new_classes(pred, num_precise), precise, num_classes=num_precise)
    scores["precise"] = _means(counts["precise"])
    for cid, mask in hand_masks.items():
        if mask is None:
            continue
        c = binary_counts(pred == cid, mask)
        counts["new_classes"][cid] = c
        scores["new_classes"][cid] = class_scores(c)
    if hand_masks and all(m is not None for m in hand_masks.values()):
        present = [(cid, m) for cid, m in sorted(hand_masks.items()) if m is not None]
        gt = all_classes_ground_truth(precise, present)
        counts["all"] = image_counts(pred, gt, num_classes=num_classes)
        scores["all"] = _means(counts["all"])
    return {"counts": counts, "scores": scores}


# ----------------------------------------------------------------------------------------------------------
# Sums over a split
# ----------------------------------------------------------------------------------------------------------


def zero_counts(c: int) -> Counts:
    """``COUNT_KEYS`` -> int64 zeros of length C."""
    return {k: np.zeros(c, dtype=np.int64) for k in COUNT_KEYS}


def add_counts(total: Counts, counts: Mapping[str, np.ndarray]) -> None:
    """Add one image's counts to ``total`` in place."""
    for k in COUNT_KEYS:
        total[k] += counts[k]


def binary_summary(
    counts: Mapping[str, np.ndarray], *, num_images: int, name: str, hand_mask_kind: Sequence[str],
    class_id: int | None = None,
) -> ClassResult:
    """A class-vs-rest result: ``metrics_summary`` over {rest, name} with the class's own ``iou``, ``biou``,
    ``bf1`` and the ``binary_m*`` means over {rest, class} (``class_vs_rest``)."""
    summary = MetricSummary.from_dict(metrics_summary(counts, num_images=num_images, class_names=["rest", name]))
    scores = class_scores(counts)
    return ClassResult(name=name, iou=scores["iou"], biou=scores["biou"], bf1=scores["bf1"],
                       binary={k: scores[k] for k in ("binary_miou", "binary_mbiou", "binary_mbf1")},
                       summary=summary, hand_mask_kind=list(hand_mask_kind), class_id=class_id)


def new_class_indices(classes: Sequence[Mapping[str, Any]], num_precise: int) -> list[tuple[int, str]]:
    """``(model class index, name)`` of the new classes, which follow the ``num_precise`` precise ones."""
    return [(num_precise + j, c["name"]) for j, c in enumerate(classes[num_precise:])]


class SplitScores:
    """Rules 1-3 on one split: counts summed over its images and every image's own scores.

    Example:
        >>> scores = SplitScores("val", classes=classes, num_precise=7)
        >>> scores.add(image_id, pred, score_prediction(pred, precise, masks, num_precise=7, num_classes=8))
        >>> scores.summary(ids, hand_mask_kinds=kinds)
    """

    def __init__(self, split: str, *, classes: Sequence[Mapping[str, Any]], num_precise: int) -> None:
        """Start with zero counts.

        Args:
            split: The split's name, recorded per image.
            classes: ``[{id, name, source}]`` in model class order (precise classes first).
            num_precise: Number of precise classes (7).
        """
        self.split = split
        self.class_names: list[str] = [c["name"] for c in classes]
        self.num_precise = num_precise
        self.new = new_class_indices(classes, num_precise)
        self.precise = zero_counts(num_precise)
        self.all = zero_counts(len(classes))
        self.new_classes = {cid: zero_counts(2) for cid, _ in self.new}
        self.num_new = dict.fromkeys(self.new_classes, 0)
        self.num_all = 0
        self.per_image: dict[str, dict[str, Any]] = {}

    def add(self, image_id: str, pred: np.ndarray, result: Mapping[str, Any]) -> None:
        """Add one image.

        Args:
            image_id: The image.
            pred: Its H x W prediction (for the size).
            result: Its ``score_prediction`` output.
        """
        counts, scores = result["counts"], result["scores"]
        add_counts(self.precise, counts["precise"])
        for cid, c in counts["new_classes"].items():
            add_counts(self.new_classes[cid], c)
            self.num_new[cid] += 1
        if counts["all"] is not None:
            add_counts(self.all, counts["all"])
            self.num_all += 1
        self.per_image[image_id] = {
            "id": image_id,
            "split": self.split,
            "height": int(pred.shape[0]),
            "width": int(pred.shape[1]),
            "precise": scores["precise"],
            "new_classes": {dict(self.new)[cid]: v for cid, v in scores["new_classes"].items()},
            "all": scores["all"],
        }

    def summary(
        self, ids: Sequence[str], *, hand_mask_kinds: Mapping[str, Mapping[str, str]]
    ) -> SplitResult:
        """The split's entry of ``evaluate_model``'s ``splits``.

        Args:
            ids: The split's scored image ids, in split order (all added).
            hand_mask_kinds: New class name -> {image id: "eval" | "reference"} on the split.

        Returns:
            The split's `SplitResult`.
        """
        return SplitResult(
            num_images=len(ids),
            precise=MetricSummary.from_dict(metrics_summary(
                self.precise, num_images=len(ids), class_names=self.class_names[: self.num_precise]
            )),
            new_classes={
                name: binary_summary(
                    self.new_classes[cid], num_images=self.num_new[cid], name=name, class_id=cid,
                    hand_mask_kind=sorted(set(hand_mask_kinds[name].values())),
                )
                for cid, name in self.new
                if self.num_new[cid]
            },
            all=MetricSummary.from_dict(metrics_summary(self.all, num_images=self.num_all,
                                                        class_names=self.class_names))
            if self.num_all
            else None,
            per_image=[self.per_image[i] for i in ids],
        )
