"""Grounded-SAM's box stage: GroundingDINO boxes and phrases for one or several text prompts on one image.

Behaviour follows the reference demos (docs/design.md §5.1): a query is kept when its max-over-tokens sigmoid
score is > ``box_threshold``; its phrase is the tokens scoring > ``text_threshold``; then optional
class-agnostic NMS and a top-k cap (``grounded_sam_ops.select_boxes``). `BoxStage` is the labeler's side of
it: its options, tiles of a large image, several phrases per class and negative phrases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou, nms

from addclass.common.errors import InputError
from addclass.models.labelers.grounded_sam_ops import (
    autocast_context,
    build_caption,
    cut_edges,
    cxcywh_to_xyxy,
    dino_input_size,
    merge_tiled_boxes,
    select_boxes,
    split_phrases,
    tile_windows,
    token_prompt_index,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(image_rgb: np.ndarray, *, size: int = 800, max_size: int | None = 1333) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x h x w normalized float, resized as the reference (PIL bilinear)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    height, width = image_rgb.shape[:2]
    hw = dino_input_size(height, width, size=size, max_size=max_size)
    resized = TF.resize(Image.fromarray(image_rgb), list(hw))
    return TF.normalize(TF.to_tensor(resized), list(IMAGENET_MEAN), list(IMAGENET_STD))  # 3 x h x w


@torch.no_grad()
def detect_boxes(
    dino: Any,
    tokenizer: Any,
    image: torch.Tensor,
    prompts: Sequence[str],
    *,
    original_size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
    nms_iou: float | None,
    max_boxes: int | None,
    dtype: str | None = None,
) -> list[dict[str, Any]]:
    """Run GroundingDINO once with the joint caption; per prompt, the selected detections.

    A kept query goes to the prompt whose tokens score highest for it. Its score is the max over all caption
    tokens (the reference's ``logits.max(dim=1)``), so a single prompt behaves exactly as the reference.

    Args:
        dino: The GroundingDINO model.
        tokenizer: Its text tokenizer.
        image: 3 x h x w preprocessed image (``dino_preprocess``) on the model's device.
        prompts: The prompts, joined into one caption ``"p1 . p2 ."``.
        original_size: (H, W) of the image the boxes are given at.
        box_threshold, text_threshold, nms_iou, max_boxes: As ``GroundedSamLabeler``'s.
        dtype: Autocast dtype name (``grounded_sam_ops.parse_dtype``); None = float32.

    Returns:
        Per prompt: ``boxes`` K x 4 pixel xyxy, ``scores`` K, ``phrases`` list of K str, best first.
    """
    from groundingdino.util.utils import get_phrases_from_posmap

    height, width = original_size
    caption, spans = build_caption(prompts)
    tokenized = tokenizer(caption, return_offsets_mapping=True)
    num_tokens = len(tokenized["input_ids"])
    if num_tokens > dino.max_text_len:
        raise InputError(f"Caption has {num_tokens} tokens, GroundingDINO reads {dino.max_text_len}.")
    token_prompt = token_prompt_index(tokenized["offset_mapping"], spans)  # T
    with autocast_context(image.device, dtype):
        out = dino(image[None], captions=[caption])
    probs = out["pred_logits"][0].float().sigmoid().cpu()  # Q x 256 (-inf -> 0 beyond the caption)
    boxes = cxcywh_to_xyxy(out["pred_boxes"][0].float().cpu(), height=height, width=width)  # Q x 4
    scores = probs.max(dim=1).values  # Q
    per_prompt = torch.stack(
        [probs[:, :num_tokens][:, token_prompt == p].max(dim=1).values for p in range(len(prompts))],
        dim=1,
    )  # Q x P
    owner = per_prompt.argmax(dim=1)  # Q
    results = []
    for p in range(len(prompts)):
        candidates = torch.nonzero(owner == p).flatten()
        keep = candidates[
            select_boxes(
                scores[candidates], boxes[candidates], box_threshold=box_threshold,
                nms_iou=nms_iou, max_boxes=max_boxes,
            )
        ]  # fmt: skip
        # Reference: tokens scoring > text_threshold, decoded, '.' removed. Only prompt tokens are decoded
        # (no [CLS]/[SEP]/'.'), as upstream GroundingDINO's later left_idx/right_idx exclusion intends.
        phrases = [
            get_phrases_from_posmap(
                (probs[q, :num_tokens] > text_threshold) & (token_prompt >= 0), tokenized, tokenizer
            ).strip()
            for q in keep.tolist()
        ]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "phrases": phrases})
    return results


class BoxStage:
    """`models.labelers.grounded_sam.GroundedSamLabeler`'s box stage: GroundingDINO on the image (and its tiles),
    per prompt its phrases' detections merged, minus the negative phrases' boxes."""

    device: torch.device
    dino: Any
    tokenizer: Any
    dino_image_size: int
    dino_max_size: int | None
    box_threshold: float
    text_threshold: float
    nms_iou: float | None
    max_boxes: int | None
    dtype: str | None
    tile_size: int | None
    tile_overlap: int
    negative_phrases: tuple[str, ...]
    negative_iou: float

    def dino_preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 -> 3 x h x w normalized float, resized as the reference (PIL bilinear)."""
        return dino_preprocess(image_rgb, size=self.dino_image_size, max_size=self.dino_max_size)

    @torch.no_grad()
    def detect(self, image_rgb: np.ndarray, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Run GroundingDINO once with the joint caption; per prompt, the selected detections
        (``grounded_sam_detect.detect_boxes``).

        Returns:
            Per prompt: ``boxes`` K x 4 pixel xyxy, ``scores`` K, ``phrases`` list of K str, best first.
        """
        height, width = image_rgb.shape[:2]
        windows = [] if self.tile_size is None else tile_windows(height, width, tile=self.tile_size,
                                                                  overlap=self.tile_overlap)
        if not windows:
            return self._detect_view(image_rgb, prompts, max_boxes=self.max_boxes)
        views = [((0, 0, height, width), self._detect_view(image_rgb, prompts, max_boxes=None))]
        for window in windows:
            y0, x0, y1, x1 = window
            found = self._detect_view(image_rgb[y0:y1, x0:x1], prompts, max_boxes=None)
            for d in found:
                d["boxes"] = d["boxes"] + torch.tensor([x0, y0, x0, y0], dtype=d["boxes"].dtype)
            views.append((window, found))
        results = []
        for p in range(len(prompts)):
            boxes = torch.cat([v[p]["boxes"] for _, v in views])
            scores = torch.cat([v[p]["scores"] for _, v in views])
            phrases = [ph for _, v in views for ph in v[p]["phrases"]]
            cut = torch.cat([cut_edges(v[p]["boxes"], w, height=height, width=width) for w, v in views])
            merged, merged_scores, index = merge_tiled_boxes(boxes, scores, cut, nms_iou=self.nms_iou)
            keep = slice(None) if self.max_boxes is None else slice(0, self.max_boxes)
            results.append({"boxes": merged[keep], "scores": merged_scores[keep],
                            "phrases": [phrases[i] for i in index.tolist()][keep]})
        return results

    def _detect_view(self, image_rgb: np.ndarray, prompts: Sequence[str], *,
                     max_boxes: int | None) -> list[dict[str, Any]]:
        height, width = image_rgb.shape[:2]
        return detect_boxes(
            self.dino, self.tokenizer, self.dino_preprocess(image_rgb).to(self.device), prompts,
            original_size=(height, width), box_threshold=self.box_threshold, text_threshold=self.text_threshold,
            nms_iou=self.nms_iou, max_boxes=max_boxes, dtype=self.dtype,
        )  # fmt: skip

    def _class_detections(
        self, image_rgb: np.ndarray, prompts: Sequence[str]
    ) -> tuple[str, list[dict[str, Any]]]:
        """The joint caption and, per prompt, its phrases' detections merged (best first, class-agnostic NMS
        across phrases, top-k), minus the boxes a negative phrase's box overlaps by IoU >= ``negative_iou``."""
        phrase_lists = [split_phrases(p) for p in prompts]
        flat = [ph for phrases in phrase_lists for ph in phrases]
        negatives = list(self.negative_phrases)
        if len(set(flat + negatives)) != len(flat) + len(negatives):
            raise InputError(f"A phrase appears twice among the prompts {list(prompts)} and negative phrases "
                             f"{negatives}.")
        found = self.detect(image_rgb, flat + negatives)
        negative_boxes = torch.cat([d["boxes"] for d in found[len(flat):]] or [torch.zeros(0, 4)])
        results, start = [], 0
        for phrases in phrase_lists:
            group, start = found[start : start + len(phrases)], start + len(phrases)
            if len(group) == 1:
                det = group[0]
            else:
                boxes, scores = torch.cat([d["boxes"] for d in group]), torch.cat([d["scores"] for d in group])
                names = [ph for d in group for ph in d["phrases"]]
                order = torch.argsort(scores, descending=True, stable=True)
                if self.nms_iou is not None and len(order):
                    order = order[nms(boxes[order], scores[order], self.nms_iou)]
                order = order[: self.max_boxes]
                det = {"boxes": boxes[order], "scores": scores[order], "phrases": [names[i] for i in order.tolist()]}
            if len(negative_boxes) and len(det["boxes"]):
                keep = box_iou(det["boxes"], negative_boxes).max(dim=1).values < self.negative_iou
                det = {"boxes": det["boxes"][keep], "scores": det["scores"][keep],
                       "phrases": [ph for ph, k in zip(det["phrases"], keep.tolist(), strict=True) if k]}
            results.append(det)
        return build_caption(flat + negatives)[0], results
