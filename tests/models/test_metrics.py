"""Tests for models/metrics.py: hand-computed small maps (docs/design.md §4.5) and a slow reference.

Conventions in the hand cases: d = 1 on every small map (diagonal < 1500). ``seg2bmap`` boundaries sit on the
last pixel of a mask and on the background pixels just before it (towards the origin), so a single pixel at
(y, x) has the 4 boundary points {y-1, y} x {x-1, x}; a mask and its complement have the same boundary.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from addclass.models import metrics as M
from addclass.models.metrics import (
    COUNT_KEYS,
    MetricAccumulator,
    binarize,
    binary_counts,
    boundary_errors,
    boundary_width,
    class_vs_rest,
    image_counts,
    metrics_from_counts,
)

NAN = math.nan


def _scores(pred: np.ndarray, gt: np.ndarray, num_classes: int, **kw: int) -> dict:
    return metrics_from_counts(image_counts(pred, gt, num_classes=num_classes, **kw))


def _assert_close(actual: np.ndarray, expected: list[float]) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), equal_nan=True
    )


# ------------------------------------------------------------------------------------------------
# Slow, obviously-correct reference (explicit loops and scipy distance transforms)
# ------------------------------------------------------------------------------------------------


def _ref_seg2bmap(mask: np.ndarray) -> np.ndarray:
    """Explicit loops: differs from its E, S or SE neighbour; neighbours outside the image not compared."""
    h, w = mask.shape
    m = mask.tolist()
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            neighbours = []
            if x + 1 < w:
                neighbours.append(m[y][x + 1])
            if y + 1 < h:
                neighbours.append(m[y + 1][x])
            if x + 1 < w and y + 1 < h:
                neighbours.append(m[y + 1][x + 1])
            out[y, x] = any(v != m[y][x] for v in neighbours)
    return out


def _davis_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Transcription of davis2017-evaluation ``_seg2bmap`` (same size case)."""
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def _ref_band(mask: np.ndarray, d: int) -> np.ndarray:
    """Pixels of the mask within chessboard distance d of a non-mask pixel or of the image outside."""
    padded = np.pad(mask, 1)  # zero pad: the outside of the image is "not in the mask"
    dist = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    return mask & (dist <= d)


def _ref_matched(src: np.ndarray, dst: np.ndarray) -> int:
    """Points of src with a point of dst at Euclidean distance <= 2."""
    if not dst.any():
        return 0
    dist = ndimage.distance_transform_edt(~dst)
    return int((src & (dist <= 2.0)).sum())


def _ref_counts(pred: np.ndarray, gt: np.ndarray, c: int, ignore: int = 255, d: int | None = None) -> dict:
    h, w = gt.shape
    if d is None:
        d = max(1, int(round(0.001 * np.sqrt(h**2 + w**2))))  # noqa: RUF046 (MaSS13K verbatim)
    valid = gt != ignore
    out = {k: np.zeros(c, dtype=np.int64) for k in COUNT_KEYS}
    for k in range(c):
        p = pred == k
        g = gt == k
        inter = int((p & g & valid).sum())
        ap = int((p & valid).sum())
        ag = int((g & valid).sum())
        out["area_intersect"][k] = inter
        out["area_pred_label"][k] = ap
        out["area_label"][k] = ag
        out["area_union"][k] = ap + ag - inter
        bp = _ref_band(p, d)
        bg = _ref_band(g, d)
        bi = int((bp & bg).sum())
        out["biou_intersect"][k] = bi
        out["biou_union"][k] = int(bp.sum()) + int(bg.sum()) - bi
        fp = _ref_seg2bmap(p & valid)
        fg = _ref_seg2bmap(g)
        out["bf_pred_total"][k] = int(fp.sum())
        out["bf_gt_total"][k] = int(fg.sum())
        out["bf_pred_match"][k] = _ref_matched(fp, fg)
        out["bf_gt_match"][k] = _ref_matched(fg, fp)
    return out


