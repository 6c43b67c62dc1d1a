"""Simulated Grounded-SAM labeler: pseudo-masks from a hand reference mask, degraded like Grounded-SAM.

For experiments and the no-download demo only: it needs the reference (hand) mask of the class, so it is never
a labeler for unlabelled data. Instances are the connected components of the reference mask. Degradations,
applied per instance in this order, mimic Grounded-SAM's failure modes:

1. **Small objects missed**: components smaller than ``min_area_frac * H * W`` are dropped (GroundingDINO sees
   the image at ~800 px on the short side and rarely boxes tiny objects). Default 3e-4: about 15 x 15 px at
   1024 x 768.
2. **Random misses**: every remaining component is dropped with probability ``miss_prob``.
3. **Low-resolution boundaries**: the instance is area-averaged onto a grid whose long side has ``low_res``
   cells (SAM predicts 256 x 256 logits for its 1024 input), the coverage becomes a logit ``coverage - 0.5``,
   which is upsampled bilinearly (half-pixel centres, as ``F.interpolate(align_corners=False)``) and
   thresholded at 0. Corners get rounded, thin parts (narrower than about one cell, ``max(H, W) / low_res``
   px) vanish.
4. **Bleeding**: with probability ``bleed_prob`` an instance is dilated by ``bleed_px`` pixels (elliptic
   kernel), so it leaks into neighbours and background.
5. **False positives** (optional): a Poisson(``false_positives``) number of elliptic blobs of area
   ``fp_area_frac * H * W`` at random places, as extra instances scoring in [0.35, 0.4) (true instances score
   in [0.4, 0.9]); ``extra["is_false_positive"]`` flags them.

Deterministic: every image gets its own generator seeded from ``seed`` and a key (``image_sha256`` or a hash
of the reference mask) plus the prompt, so results do not depend on call order.

How far a pseudo-mask is from its reference is measured with ``models.metrics`` (class-vs-rest IoU and BIoU,
as the pseudo-label rows of the evaluation; tests/models/test_simulated_labeler.py passes a wider band).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from addclass.common.errors import InputError
from addclass.models.labelers.label_record import LabelRecord


@lru_cache(maxsize=16)
def _area_weights(n_full: int, n_low: int) -> np.ndarray:
    """n_low x n_full: overlap of full-res pixel [x, x+1) with low-res cell i, divided by the cell size."""
    cell = n_full / n_low
    edges = np.arange(n_low + 1) * cell
    x = np.arange(n_full, dtype=np.float64)
    lo = np.maximum(x[None, :], edges[:-1, None])
    hi = np.minimum(x[None, :] + 1.0, edges[1:, None])
    weights = np.clip(hi - lo, 0.0, None) / cell
    weights.setflags(write=False)
    return weights.astype(np.float32)


def _bilinear_taps(
    start: int, stop: int, n_full: int, n_low: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for full-res positions [start, stop), half-pixel centres."""
    src = (np.arange(start, stop) + 0.5) * (n_low / n_full) - 0.5
    src = np.clip(src, 0.0, None)  # as F.interpolate(align_corners=False): negative coordinates clamp to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), n_low - 1)
    i1 = np.minimum(i0 + 1, n_low - 1)
    return i0, i1, (src - i0).astype(np.float32)


def low_res_roundtrip(mask: np.ndarray, *, low_res: int) -> np.ndarray:
    """Area-downsample an H x W mask to a grid with ``low_res`` cells on the long side, upsample the logit
    ``coverage - 0.5`` bilinearly and threshold at 0. Only the mask's bounding box (plus 2 cells) is computed.

    Args:
        mask: H x W bool.
        low_res: Cells along the long side; no change when >= max(H, W).

    Returns:
        H x W bool.
    """
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    if low_res >= max(height, width) or not mask.any():
        return mask.copy()
    low_h = max(1, round(height * low_res / max(height, width)))
    low_w = max(1, round(width * low_res / max(height, width)))
    wy, wx = _area_weights(height, low_h), _area_weights(width, low_w)  # low_h x H, low_w x W
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    pad_y = int(np.ceil(2 * height / low_h))  # 2 cells: beyond them the logit is exactly -0.5
    pad_x = int(np.ceil(2 * width / low_w))
    y0, y1 = max(0, rows[0] - pad_y), min(height, rows[-1] + 1 + pad_y)
    x0, x1 = max(0, cols[0] - pad_x), min(width, cols[-1] + 1 + pad_x)
    # Coverage on the whole low-res grid, from the window only (the mask is empty outside it).
    coverage = wy[:, y0:y1] @ mask[y0:y1, x0:x1].astype(np.float32) @ wx[:, x0:x1].T  # low_h x low_w
    logits = coverage - 0.5
    r0, r1, ry = _bilinear_taps(y0, y1, height, low_h)
    c0, c1, cx = _bilinear_taps(x0, x1, width, low_w)
    top = logits[r0][:, c0] * (1 - cx) + logits[r0][:, c1] * cx  # (y1-y0) x (x1-x0)
    bottom = logits[r1][:, c0] * (1 - cx) + logits[r1][:, c1] * cx
    window = (top * (1 - ry)[:, None] + bottom * ry[:, None]) > 0
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = window
    return out


