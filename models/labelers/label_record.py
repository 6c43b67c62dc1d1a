"""``LabelRecord``: what a labeler returns for one image and one prompt, plus RLE helpers for its masks.

Contract (docs/interfaces.md): ``mask`` H x W bool (union), ``instance_masks`` N x H x W bool, ``boxes``
N x 4 float32 pixel xyxy at the original size, ``scores`` N float32, ``phrases`` list[str]. ``mask`` is always
the OR of ``instance_masks`` (``from_instances`` builds it that way).

RLE format: COCO *uncompressed* RLE, ``{"size": [H, W], "counts": [c0, c1, ...]}``. Pixels are read in
column-major (Fortran) order, as pycocotools does; runs alternate 0s and 1s and always start with a (possibly
empty) run of 0s. It is plain JSON, and ``pycocotools.mask.frPyObjects(rle, H, W)`` turns it into pycocotools'
compressed form. ``rle_decode`` also accepts compressed RLE (``counts`` a str/bytes) through pycocotools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from addclass.common.errors import InputError


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode an H x W boolean mask as COCO uncompressed RLE.

    Args:
        mask: H x W array; nonzero = foreground.

    Returns:
        ``{"size": [H, W], "counts": [int, ...]}``, counts summing to H * W.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"rle_encode expects an H x W mask. Got shape {m.shape} instead.")
    height, width = m.shape
    flat = m.astype(bool).ravel(order="F")  # column-major, as COCO
    if flat.size == 0:
        return {"size": [int(height), int(width)], "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first index of every new run
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))  # counts start with the run of zeros
    return {"size": [int(height), int(width)], "counts": [int(c) for c in runs]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode COCO RLE (uncompressed list counts, or compressed str/bytes via pycocotools) to H x W bool."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as mask_utils

        coded = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(coded).astype(bool)
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise InputError(f"RLE counts sum to {int(runs.sum())}, expected H * W = {height * width}.")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape((height, width), order="F"))


@dataclass(eq=False)
class LabelRecord:
    """Pseudo-label of one prompt on one image.

    Attributes:
        mask: H x W bool, union of the instance masks.
        instance_masks: N x H x W bool, one mask per detection.
        boxes: N x 4 float32, pixel xyxy (continuous coordinates) at the original image size.
        scores: N float32, detection confidence (GroundingDINO box score for Grounded-SAM).
        phrases: N strings, the phrase each detection was grounded to.
        extra: Optional JSON-serialisable details (e.g. the prompt, SAM IoU predictions).
    """

    mask: np.ndarray
    instance_masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise InputError(f"mask must be H x W bool. Got {self.mask.shape} {self.mask.dtype} instead.")
        n = self.instance_masks.shape[0] if self.instance_masks.ndim == 3 else -1
        if n < 0 or self.instance_masks.shape[1:] != self.mask.shape or self.instance_masks.dtype != np.bool_:
            raise InputError(
                f"instance_masks must be N x {self.mask.shape[0]} x {self.mask.shape[1]} bool. "
                f"Got {self.instance_masks.shape} {self.instance_masks.dtype} instead."
            )
        if self.boxes.shape != (n, 4) or self.boxes.dtype != np.float32:
            raise InputError(
                f"boxes must be {n} x 4 float32. Got {self.boxes.shape} {self.boxes.dtype} instead."
            )
        if self.scores.shape != (n,) or self.scores.dtype != np.float32:
            raise InputError(
                f"scores must be ({n},) float32. Got {self.scores.shape} {self.scores.dtype} instead."
            )
        if len(self.phrases) != n:
            raise InputError(f"Expected {n} phrases. Got {len(self.phrases)} instead.")

    @classmethod
    def from_instances(
        cls,
        *,
        instance_masks: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        phrases: list[str],
        extra: dict[str, Any] | None = None,
    ) -> LabelRecord:
        """Build a record whose ``mask`` is the OR of ``instance_masks`` (N x H x W)."""
        instance_masks = np.asarray(instance_masks, dtype=bool)
        mask = (
            np.asarray(instance_masks.any(axis=0))
            if instance_masks.shape[0]
            else np.zeros(instance_masks.shape[1:], bool)
        )
        return cls(
            mask=mask,
            instance_masks=instance_masks,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.asarray(scores, dtype=np.float32).reshape(-1),
            phrases=list(phrases),
            extra=dict(extra or {}),
        )

    @classmethod
    def empty(cls, *, height: int, width: int, extra: dict[str, Any] | None = None) -> LabelRecord:
        """A record with no detections."""
        return cls.from_instances(
            instance_masks=np.zeros((0, height, width), dtype=bool),
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            phrases=[],
            extra=extra,
        )

    @property
    def num_instances(self) -> int:
        """N, the number of detections."""
        return int(self.instance_masks.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; instance masks as COCO uncompressed RLE (union recomputed on load)."""
        return {
            "size": list(self.size),
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "phrases": list(self.phrases),
            "instances": [rle_encode(m) for m in self.instance_masks],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelRecord:
        """Inverse of ``to_dict``."""
        height, width = (int(v) for v in data["size"])
        instances = [rle_decode(r) for r in data["instances"]]
        masks = np.stack(instances) if instances else np.zeros((0, height, width), dtype=bool)
        return cls.from_instances(
            instance_masks=masks,
            boxes=np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 4),
            scores=np.asarray(data["scores"], dtype=np.float32).reshape(-1),
            phrases=list(data["phrases"]),
            extra=dict(data.get("extra", {})),
        )