def _random_pair(rng: np.random.Generator, h: int, w: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocky gt with rectangles, thin lines, ignore and out-of-range values; a perturbed prediction."""
    blocks = rng.integers(0, c, size=(h // 5 + 1, w // 5 + 1))
    gt = np.kron(blocks, np.ones((5, 5), dtype=np.int64))[:h, :w]
    for _ in range(6):
        y, x = rng.integers(0, h), rng.integers(0, w)
        gt[y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = rng.integers(0, c)
    gt[rng.integers(0, h), :] = rng.integers(0, c)  # a one-pixel line
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-3, 4))), axis=(0, 1))
    noise = rng.random((h, w)) < 0.05
    pred[noise] = rng.integers(0, c, size=int(noise.sum()))
    for _ in range(3):
        y, x = rng.integers(0, h), rng.integers(0, w)
        pred[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = rng.integers(0, c)
    y, x = rng.integers(0, h), rng.integers(0, w)
    gt[y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = 255  # void region
    gt[rng.random((h, w)) < 0.01] = c  # out of range, not ignore
    pred[rng.random((h, w)) < 0.01] = 255  # pred "ignore" on valid pixels
    return pred.astype(np.uint8), gt.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Band width d
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "d"),
    [
        (64, 64, 1),
        (720, 1280, 1),
        (900, 1200, 2),  # 1.5 -> 2 (even)
        (1080, 1920, 2),
        (1500, 2000, 2),  # 2.5 -> 2 (half-even; C-style rounding gives 3)
        (2160, 3840, 4),
        (2700, 3600, 4),  # 4.5 -> 4 (C-style gives 5)
        (2268, 4032, 5),
        (3024, 4032, 5),
        (3072, 4096, 5),
    ],
)
def test_boundary_width_table(h: int, w: int, d: int) -> None:
    assert boundary_width(h, w) == d


@pytest.mark.parametrize(
    ("h", "w", "band"),
    [
        (1500, 2000, 1500 * 2000 - 1496 * 1996),  # d = 2 (3 would give 20964)
        (2160, 3840, 2160 * 3840 - 2152 * 3832),  # d = 4 (5 would give 59900)
        (3072, 4096, 3072 * 4096 - 3062 * 4086),  # d = 5
    ],
)
def test_image_counts_uses_the_diagonal_band_width(h: int, w: int, band: int) -> None:
    # One class filling the image: its band is the d-pixel frame (the zero pad), so BU = H*W - (H-2d)(W-2d).
    gt = np.zeros((h, w), dtype=np.uint8)
    counts = image_counts(gt, gt, num_classes=1)
    assert counts["biou_union"][0] == band
    assert counts["biou_intersect"][0] == band


# ------------------------------------------------------------------------------------------------
# Hand-computed small maps
# ------------------------------------------------------------------------------------------------


def test_straight_edge_identical() -> None:
    gt = np.zeros((8, 8), dtype=np.uint8)
    gt[:, 4:] = 1
    counts = image_counts(gt, gt, num_classes=2)
    # Each half: 32 pixels; band = all but the 6 x 2 interior (rows 1..6, cols 1..2 / 5..6) = 20.
    # seg2bmap of both classes: column 3 (8 points), the left side of the edge.
    expected = {
        "area_intersect": [32, 32],
        "area_union": [32, 32],
        "area_pred_label": [32, 32],
        "area_label": [32, 32],
        "biou_intersect": [20, 20],
        "biou_union": [20, 20],
        "bf_pred_match": [8, 8],
        "bf_pred_total": [8, 8],
        "bf_gt_match": [8, 8],
        "bf_gt_total": [8, 8],
    }
    assert sorted(counts) == sorted(COUNT_KEYS)
    for key, value in expected.items():
        assert counts[key].dtype == np.int64
        assert counts[key].tolist() == value, key


def test_straight_edge_shift_two_matches_three_does_not() -> None:
    gt = np.zeros((6, 12), dtype=np.uint8)
    gt[:, 6:] = 1  # gt boundary: column 5, 6 points per class
    pred2 = np.zeros_like(gt)
    pred2[:, 8:] = 1  # boundary column 7: 2 px away
    s = _scores(pred2, gt, 2)
    _assert_close(s["bf1"], [1.0, 1.0])
    _assert_close(s["iou"], [36 / 48, 24 / 36])
    # BIoU d = 1, class 0: gt band 20, pred band 24, common 16 (the frame of columns 0..5)
    # class 1: gt band 20, pred band 16, common 12.
    _assert_close(s["biou"], [16 / 28, 12 / 24])

    pred3 = np.zeros_like(gt)
    pred3[:, 9:] = 1  # boundary column 8: 3 px away
    counts = image_counts(pred3, gt, num_classes=2)
    assert counts["bf_pred_match"].tolist() == [0, 0]
    assert counts["bf_gt_match"].tolist() == [0, 0]
    assert counts["bf_pred_total"].tolist() == [6, 6]
    _assert_close(metrics_from_counts(counts)["bf1"], [0.0, 0.0])


@pytest.mark.parametrize(
    ("dy", "dx", "matched", "bf1"),
    [
        (0, 0, 4, 1.0),
        (0, 2, 4, 1.0),  # every point within 2 px
        (0, 3, 2, 0.5),  # the near column of the 2 x 2 boundary box is 2 px away, the far one 3 px
        (1, 2, 3, 0.75),  # the corner at offset (1, 2) is outside disk(2): sqrt(5) > 2
    ],
)
def test_single_pixel_tolerance_is_disk2(dy: int, dx: int, matched: int, bf1: float) -> None:
    gt = np.zeros((9, 9), dtype=np.uint8)
    gt[4, 4] = 1  # boundary points (3,3), (3,4), (4,3), (4,4)
    pred = np.zeros_like(gt)
    pred[4 + dy, 4 + dx] = 1
    counts = image_counts(pred, gt, num_classes=2)
    assert counts["bf_pred_total"].tolist() == [4, 4]
    assert counts["bf_gt_total"].tolist() == [4, 4]
    assert counts["bf_pred_match"].tolist() == [matched, matched]
    assert counts["bf_gt_match"].tolist() == [matched, matched]
    _assert_close(metrics_from_counts(counts)["bf1"], [bf1, bf1])


def test_one_pixel_line_shifted_by_two() -> None:
    gt = np.zeros((8, 9), dtype=np.uint8)
    gt[:, 4] = 1
    pred = np.zeros_like(gt)
    pred[:, 6] = 1
    counts = image_counts(pred, gt, num_classes=2)
    # The line touches the top and bottom border: only vertical boundaries, columns 3-4 (gt) and 5-6 (pred).
    assert counts["bf_gt_total"].tolist() == [16, 16]
    assert counts["bf_pred_total"].tolist() == [16, 16]
    assert counts["bf_pred_match"].tolist() == [16, 16]
    assert counts["bf_gt_match"].tolist() == [16, 16]
    # The line is all band; the lines do not overlap.
    assert counts["biou_intersect"].tolist() == [32, 0]
    assert counts["biou_union"].tolist() == [48, 16]
    s = metrics_from_counts(counts)
    _assert_close(s["iou"], [56 / 72, 0.0])
    _assert_close(s["biou"], [2 / 3, 0.0])
    _assert_close(s["bf1"], [1.0, 1.0])


def test_object_touching_the_image_border() -> None:
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[:3, :3] = 1
    counts = image_counts(gt, gt, num_classes=2)
    # BIoU: the zero pad makes the border a boundary: class 1 band = 9 - 1 interior pixel; class 0: 27 - 7.
    assert counts["biou_union"].tolist() == [20, 8]
    assert counts["biou_intersect"].tolist() == [20, 8]
    # BF1: the border is never a boundary: only the right column and bottom row of the block (5 points).
    assert counts["bf_pred_total"].tolist() == [5, 5]
    assert counts["bf_gt_total"].tolist() == [5, 5]


def test_empty_classes_and_classes_only_in_the_prediction() -> None:
    gt = np.zeros((6, 6), dtype=np.uint8)
    pred = gt.copy()
    pred[1:3, 1:3] = 2
    s = _scores(pred, gt, 4)
    _assert_close(s["iou"], [32 / 36, NAN, 0.0, NAN])
    # gt class 0 band = the 20-pixel frame; pred class 0 band = 32 - 7 = 25; common = the frame.
    _assert_close(s["biou"], [20 / 25, NAN, 0.0, NAN])
    # gt has no boundary at all; the pred block has 8 boundary points for classes 0 and 2.
    _assert_close(s["bf1"], [0.0, NAN, 0.0, NAN])
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["mbiou"] == pytest.approx(0.4)
    assert s["mbf1"] == 0.0


def test_single_class_filling_the_image() -> None:
    gt = np.full((7, 5), 1, dtype=np.uint8)
    s = _scores(gt, gt, 3)
    _assert_close(s["iou"], [NAN, 1.0, NAN])
    _assert_close(s["biou"], [NAN, 1.0, NAN])  # the frame is the band of both
    _assert_close(s["bf1"], [NAN, NAN, NAN])  # no boundary anywhere
    assert math.isnan(s["mbf1"])
    assert s["aAcc"] == 1.0


def test_pred_all_one_gt_all_zero() -> None:
    gt = np.zeros((5, 6), dtype=np.uint8)
    pred = np.ones_like(gt)
    s = _scores(pred, gt, 2)
    _assert_close(s["iou"], [0.0, 0.0])
    _assert_close(s["biou"], [0.0, 0.0])
    _assert_close(s["bf1"], [NAN, NAN])  # raw DAVIS would give 1.0 per class


def test_ignore_region_bf1_masks_the_prediction_biou_does_not() -> None:
    gt = np.zeros((8, 8), dtype=np.uint8)
    gt[2:6, 2:6] = 255
    pred = np.zeros_like(gt)
    pred[2:6, 2:6] = 1  # the prediction draws an object inside the void region
    counts = image_counts(pred, gt, num_classes=2)
    # mIoU drops the void pixels: class 1 is absent.
    assert counts["area_union"].tolist() == [48, 0]
    # BIoU keeps them: class 0 is all band (48/48); the 4 x 4 predicted block has a 12-pixel band, gt none.
    assert counts["biou_intersect"].tolist() == [48, 0]
    assert counts["biou_union"].tolist() == [48, 12]
    # BF1 masks the prediction: the block vanishes from P_1; class 0 has the 16-point ring in both.
    assert counts["bf_pred_total"].tolist() == [16, 0]
    assert counts["bf_gt_total"].tolist() == [16, 0]
    s = metrics_from_counts(counts)
    _assert_close(s["iou"], [1.0, NAN])
    _assert_close(s["biou"], [1.0, 0.0])
    _assert_close(s["bf1"], [1.0, NAN])
    assert s["mbf1"] == 1.0  # without void masking: class 1 would count 16 unmatched points, mBF1 0.5


def test_pred_ignore_value_on_valid_pixels_counts_for_no_class() -> None:
    gt = np.zeros((4, 4), dtype=np.uint8)
    pred = gt.copy()
    pred[:2, :2] = 255
    counts = image_counts(pred, gt, num_classes=2)
    assert counts["area_intersect"].tolist() == [12, 0]
    assert counts["area_pred_label"].tolist() == [12, 0]
    assert counts["area_union"].tolist() == [16, 0]
    # gt band = 12-pixel frame; all 12 pred-0 pixels are band; common = frame minus the 3 corner pixels.
    assert counts["biou_intersect"].tolist() == [9, 0]
    assert counts["biou_union"].tolist() == [15, 0]
    # The 255 block is "not 0": 3 predicted boundary points, none in gt.
    assert counts["bf_pred_total"].tolist() == [3, 0]
    assert counts["bf_gt_total"].tolist() == [0, 0]


def test_gt_values_outside_the_classes_count_nowhere() -> None:
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[:2, :2] = 5  # >= C, not ignore
    pred = np.zeros_like(gt)
    counts = image_counts(pred, gt, num_classes=2)
    assert counts["area_intersect"].tolist() == [12, 0]
    assert counts["area_pred_label"].tolist() == [16, 0]  # these pixels are valid: pred counts there
    assert counts["area_label"].tolist() == [12, 0]
    s = metrics_from_counts(counts)
    assert s["iou"][0] == 0.75
    assert s["aAcc"] == 1.0


def test_dataset_sums_counts_not_per_image_scores() -> None:
    acc = MetricAccumulator(num_classes=2, keep_per_image=True)
    gt_a = np.zeros((4, 4), dtype=np.uint8)
    pred_a = gt_a.copy()
    pred_a[:2] = 1  # class 0: I 8, U 16; class 1: I 0, U 8
    gt_b = np.zeros((8, 8), dtype=np.uint8)  # class 0: I 64, U 64; class 1 absent (adds 0)
    acc.update(pred_a, gt_a)
    acc.update(gt_b, gt_b)
    assert acc.num_images == 2
    assert acc.counts["area_intersect"].tolist() == [72, 0]
    assert acc.counts["area_union"].tolist() == [80, 8]
    s = acc.compute()
    _assert_close(s["iou"], [0.9, 0.0])  # a per-image mean would give 0.75 for class 0
    assert s["aAcc"] == 72 / 80
    assert len(acc.per_image) == 2
    assert acc.per_image[1]["area_union"].tolist() == [64, 0]
    acc.reset()
    assert acc.num_images == 0
    assert acc.counts["area_union"].tolist() == [0, 0]


def test_bf1_conventions_from_counts() -> None:
    zeros = np.zeros(4, dtype=np.int64)
    counts = {k: zeros.copy() for k in COUNT_KEYS}
    counts["bf_pred_total"] = np.array([10, 5, 0, 0])
    counts["bf_pred_match"] = np.array([5, 0, 0, 0])
    counts["bf_gt_total"] = np.array([20, 4, 7, 0])
    counts["bf_gt_match"] = np.array([15, 0, 0, 0])
    s = metrics_from_counts(counts)
    # class 0: P 0.5, R 0.75 -> 0.6; class 1: P = R = 0 -> 0; class 2: no prediction -> 0; class 3: NaN.
    _assert_close(s["bf1"], [0.6, 0.0, 0.0, NAN])
    _assert_close(s["bf_precision"], [0.5, 0.0, NAN, NAN])
    _assert_close(s["bf_recall"], [0.75, 0.0, 0.0, NAN])
    assert s["mbf1"] == pytest.approx(0.2)
    _assert_close(s["iou"], [NAN] * 4)


def test_empty_accumulator_is_nan_without_warnings() -> None:
    acc = MetricAccumulator(num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = acc.compute()
    assert (
        math.isnan(s["miou"]) and math.isnan(s["mbiou"]) and math.isnan(s["mbf1"]) and math.isnan(s["aAcc"])
    )


# ------------------------------------------------------------------------------------------------
# Class vs rest, boundary errors, inputs
# ------------------------------------------------------------------------------------------------


def test_class_vs_rest_scoring() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:, 2:] = 7
    labels[0, 0] = 255
    binary = binarize(labels, 7)
    assert binary.tolist() == [[255, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]

    gt_mask = np.zeros((4, 4), dtype=np.uint8)
    gt_mask[:, 1:] = 1  # hand mask: the class covers columns 1..3
    gt_mask[3, 0] = 255  # void
    pred_mask = labels == 7  # columns 2..3
    counts = binary_counts(pred_mask, gt_mask)
    # Valid: 15 pixels. rest: I 3 (column 0 minus void), U 7; class: I 8, U 12.
    assert counts["area_intersect"].tolist() == [3, 8]
    assert counts["area_union"].tolist() == [7, 12]
    reported = class_vs_rest(metrics_from_counts(counts))
    assert reported["iou"] == pytest.approx(8 / 12)
    assert reported["binary_miou"] == pytest.approx((3 / 7 + 8 / 12) / 2)

    # A bool hand mask with a separate void mask gives the same counts.
    counts2 = binary_counts(pred_mask, gt_mask == 1, ignore_mask=gt_mask == 255)
    for key in COUNT_KEYS:
        assert counts2[key].tolist() == counts[key].tolist()


def test_boundary_errors_single_pixel_shift() -> None:
    gt = np.zeros((9, 9), dtype=np.uint8)
    gt[4, 4] = 1
    pred = np.zeros_like(gt)
    pred[4, 7] = 1
    false_b, missed_b = boundary_errors(pred, gt, num_classes=2)
    assert np.argwhere(false_b).tolist() == [[3, 7], [4, 7]]
    assert np.argwhere(missed_b).tolist() == [[3, 3], [4, 3]]


def test_integer_dtypes_agree() -> None:
    rng = np.random.default_rng(3)
    pred, gt = _random_pair(rng, 20, 26, 4)
    pred64 = pred.astype(np.int64)
    pred64[pred64 == 255] = -1  # negative labels belong to no class either
    gt16 = gt.astype(np.uint16)
    a = image_counts(pred, gt, num_classes=4)
    b = image_counts(pred64, gt16, num_classes=4)
    for key in COUNT_KEYS:
        assert a[key].tolist() == b[key].tolist(), key


def test_bad_inputs_raise() -> None:
    a = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        image_counts(a, np.zeros((4, 5), dtype=np.uint8), num_classes=2)
    with pytest.raises(TypeError, match="float"):
        image_counts(a.astype(np.float32), a, num_classes=2)
    with pytest.raises(ValueError, match="H x W"):
        image_counts(np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((4, 4, 3), dtype=np.uint8), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        image_counts(a, a, num_classes=0)


# ------------------------------------------------------------------------------------------------
# Randomized comparison with the slow reference
# ------------------------------------------------------------------------------------------------


def test_reference_seg2bmap_matches_davis() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (6, 1), (9, 13)]:
        mask = rng.random(shape) < 0.4
        assert np.array_equal(_ref_seg2bmap(mask), _davis_seg2bmap(mask))


@pytest.mark.parametrize(
    ("seed", "h", "w", "c", "d"),
    [
        (0, 24, 31, 3, None),
        (1, 17, 40, 5, None),
        (2, 33, 29, 8, 2),
        (3, 12, 45, 9, 3),  # uint16 bit planes
        (4, 30, 30, 18, None),  # two uint16 groups
        (5, 5, 7, 4, 3),  # band wider than the image
        (6, 1, 20, 3, None),  # a single row
    ],
)
def test_matches_slow_reference(seed: int, h: int, w: int, c: int, d: int | None) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(3):
        pred, gt = _random_pair(rng, h, w, c)
        fast = image_counts(pred, gt, num_classes=c, biou_d=d)
        slow = _ref_counts(pred, gt, c, d=d)
        for key in COUNT_KEYS:
            assert fast[key].tolist() == slow[key].tolist(), key


def test_exact_integer_path_for_huge_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    pred, gt = _random_pair(rng, 40, 37, 6)
    expected = image_counts(pred, gt, num_classes=6)
    monkeypatch.setattr(M, "_CALCHIST_LIMIT", 100)  # force the row-block bincount path
    got = image_counts(pred, gt, num_classes=6)
    for key in COUNT_KEYS:
        assert got[key].tolist() == expected[key].tolist(), key
