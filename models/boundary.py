"""Boundary machinery of the metrics: BIoU bands and BF1 boundary counts (docs/design.md §4.3, §4.4, §4.6).

Everything here works on compact uint8 **class codes** (``models.metrics`` makes them): 0..C-1 the classes,
C "no class", C+1 ignore (ground truth only). All classes are handled at once, with no loop per pixel or per
class for C <= 16:

- BIoU: a pixel of class c is in the band of class c iff its (2d+1)^2 window leaves the image or holds a
  label other than c, i.e. iff ``min != max`` over the window. One rectangular erosion and one dilation
  per label map give the bands of every class (``biou_band``).
- BF1: classes are one-hot bits (uint8 for C <= 8, uint16 groups otherwise). For one-hot codes,
  ``bit(a) ^ bit(b)`` is exactly the set of classes whose binary masks differ between two pixels, so
  seg2bmap of every class is ``(b ^ b_E) | (b ^ b_S) | (b ^ b_SE)`` at once. disk(2) is the 13-pixel
  diamond = plus (+) plus, so the tolerance is two bitwise-OR dilations with a plus. Per-class counts
  come from byte histograms of the (sparse) boundary pixels (``bf1_counts``, ``bf1_errors``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

__all__ = [
    "BF1_TOLERANCE_PX",
    "BIOU_DILATION_RATIO",
    "bf1_counts",
    "bf1_errors",
    "biou_band",
    "boundary_width",
]

BIOU_DILATION_RATIO = 0.001  # MaSS13K generate_binary_mask ratio
BF1_TOLERANCE_PX = 2  # disk(2): the 13-pixel diamond


def boundary_width(h: int, w: int) -> int:
    """BIoU band width d for an H x W ground truth (MaSS13K).

    ``d = max(1, int(round(0.001 * sqrt(H**2 + W**2))))`` with Python's half-to-even ``round``: 1500 x 2000
    (diagonal 2500) gives 2 and 2700 x 3600 gives 4, where C-style rounding would give 3 and 5.

    Args:
        h: Height of the ground truth in pixels.
        w: Width of the ground truth in pixels.

    Returns:
        The band width in pixels, at least 1.
    """
    return max(1, round(BIOU_DILATION_RATIO * math.sqrt(h * h + w * w)))


# ----------------------------------------------------------------------------------------------------------
# BIoU bands
# ----------------------------------------------------------------------------------------------------------


def biou_band(codes: np.ndarray, d: int) -> np.ndarray:
    """uint8 mask (0/1) of pixels whose (2d+1)^2 window leaves the image or holds another code.

    For a pixel of class c this is exactly membership of the MaSS13K band of class c: within chessboard
    distance d of a pixel that is not c or of the image outside (the zero pad).

    Args:
        codes: H x W uint8 class codes.
        d: Band width, at least 1.

    Returns:
        H x W uint8 band mask in {0, 1}.
    """
    kernel = np.ones((2 * d + 1, 2 * d + 1), dtype=np.uint8)
    # The default constant border is neutral for min and max; the frame below stands for the zero pad.
    lo = cv2.erode(codes, kernel)
    hi = cv2.dilate(codes, kernel)
    band: np.ndarray = (lo != hi).view(np.uint8)
    band[:d] = 1
    band[-d:] = 1
    band[:, :d] = 1
    band[:, -d:] = 1
    return band


# ----------------------------------------------------------------------------------------------------------
# BF1 boundaries as one-hot bit planes
# ----------------------------------------------------------------------------------------------------------


def _bit_groups(num_classes: int) -> list[tuple[int, int, type[np.unsignedinteger[Any]]]]:
    """Class groups (first class, number of classes, dtype) for the one-hot bit planes."""
    if num_classes <= 8:
        return [(0, num_classes, np.uint8)]
    return [(lo, min(16, num_classes - lo), np.uint16) for lo in range(0, num_classes, 16)]


def _onehot(codes: np.ndarray, lo: int, n: int, dtype: type[np.unsignedinteger[Any]]) -> np.ndarray:
    """Bit ``c - lo`` set where the code is class c in lo..lo+n-1; 0 elsewhere."""
    lut = np.zeros(256, dtype=dtype)
    lut[lo : lo + n] = (1 << np.arange(n)).astype(dtype)
    return cv2.LUT(codes, lut)


def _seg2bmap_bits(bits: np.ndarray) -> np.ndarray:
    """DAVIS seg2bmap of every bit plane at once: differs from its E, S or SE neighbour (inside the image)."""
    out = np.zeros_like(bits)
    np.bitwise_xor(bits[:, :-1], bits[:, 1:], out=out[:, :-1])  # E
    out[:-1, :] |= bits[:-1, :] ^ bits[1:, :]  # S
    out[:-1, :-1] |= bits[:-1, :-1] ^ bits[1:, 1:]  # SE
    return out


def _or_dilate_plus(bits: np.ndarray) -> np.ndarray:
    """Bitwise-OR dilation with the 5-pixel plus."""
    out = bits.copy()
    out[1:] |= bits[:-1]
    out[:-1] |= bits[1:]
    out[:, 1:] |= bits[:, :-1]
    out[:, :-1] |= bits[:, 1:]
    return out


def _or_dilate_disk2(bits: np.ndarray) -> np.ndarray:
    """Bitwise-OR dilation with skimage ``disk(2)`` (x^2 + y^2 <= 4: the 13-pixel diamond = plus (+) plus)."""
    return _or_dilate_plus(_or_dilate_plus(bits))


def _bit_counts(values: np.ndarray, n: int) -> np.ndarray:
    """int64 number of elements with bit k set, for each of the n low bits of a 1-D uint8/uint16 array."""
    counts = np.zeros(n, dtype=np.int64)
    for k in range(0, n, 8):
        byte = values if values.dtype == np.uint8 else ((values >> k) & 0xFF).astype(np.uint8)
        hist = np.bincount(byte, minlength=256)  # 256
        m = min(8, n - k)
        has_bit = (np.arange(256)[:, None] >> np.arange(m)[None, :]) & 1  # 256 x m
        counts[k : k + m] = hist @ has_bit
    return counts


def _bf_group_counts(bp: np.ndarray, bg: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(pred matched, pred total, gt matched, gt total) per class of one bit group."""
    pred_match = bp & _or_dilate_disk2(bg)
    gt_match = bg & _or_dilate_disk2(bp)
    # Boundary points are sparse: count bits only where some boundary exists.
    on = (bp | bg) != 0
    return tuple(_bit_counts(a[on], n) for a in (pred_match, bp, gt_match, bg))


