"""Small typed evaluation results for tests of their readers (registry, artifacts, demo lines): only the
scores a test names are set, the rest are empty."""

from __future__ import annotations

from addclass.tasks.evaluation.evaluation_results import (
    ClassResult,
    MetricSummary,
    ModelEvaluation,
    PseudoEvaluation,
    PseudoSplitResult,
    SplitResult,
)


def summary(*, miou: float | None = None, num_images: int = 1, num_classes: int = 7) -> MetricSummary:
    means = {"miou": miou, "mbiou": None, "mbf1": None, "macc": None, "aAcc": None}
    return MetricSummary(num_images=num_images, num_classes=num_classes, ignore_index=255, per_class=[],
                         means=means, counts={})


def class_result(name: str, iou: float | None, biou: float | None = None, bf1: float | None = None, *,
                 num_images: int = 1) -> ClassResult:
    binary: dict[str, float | None] = dict.fromkeys(("binary_miou", "binary_mbiou", "binary_mbf1"))
    return ClassResult(name=name, iou=iou, biou=biou, bf1=bf1, binary=binary, hand_mask_kind=["reference"],
                       summary=summary(num_images=num_images, num_classes=2))


def model_evaluation(splits: dict[str, tuple[float, list[ClassResult]]], *,
                     num_images: dict[str, int] | None = None) -> ModelEvaluation:
    """``{split: (7-class mIoU, [new-class results])}``; the new classes are those of the first split."""
    names = [c.name for c in next(iter(splits.values()))[1]] if splits else []
    return ModelEvaluation(
        store="/s.zarr", checkpoint=None, device="cpu", label_version="v2", classes=[], num_precise=7,
        new_classes=names, pred_dir=None,
        splits={s: SplitResult(num_images=(num_images or {}).get(s, 1), precise=summary(miou=miou),
                               new_classes={c.name: c for c in classes}, all=None, per_image=[])
                for s, (miou, classes) in splits.items()})


def pseudo_evaluation(scores: dict[str, dict[str, ClassResult]]) -> PseudoEvaluation:
    """``{class: {split: result}}``."""
    return PseudoEvaluation(store="/s.zarr", classes={
        name: {s: PseudoSplitResult(scores=r, num_hand_masks=1, num_pseudo=1, per_image=[]) for s, r in per.items()}
        for name, per in scores.items()})
