"""Semantic-segmentation metrics: mIoU, Boundary IoU and Boundary F1 (docs/design.md §4).

Every metric is computed the same way: per image, per-class int64 **counts** (``image_counts``); the
counts are **summed over the dataset** (``MetricAccumulator``); then one ratio per class and a NaN-aware
mean over the classes present (``metrics_from_counts``).

- mIoU reproduces MaSS13K/mmseg: pixels with gt == ignore are dropped, only values 0..C-1 count.
- BIoU reproduces MaSS13K: band width d = max(1, round(0.001 * diagonal)) with Python's half-to-even
  ``round``; band = pixels of the class mask within chessboard distance d of a pixel outside the mask or
  of the outside of the image (a zero-padded 3 x 3 erosion, d iterations); no ignore handling.
- BF1 is our DAVIS-style decision: 1-px ``seg2bmap`` boundaries (E/S/SE neighbours, the image border is
  never a boundary), a 2 px tolerance (``skimage.morphology.disk(2)``, 13 pixels), the prediction masked
  out where gt == ignore; precision and recall accumulated over the dataset.

Speed (all classes at once, no loop per pixel or per class for C <= 16): mIoU and BIoU come from one joint
histogram of (pred code, gt code, band code), all uint8; the BIoU bands (one erosion and one dilation per
label map) and the BF1 boundaries (one-hot bit planes) are ``models.boundary``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from addclass.common.errors import InputError
from addclass.models.boundary import (
    BF1_TOLERANCE_PX,
    BIOU_DILATION_RATIO,
    bf1_counts,
    bf1_errors,
    biou_band,
    boundary_width,
)

__all__ = [
    "BF1_TOLERANCE_PX",
    "BIOU_DILATION_RATIO",
    "COUNT_KEYS",
    "MetricAccumulator",
    "binarize",
    "binary_counts",
    "boundary_errors",
    "boundary_width",
    "class_vs_rest",
    "image_counts",
    "metrics_from_counts",
    "metrics_summary",
]

COUNT_KEYS: tuple[str, ...] = (
    "area_intersect",
    "area_union",
    "area_pred_label",
    "area_label",
    "biou_intersect",
    "biou_union",
    "bf_pred_match",
    "bf_pred_total",
    "bf_gt_match",
    "bf_gt_total",
)
_MAX_CLASSES = 253  # class codes 0..C-1, C = "no class", C+1 = ignore must fit in uint8
_CALCHIST_LIMIT = 1 << 24  # cv2.calcHist returns float32 counts, exact below 2**24 pixels


# ----------------------------------------------------------------------------------------------------------
# Per-image counts
# ----------------------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise InputError(f"Expected H x W label maps. Got pred {pred.shape} and gt {gt.shape} instead.")
    if pred.shape != gt.shape:
        raise InputError(f"pred and gt must have the same shape. Got {pred.shape} and {gt.shape} instead.")
    for name, arr in (("pred", pred), ("gt", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise TypeError(f"Expected an integer {name} label map. Got dtype {arr.dtype} instead.")
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise InputError(
            f"Expected num_classes in the inclusive range (1, {_MAX_CLASSES}). Got {num_classes}."
        )
    return pred, gt


def _class_codes(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Compact uint8 codes: 0..C-1 the classes, C any other value, C+1 ``ignore_index`` (when given)."""
    c = num_classes
    if labels.dtype == np.bool_:
        labels = labels.view(np.uint8)
    if labels.dtype == np.uint8:
        lut = np.full(256, c, dtype=np.uint8)
        lut[: min(c, 256)] = np.arange(min(c, 256), dtype=np.uint8)
        if ignore_index is not None and 0 <= ignore_index <= 255:
            lut[ignore_index] = c + 1
        return cv2.LUT(np.ascontiguousarray(labels), lut)
    codes = np.full(labels.shape, c, dtype=np.uint8)
    in_range = (labels >= 0) & (labels < c)
    codes[in_range] = labels[in_range]
    if ignore_index is not None:
        codes[labels == ignore_index] = c + 1
    return codes


