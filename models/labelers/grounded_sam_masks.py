"""Grounded-SAM's mask stage: the mask model's image features (through the embedding cache), every box of an
image in one batched decoder call, the logits upsampled to the image in chunks and, optionally, each box decoded
again on a crop around it (`MaskStage._refine`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from addclass.models.labelers.embedding_cache import EmbeddingCache, embedding_key
from addclass.models.labelers.embedding_cache import image_sha256 as compute_image_sha256
from addclass.models.labelers.grounded_sam_ops import autocast_context, refine_window, upsample_mask_logits
from addclass.models.labelers.sam_engines import SamEngine


class MaskStage:
    """`models.labelers.grounded_sam.GroundedSamLabeler`'s mask stage; it holds the current image's features
    (``features``, ``original_size``)."""

    device: torch.device
    dtype: str | None
    engine: SamEngine
    features: dict[str, torch.Tensor] | None
    original_size: tuple[int, int]
    embedding_cache: EmbeddingCache | None
    sam_variant: str
    sam_weights: str
    mask_chunk_bytes: int
    refine_margin: float

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.device, self.dtype)

    def embedding_cache_key(self, image_sha: str) -> str:
        """Cache key of an image's SAM embedding for this labeler's SAM weights (and autocast dtype)."""
        variant = self.sam_variant if self.dtype is None else f"{self.sam_variant}@{self.dtype}"
        return embedding_key(image_sha256=image_sha, sam_variant=variant, weights_id=self.sam_weights)

    @torch.no_grad()
    def set_image(self, image_rgb: np.ndarray, *, image_sha256: str | None = None) -> bool:
        """Give the mask model the image's features (``self.features``), from the cache when every part is
        there (the first part under the key itself, others under ``<key>.<part>``). Returns True on a hit."""
        self.original_size = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
        cache, parts = self.embedding_cache, self.engine.parts
        keys: list[str] = []
        if cache is not None:
            key = self.embedding_cache_key(image_sha256 or compute_image_sha256(image_rgb))
            keys = [key] + [f"{key}.{part}" for part in parts[1:]]
            cached = [cache.get(k) for k in keys]
            if all(c is not None for c in cached):
                self.features = {part: c.to(self.device) for part, c in zip(parts, cached, strict=True)}  # type: ignore[union-attr]
                return True
        with self._autocast():
            self.features = self.engine.encode(image_rgb)
        if cache is not None:
            for k, part in zip(keys, parts, strict=True):
                cache.put(k, self.features[part])
        return False

    @torch.no_grad()
    def segment_boxes(self, boxes_xyxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All boxes of the current image (`set_image`) through the mask decoder in one batched call.

        Args:
            boxes_xyxy: N x 4 pixel boxes at the original size.

        Returns:
            (low-res logits N x 1 x 256 x 256 float32, predicted IoU N), on CPU.
        """
        if self.features is None:
            raise RuntimeError("Call set_image before segment_boxes.")
        with self._autocast():
            low_res, iou = self.engine.decode(self.features, boxes_xyxy, self.original_size)
        return low_res.float().cpu(), iou.float().cpu()

    def _segment_view(
        self, image_rgb: np.ndarray, boxes_xyxy: torch.Tensor, *, image_sha256: str | None = None,
        cached: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of ``boxes_xyxy`` (pixels of ``image_rgb``) at ``image_rgb``'s resolution.

        Returns:
            (instances N x h x w bool, predicted IoU N), on CPU.
        """
        if cached:
            self.set_image(image_rgb, image_sha256=image_sha256)
        else:  # refinement crops: features of one box's surroundings, never reused
            self.original_size = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
            with torch.no_grad(), self._autocast():
                self.features = self.engine.encode(image_rgb)
        low_res, iou = self.segment_boxes(boxes_xyxy)
        instances, _ = upsample_mask_logits(
            low_res, input_size=self.engine.input_size(self.original_size), original_size=self.original_size,
            img_size=self.engine.img_size, threshold=self.engine.mask_threshold, chunk_bytes=self.mask_chunk_bytes,
        )  # fmt: skip
        return instances, iou

    def _refine(self, image_rgb: np.ndarray, boxes: torch.Tensor, instances: torch.Tensor) -> list[bool]:
        """Replace, per box, the mask inside its `refine_window` by the mask decoded on that crop alone (the
        crop fills the model's input, so a small object gets many more logits). Boxes whose window is more
        than half the image's long side keep the whole-image mask. Returns, per box, whether it was refined."""
        height, width = image_rgb.shape[:2]
        refined = [False] * len(boxes)
        for i, box in enumerate(boxes.tolist()):
            window = refine_window(box, height=height, width=width, margin=self.refine_margin)
            y0, x0, y1, x1 = window
            if max(y1 - y0, x1 - x0) * 2 > max(height, width):
                continue
            local = torch.tensor([[box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]], dtype=torch.float32)
            crop_masks, _ = self._segment_view(image_rgb[y0:y1, x0:x1], local, cached=False)
            instances[i, y0:y1, x0:x1] = crop_masks[0]
            refined[i] = True
        return refined