def _masked_pred_codes(pred_codes: np.ndarray, gt_codes: np.ndarray, num_classes: int) -> np.ndarray:
    """BF1 prediction: P_c = [pred == c] and [gt != ignore]."""
    masked = pred_codes.copy()
    masked[gt_codes == num_classes + 1] = num_classes
    return masked


def _bf_boundaries(
    pred_codes: np.ndarray, gt_codes: np.ndarray, num_classes: int
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Per class group, one at a time (memory): (first class, n, predicted boundary bits, gt boundary bits).

    The prediction is masked out (set to "no class") where gt is ignore.
    """
    masked = _masked_pred_codes(pred_codes, gt_codes, num_classes)
    for lo, n, dtype in _bit_groups(num_classes):
        bp = _seg2bmap_bits(_onehot(masked, lo, n, dtype))
        bg = _seg2bmap_bits(_onehot(gt_codes, lo, n, dtype))
        yield lo, n, bp, bg


def bf1_counts(pred_codes: np.ndarray, gt_codes: np.ndarray, *, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class BF1 counts of one image: DAVIS-style boundaries, prediction masked on ignore.

    Args:
        pred_codes: H x W uint8 predicted class codes (0..C-1, C no class).
        gt_codes: H x W uint8 ground-truth class codes (0..C-1, C no class, C+1 ignore).
        num_classes: C.

    Returns:
        ``bf_pred_match``, ``bf_pred_total``, ``bf_gt_match``, ``bf_gt_total``: int64 arrays of length C.
    """
    c = num_classes
    bf = {k: np.zeros(c, dtype=np.int64) for k in ("pm", "pt", "gm", "gt")}
    for lo, n, bp, bg in _bf_boundaries(pred_codes, gt_codes, c):
        pm, pt, gm, gtt = _bf_group_counts(bp, bg, n)
        bf["pm"][lo : lo + n] = pm
        bf["pt"][lo : lo + n] = pt
        bf["gm"][lo : lo + n] = gm
        bf["gt"][lo : lo + n] = gtt
    return {
        "bf_pred_match": bf["pm"],
        "bf_pred_total": bf["pt"],
        "bf_gt_match": bf["gm"],
        "bf_gt_total": bf["gt"],
    }


def bf1_errors(
    pred_codes: np.ndarray, gt_codes: np.ndarray, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boundary points that BF1 does not match (any class), prediction masked on ignore.

    Args:
        pred_codes: H x W uint8 predicted class codes (0..C-1, C no class).
        gt_codes: H x W uint8 ground-truth class codes (0..C-1, C no class, C+1 ignore).
        num_classes: C.

    Returns:
        ``(false_boundary, missed_boundary)``, H x W bool: predicted boundary points with no gt boundary
        point of the same class within 2 px, and gt boundary points with no predicted one.
    """
    false_b = np.zeros(gt_codes.shape, dtype=bool)
    missed_b = np.zeros(gt_codes.shape, dtype=bool)
    for _, _, bp, bg in _bf_boundaries(pred_codes, gt_codes, num_classes):
        false_b |= (bp & ~_or_dilate_disk2(bg)) != 0
        missed_b |= (bg & ~_or_dilate_disk2(bp)) != 0
    return false_b, missed_b