def _joint_hist(a: np.ndarray, b: np.ndarray, e: np.ndarray, n: int) -> np.ndarray:
    """int64 n x n x 4 histogram of three uint8 maps (a, b in 0..n-1, e in 0..3)."""
    if a.size < _CALCHIST_LIMIT:
        h = cv2.calcHist([a, b, e], [0, 1, 2], None, [n, n, 4], [0, n, 0, n, 0, 4])
        return h.reshape(n, n, 4).astype(np.int64)
    # Large maps: float32 counts could round; count exactly, in row blocks to bound memory.
    out = np.zeros(n * n * 4, dtype=np.int64)
    step = max(1, _CALCHIST_LIMIT // (4 * a.shape[1]))
    for y in range(0, a.shape[0], step):
        joint = (a[y : y + step].astype(np.int64) * n + b[y : y + step]) * 4 + e[y : y + step]
        out += np.bincount(joint.ravel(), minlength=n * n * 4)
    return out.reshape(n, n, 4)


def image_counts(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    num_classes: int,
    ignore_index: int = 255,
    biou_d: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-class integer counts of one image for mIoU, BIoU and BF1 (docs/design.md §4.6).

    Args:
        pred: H x W integer predicted labels; values outside 0..C-1 (e.g. 255) belong to no class.
        gt: H x W integer ground truth at the same size; ``ignore_index`` marks void, other values outside
            0..C-1 belong to no class.
        num_classes: C, the number of classes (0..C-1), at most 253.
        ignore_index: Void label of the ground truth.
        biou_d: BIoU band width; ``None`` (the default, the benchmark rule) uses ``boundary_width(H, W)``.

    Returns:
        Keys ``COUNT_KEYS``, each an int64 array of length C: ``area_intersect``, ``area_union``,
        ``area_pred_label``, ``area_label`` (over gt != ignore), ``biou_intersect``, ``biou_union``,
        ``bf_pred_match``, ``bf_pred_total``, ``bf_gt_match``, ``bf_gt_total``.
    """
    pred, gt = _check_pair(pred, gt, num_classes)
    c = num_classes
    h, w = gt.shape
    d = boundary_width(h, w) if biou_d is None else int(biou_d)
    if d < 1:
        raise InputError(f"Expected biou_d >= 1. Got {biou_d} instead.")

    pc = _class_codes(pred, c, None)  # 0..C-1 classes, C none
    gc = _class_codes(gt, c, ignore_index)  # 0..C-1 classes, C none, C+1 ignore

    # One joint histogram over (pred code, gt code, band code) gives both mIoU and BIoU.
    # BIoU (MaSS13K boundary_intersect_and_union) has no ignore handling: ignore is simply "not c".
    band_code = biou_band(pc, d) | (biou_band(gc, d) << 1)  # bit 0: pred band, bit 1: gt band
    hist = _joint_hist(pc, gc, band_code, c + 2)  # (C+2) x (C+2) x 4
    del band_code
    conf = hist.sum(axis=2)  # pred code x gt code
    area_intersect = np.diagonal(conf)[:c].copy()
    # mIoU (mmseg intersect_and_union): only gt != ignore counts; codes C (no class) never land in 0..C-1.
    area_pred_label = conf[:c, : c + 1].sum(axis=1)
    area_label = conf[:, :c].sum(axis=0)
    biou_pred = hist[:c, :, 1::2].sum(axis=(1, 2))  # pred band set
    biou_gt = hist[:, :c, 2:].sum(axis=(0, 2))  # gt band set
    biou_intersect = np.diagonal(hist[:, :, 3])[:c].copy()  # pred == gt == c, both bands

    return {
        "area_intersect": area_intersect,
        "area_union": area_pred_label + area_label - area_intersect,
        "area_pred_label": area_pred_label,
        "area_label": area_label,
        "biou_intersect": biou_intersect,
        "biou_union": biou_pred + biou_gt - biou_intersect,
        # BF1: DAVIS-style boundaries, prediction masked on ignore.
        **bf1_counts(pc, gc, num_classes=c),
    }


def boundary_errors(
    pred: np.ndarray, gt: np.ndarray, *, num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that make BF1 drop, for overlays.

    Args:
        pred: H x W integer predicted labels.
        gt: H x W integer ground truth.
        num_classes: C.
        ignore_index: Void label of the ground truth.

    Returns:
        ``(false_boundary, missed_boundary)``, H x W bool: predicted boundary points with no gt boundary
        point of the same class within 2 px, and gt boundary points with no predicted one (any class).
    """
    pred, gt = _check_pair(pred, gt, num_classes)
    pc = _class_codes(pred, num_classes, None)
    gc = _class_codes(gt, num_classes, ignore_index)
    return bf1_errors(pc, gc, num_classes=num_classes)


# ----------------------------------------------------------------------------------------------------------
# Class-vs-rest scoring against hand evaluation masks
# ----------------------------------------------------------------------------------------------------------


def binarize(labels: np.ndarray, class_id: int, *, ignore_index: int = 255) -> np.ndarray:
    """Class-vs-rest label map: 1 where ``labels == class_id``, 255 where ``ignore_index``, 0 elsewhere.

    Args:
        labels: H x W integer label map (a prediction or a K-class label version).
        class_id: The class scored as foreground.
        ignore_index: Void label, kept as 255.

    Returns:
        H x W uint8 map in {0, 1, 255}.
    """
    labels = np.asarray(labels)
    out: np.ndarray = (labels == class_id).astype(np.uint8)
    out[labels == ignore_index] = 255
    return out


def binary_counts(
    pred_mask: np.ndarray, gt_mask: np.ndarray, *, ignore_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Counts for class-vs-rest scoring of one image (C = 2: index 0 rest, index 1 the class).

    Args:
        pred_mask: H x W bool (or 0/1) predicted mask of the class (a model's ``pred == k``, a pseudo
            label).
        gt_mask: H x W hand mask: bool, or integer with 0 rest, nonzero class, 255 void.
        ignore_mask: Optional H x W bool of further void pixels.

    Returns:
        ``image_counts`` of the binary maps with ``num_classes=2``.
    """
    pred_bin = (np.asarray(pred_mask) != 0).astype(np.uint8)
    gt_arr = np.asarray(gt_mask)
    gt_bin = (gt_arr != 0).astype(np.uint8)
    if gt_arr.dtype != np.bool_:
        gt_bin[gt_arr == 255] = 255
    if ignore_mask is not None:
        gt_bin[np.asarray(ignore_mask, dtype=bool)] = 255
    return image_counts(pred_bin, gt_bin, num_classes=2, ignore_index=255)


def class_vs_rest(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers reported for a new class scored against its hand masks.

    The reported (headline) values are the **class's own** ``iou``, ``biou`` and ``bf1`` (index 1 of a binary
    ``metrics_from_counts`` result); the binary means over {rest, class} are kept as ``binary_miou``,
    ``binary_mbiou`` and ``binary_mbf1``.

    Args:
        metrics: ``metrics_from_counts`` output of a C = 2 accumulation.

    Returns:
        ``iou``, ``biou``, ``bf1``, ``binary_miou``, ``binary_mbiou``, ``binary_mbf1`` as floats (NaN if
        absent).
    """
    if len(metrics["iou"]) != 2:
        raise InputError(f"Expected binary (C = 2) metrics. Got {len(metrics['iou'])} classes instead.")
    return {
        "iou": float(metrics["iou"][1]),
        "biou": float(metrics["biou"][1]),
        "bf1": float(metrics["bf1"][1]),
        "binary_miou": float(metrics["miou"]),
        "binary_mbiou": float(metrics["mbiou"]),
        "binary_mbf1": float(metrics["mbf1"]),
    }


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    present = x[~np.isnan(x)]
    return float(present.mean()) if present.size else math.nan


def metrics_from_counts(counts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Scores from dataset-summed counts.

    Args:
        counts: ``COUNT_KEYS`` -> int arrays of length C (summed over images).

    Returns:
        Per-class float64 arrays ``iou``, ``acc``, ``biou``, ``bf_precision``, ``bf_recall``, ``bf1``
        (NaN where the class has no pixels / no boundary in pred and gt), and floats ``miou``, ``macc``,
        ``mbiou``, ``mbf1`` (NaN-means over classes) and ``aAcc`` (all fractions, not percent).
    """
    cnt = {k: np.asarray(counts[k], dtype=np.int64) for k in COUNT_KEYS}
    pm, pt = cnt["bf_pred_match"], cnt["bf_pred_total"]
    gm, gtt = cnt["bf_gt_match"], cnt["bf_gt_total"]
    precision = _ratio(pm, pt)
    recall = _ratio(gm, gtt)
    p0 = np.nan_to_num(precision)
    r0 = np.nan_to_num(recall)
    bf1 = np.zeros(pm.shape, dtype=np.float64)  # exactly one of pt, gt empty: 0 (DAVIS P=1,R=0 / P=0,R=1)
    both = (pt > 0) & (gtt > 0)
    s = p0 + r0
    np.divide(2 * p0 * r0, s, out=bf1, where=both & (s > 0))
    bf1[(pt == 0) & (gtt == 0)] = np.nan
    iou = _ratio(cnt["area_intersect"], cnt["area_union"])
    acc = _ratio(cnt["area_intersect"], cnt["area_label"])
    biou = _ratio(cnt["biou_intersect"], cnt["biou_union"])
    total_label = int(cnt["area_label"].sum())
    return {
        "iou": iou,
        "acc": acc,
        "biou": biou,
        "bf_precision": precision,
        "bf_recall": recall,
        "bf1": bf1,
        "miou": _nanmean(iou),
        "macc": _nanmean(acc),
        "mbiou": _nanmean(biou),
        "mbf1": _nanmean(bf1),
        "aAcc": int(cnt["area_intersect"].sum()) / total_label if total_label else math.nan,
    }


class MetricAccumulator:
    """Sums per-image counts over a dataset and derives mIoU, BIoU and BF1.

    Example:
        >>> acc = MetricAccumulator(num_classes=8)
        >>> for pred, gt in pairs:
        ...     acc.update(pred, gt)
        >>> acc.compute()["miou"]
    """

    def __init__(self, *, num_classes: int, ignore_index: int = 255, keep_per_image: bool = False) -> None:
        """Create an empty accumulator.

        Args:
            num_classes: C.
            ignore_index: Void label of the ground truth.
            keep_per_image: Also keep every image's counts in ``per_image`` (10 x C int64 each).
        """
        if not 1 <= num_classes <= _MAX_CLASSES:
            raise InputError(
                f"Expected num_classes in the inclusive range (1, {_MAX_CLASSES}). Got {num_classes}."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.keep_per_image = keep_per_image
        self.counts: dict[str, np.ndarray] = {}
        self.per_image: list[dict[str, np.ndarray]] = []
        self.num_images = 0
        self.reset()

    def reset(self) -> None:
        """Forget every image."""
        self.counts = {k: np.zeros(self.num_classes, dtype=np.int64) for k in COUNT_KEYS}
        self.per_image = []
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
        """Score one image and add its counts.

        Args:
            pred: H x W integer predicted labels at the gt size.
            gt: H x W integer ground truth.

        Returns:
            The image's counts (``image_counts``).
        """
        counts = image_counts(pred, gt, num_classes=self.num_classes, ignore_index=self.ignore_index)
        self.add(counts)
        return counts

    def add(self, counts: Mapping[str, np.ndarray]) -> None:
        """Add counts computed elsewhere (e.g. in a worker process).

        Args:
            counts: ``COUNT_KEYS`` -> int arrays of length C.
        """
        missing = [k for k in COUNT_KEYS if k not in counts]
        if missing:
            raise KeyError(f"Counts lack keys {missing}.")
        image = {k: np.asarray(counts[k], dtype=np.int64) for k in COUNT_KEYS}
        for k, v in image.items():
            if v.shape != (self.num_classes,):
                raise InputError(f"Expected {k} of shape ({self.num_classes},). Got {v.shape} instead.")
            self.counts[k] += v
        if self.keep_per_image:
            self.per_image.append(image)
        self.num_images += 1

    def compute(self) -> dict[str, Any]:
        """Scores of everything added so far (``metrics_from_counts``)."""
        return metrics_from_counts(self.counts)

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-serialisable summary: per-class scores, means and the raw counts.

        Args:
            class_names: Names of classes 0..C-1; defaults to ``"class_<i>"``.

        Returns:
            ``{"num_images", "num_classes", "ignore_index", "per_class": [{"id", "name", "iou", "biou", "bf1",
            "acc", "bf_precision", "bf_recall"}], "means": {"miou", "mbiou", "mbf1", "macc", "aAcc"},
            "counts": {key: [int]}}``; fractions, NaN written as ``None``.
        """
        return metrics_summary(
            self.counts, num_images=self.num_images, class_names=class_names, ignore_index=self.ignore_index
        )


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def metrics_summary(
    counts: Mapping[str, np.ndarray],
    *,
    num_images: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """JSON-serialisable summary of dataset-summed counts (see ``MetricAccumulator.summary``).

    Args:
        counts: ``COUNT_KEYS`` -> int arrays of length C.
        num_images: Number of images summed.
        class_names: Names of classes 0..C-1; defaults to ``"class_<i>"``.
        ignore_index: Recorded in the summary.

    Returns:
        The summary dict.
    """
    m = metrics_from_counts(counts)
    c = len(m["iou"])
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(c)]
    if len(names) != c:
        raise InputError(f"Expected {c} class names. Got {len(names)} instead: {names}.")
    per_class = [
        {
            "id": i,
            "name": names[i],
            **{k: _json_float(m[k][i]) for k in ("iou", "biou", "bf1", "acc", "bf_precision", "bf_recall")},
        }
        for i in range(c)
    ]
    return {
        "num_images": int(num_images),
        "num_classes": c,
        "ignore_index": int(ignore_index),
        "per_class": per_class,
        "means": {k: _json_float(m[k]) for k in ("miou", "mbiou", "mbf1", "macc", "aAcc")},
        "counts": {k: [int(v) for v in counts[k]] for k in COUNT_KEYS},
    }