def _bbox_xyxy(mask: np.ndarray) -> list[float]:
    """Pixel xyxy (x1, y1 exclusive, i.e. continuous pixel-edge coordinates) of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


class SimulatedLabeler:
    """Grounded-SAM-like pseudo-labels from a reference mask (experiments and the no-download demo only).

    Args:
        low_res: Long side of the simulated low-resolution mask grid (SAM: 256).
        min_area_frac: Components below this fraction of the image area are missed.
        miss_prob: Probability of missing any other component.
        bleed_prob: Probability that an instance bleeds (is dilated).
        bleed_px: Bleeding radius in pixels.
        false_positives: Expected number of false-positive blobs per image (Poisson); 0 disables them.
        fp_area_frac: Area of a false-positive blob as a fraction of the image.
        connectivity: 4 or 8, for connected components.
        seed: Base seed.
    """

    def __init__(
        self,
        *,
        low_res: int = 256,
        min_area_frac: float = 3e-4,
        miss_prob: float = 0.05,
        bleed_prob: float = 0.25,
        bleed_px: int = 3,
        false_positives: float = 0.0,
        fp_area_frac: float = 2e-3,
        connectivity: int = 8,
        seed: int = 0,
    ) -> None:
        for name, value in (("miss_prob", miss_prob), ("bleed_prob", bleed_prob)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1]. Got {value} instead.")
        if (
            low_res < 1
            or bleed_px < 0
            or min_area_frac < 0
            or false_positives < 0
            or not 0 < fp_area_frac < 1
        ):
            raise InputError(
                "Expected low_res >= 1, bleed_px >= 0, min_area_frac >= 0, false_positives >= 0, "
                "0 < fp_area_frac < 1. "
                f"Got {low_res}, {bleed_px}, {min_area_frac}, {false_positives}, {fp_area_frac} instead."
            )
        if connectivity not in (4, 8):
            raise InputError(f"connectivity must be 4 or 8. Got {connectivity} instead.")
        self.low_res = int(low_res)
        self.min_area_frac = float(min_area_frac)
        self.miss_prob = float(miss_prob)
        self.bleed_prob = float(bleed_prob)
        self.bleed_px = int(bleed_px)
        self.false_positives = float(false_positives)
        self.fp_area_frac = float(fp_area_frac)
        self.connectivity = int(connectivity)
        self.seed = int(seed)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (JSON-serialisable)."""
        return {
            "labeler": "simulated",
            "simulated": True,
            "low_res": self.low_res,
            "min_area_frac": self.min_area_frac,
            "miss_prob": self.miss_prob,
            "bleed_prob": self.bleed_prob,
            "bleed_px": self.bleed_px,
            "false_positives": self.false_positives,
            "fp_area_frac": self.fp_area_frac,
            "connectivity": self.connectivity,
            "seed": self.seed,
        }

    def _rng(self, reference: np.ndarray, prompt: str, image_sha256: str | None) -> np.random.Generator:
        if image_sha256 is None:
            digest = hashlib.sha256(f"{reference.shape}".encode())
            digest.update(np.packbits(reference).tobytes())
            image_sha256 = digest.hexdigest()
        key = hashlib.sha256(f"{image_sha256}|{prompt}".encode()).hexdigest()
        return np.random.default_rng([self.seed, int(key[:16], 16)])

    def label(
        self,
        image_rgb: np.ndarray | None,
        prompt: str,
        *,
        image_sha256: str | None = None,
        reference_mask: np.ndarray | None = None,
    ) -> LabelRecord:
        """Pseudo-label derived from ``reference_mask`` (H x W bool, the hand mask of the prompt's class).

        Args:
            image_rgb: The image (only its size is checked; may be None).
            prompt: The class prompt (recorded as every instance's phrase; part of the seed).
            image_sha256: Key for the per-image seed (default: a hash of the reference mask).
            reference_mask: H x W bool hand mask (required).

        Returns:
            ``LabelRecord`` with one instance per surviving component (+ false positives), best score first;
            ``extra`` counts what each degradation did.
        """
        if reference_mask is None:
            raise InputError("The simulated labeler needs reference_mask (the hand mask). Got None instead.")
        reference = np.asarray(reference_mask, bool)
        if reference.ndim != 2:
            raise InputError(f"reference_mask must be H x W. Got shape {reference.shape} instead.")
        if image_rgb is not None and image_rgb.shape[:2] != reference.shape:
            raise InputError(
                f"Image {image_rgb.shape[:2]} and reference mask {reference.shape} differ in size."
            )
        rng = self._rng(reference, prompt, image_sha256)
        masks, scores, counts = self._true_instances(reference, rng)
        fp_masks, fp_scores = self._false_positives(reference.shape, rng)
        counts["false_pos"] = len(fp_masks)
        is_fp = [False] * len(masks) + [True] * len(fp_masks)
        return _record(masks + fp_masks, scores + fp_scores, is_fp, prompt=prompt, shape=reference.shape,
                       counts=counts)

    def _true_instances(
        self, reference: np.ndarray, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[float], dict[str, int]]:
        """Degrade each connected component of ``reference`` (steps 1-4 of the module docstring).

        Returns:
            (H x W bool masks, their scores, what each degradation did: ``components``, ``small_dropped``,
            ``missed``, ``vanished``, ``bled``, ``false_pos`` (0 here)).
        """
        height, width = reference.shape
        num, labels, stats, _ = cv2.connectedComponentsWithStats(
            reference.astype(np.uint8), connectivity=self.connectivity
        )
        min_area = self.min_area_frac * height * width
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self.bleed_px + 1,) * 2)
        masks: list[np.ndarray] = []
        scores: list[float] = []
        counts = {
            "components": num - 1,
            "small_dropped": 0,
            "missed": 0,
            "vanished": 0,
            "bled": 0,
            "false_pos": 0,
        }
        for i in range(1, num):
            # Draw every random number for every component, so one setting never shifts the others' draws.
            miss, bleed, score = rng.random(), rng.random(), rng.uniform(0.4, 0.9)
            if stats[i, cv2.CC_STAT_AREA] < min_area:
                counts["small_dropped"] += 1
                continue
            if miss < self.miss_prob:
                counts["missed"] += 1
                continue
            inst = low_res_roundtrip(labels == i, low_res=self.low_res)
            if bleed < self.bleed_prob and self.bleed_px > 0 and inst.any():
                x0, y0, x1, y1 = (int(v) for v in _bbox_xyxy(inst))
                pad = self.bleed_px + 1
                window = (slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad))
                inst[window] = cv2.dilate(inst[window].astype(np.uint8), kernel).astype(bool)
                counts["bled"] += 1
            if not inst.any():
                counts["vanished"] += 1
                continue
            masks.append(inst)
            scores.append(score)
        return masks, scores, counts

    def _false_positives(
        self, shape: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[float]]:
        """Poisson(``false_positives``) elliptic blobs (step 5), scoring below every true instance."""
        height, width = shape
        masks: list[np.ndarray] = []
        scores: list[float] = []
        for _ in range(rng.poisson(self.false_positives) if self.false_positives > 0 else 0):
            blob = np.zeros((height, width), np.uint8)
            area = self.fp_area_frac * height * width
            aspect = rng.uniform(0.5, 2.0)
            axes = (max(1, int(np.sqrt(area * aspect / np.pi))), max(1, int(np.sqrt(area / aspect / np.pi))))
            reach = min(max(axes), (min(height, width) - 1) // 2)  # keep the blob inside the image
            center = (int(rng.integers(reach, width - reach)), int(rng.integers(reach, height - reach)))
            cv2.ellipse(blob, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
            masks.append(blob.astype(bool))
            scores.append(float(rng.uniform(0.35, 0.4)))  # below every true instance
        return masks, scores


def _record(
    masks: list[np.ndarray],
    scores: list[float],
    is_fp: list[bool],
    *,
    prompt: str,
    shape: tuple[int, ...],
    counts: dict[str, int],
) -> LabelRecord:
    """The ``LabelRecord`` of the instances, best score first (ties keep their order)."""
    height, width = shape
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    instance_masks = np.stack([masks[k] for k in order]) if masks else np.zeros((0, height, width), bool)
    return LabelRecord.from_instances(
        instance_masks=instance_masks,
        boxes=np.asarray([_bbox_xyxy(masks[k]) for k in order], np.float32).reshape(-1, 4),
        scores=np.asarray([scores[k] for k in order], np.float32),
        phrases=[prompt] * len(masks),
        extra={
            "prompt": prompt,
            "simulated": True,
            **counts,
            "is_false_positive": [is_fp[k] for k in order],
        },
    )
