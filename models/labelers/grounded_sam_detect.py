"""Grounded-SAM's box stage: GroundingDINO boxes and phrases for one or several text prompts on one image.

Behaviour follows the reference demos (docs/design.md §5.1): a query is kept when its max-over-tokens sigmoid
score is > ``box_threshold``; its phrase is the tokens scoring > ``text_threshold``; then optional
class-agnostic NMS and a top-k cap (``grounded_sam_ops.select_boxes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from addclass.common.errors import InputError
from addclass.models.labelers.grounded_sam_ops import (
    autocast_context,
    build_caption,
    cxcywh_to_xyxy,
    dino_input_size,
    select_boxes,
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
