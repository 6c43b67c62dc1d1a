"""Pure Grounded-SAM helpers: GroundingDINO input size, box conversion and selection, SAM mask-logit
upsampling, the caption/token bookkeeping of several prompts, and the autocast dtype. No model, no I/O."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from addclass.common.errors import InputError
from addclass.models.labelers.options import check_tiles

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def parse_dtype(dtype: str | None, device: torch.device) -> str | None:
    """Canonical autocast dtype name (None = float32, no autocast)."""
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)} or None. Got {dtype!r} instead.")
    if name == "float16" and device.type != "cuda":
        raise InputError(f"dtype float16 needs a CUDA device. Got device {device} instead.")
    return None if name == "float32" else name


def autocast_context(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` (a ``parse_dtype`` name) on ``device``'s type; a no-op for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def dino_input_size(
    height: int, width: int, *, size: int = 800, max_size: int | None = 1333
) -> tuple[int, int]:
    """(h, w) that GroundingDINO's ``RandomResize([size], max_size)`` gives an H x W image."""
    # Adapted from groundingdino/datasets/transforms.py: resize.get_size_with_aspect_ratio.
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = round(max_size * short / long)
    if (width <= height and width == size) or (height <= width and height == size):
        return (height, width)
    if width < height:
        return (int(size * height / width), size)
    return (size, int(size * width / height))


def cxcywh_to_xyxy(boxes: torch.Tensor, *, height: int, width: int, clip: bool = True) -> torch.Tensor:
    """Normalized cxcywh (GroundingDINO ``pred_boxes``) -> pixel xyxy at the original size.

    Args:
        boxes: N x 4 in [0, 1], relative to the unpadded image.
        height: Original image height H.
        width: Original image width W.
        clip: Clip to [0, W] x [0, H].

    Returns:
        N x 4 float32 (x0, y0, x1, y1) in pixels.
    """
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    cx, cy, w, h = (boxes.float() * scale).unbind(-1)  # each N
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # N x 4
    if clip:
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return xyxy


def select_boxes(
    scores: torch.Tensor,
    boxes_xyxy: torch.Tensor,
    *,
    box_threshold: float,
    nms_iou: float | None,
    max_boxes: int | None,
) -> torch.Tensor:
    """Indices of the detections to keep, best first: score > threshold, then NMS, then the top-k cap.

    Args:
        scores: N detection scores.
        boxes_xyxy: N x 4 pixel boxes.
        box_threshold: Keep scores strictly above this (reference: ``> box_threshold``).
        nms_iou: Class-agnostic NMS IoU threshold; None disables NMS.
        max_boxes: Keep at most this many; None = no cap.

    Returns:
        K int64 indices into the inputs, sorted by decreasing score.
    """
    idx = torch.nonzero(scores > box_threshold).flatten()
    if nms_iou is not None and idx.numel():
        from torchvision.ops import nms

        idx = idx[nms(boxes_xyxy[idx].float(), scores[idx].float(), nms_iou)]  # sorted by score
    else:
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
    return idx[:max_boxes] if max_boxes is not None else idx


def upsample_mask_logits(
    low_res_logits: torch.Tensor,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int = 1024,
    threshold: float = 0.0,
    chunk_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM low-res mask logits -> boolean masks at the original resolution, a chunk of boxes at a time.

    Same arithmetic as ``Sam.postprocess_masks`` + ``> mask_threshold``: bilinear to ``img_size``², crop to
    the resized image (``input_size``, the padding is bottom/right), bilinear to ``original_size``. Only a
    chunk of boxes is held as float at full resolution (about ``chunk_bytes``), and each chunk is ORed into
    the union right away.

    Args:
        low_res_logits: N x 1 x h x w logits (h = w = 256 for SAM).
        input_size: (h, w) of the image after ``ResizeLongestSide(img_size)``.
        original_size: (H, W) of the original image.
        img_size: SAM input size (1024).
        threshold: Logit threshold (SAM's ``mask_threshold`` = 0).
        chunk_bytes: Budget for the float masks of one chunk.

    Returns:
        (instances N x H x W bool, union H x W bool), on CPU.
    """
    n = low_res_logits.shape[0]
    height, width = original_size
    instances = torch.zeros((n, height, width), dtype=torch.bool)
    union = torch.zeros((height, width), dtype=torch.bool)
    per_box = 4 * (height * width + img_size * img_size)
    chunk = max(1, chunk_bytes // per_box)
    for start in range(0, n, chunk):
        logits = low_res_logits[start : start + chunk].float()  # n' x 1 x h x w
        logits = F.interpolate(logits, (img_size, img_size), mode="bilinear", align_corners=False)
        logits = logits[..., : input_size[0], : input_size[1]]  # n' x 1 x h_in x w_in
        logits = F.interpolate(
            logits, (height, width), mode="bilinear", align_corners=False
        )  # n' x 1 x H x W
        masks = (logits[:, 0] > threshold).cpu()  # n' x H x W
        del logits
        instances[start : start + masks.shape[0]] = masks
        union |= masks.any(dim=0)
    return instances, union


def build_caption(prompts: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Joint caption ``"car . bicycle ."`` and each prompt's character span in it."""
    caption, spans = "", []
    for prompt in prompts:
        text = prompt.lower().strip().rstrip(".").strip()
        if not text:
            raise InputError(f"Prompts must be non-empty. Got {prompt!r} instead.")
        spans.append((len(caption), len(caption) + len(text)))
        caption += text + " . "
    return caption.strip(), spans


def token_prompt_index(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per token, the index of the prompt whose character span holds it; -1 for special tokens and '.'."""
    out = torch.full((len(offsets),), -1, dtype=torch.long)
    for t, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # [CLS], [SEP], padding
        for p, (s, e) in enumerate(spans):
            if start >= s and end <= e:
                out[t] = p
                break
    return out


# ---------------------------------------------------------------------------------------------- tiled detection


def tile_windows(height: int, width: int, *, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` windows of at most ``tile`` x ``tile`` px covering an H x W image, neighbours
    overlapping by at least ``overlap`` px, spread evenly; none when the image fits in one tile (the whole-image
    pass sees it all).

    Raises:
        InputError: as `check_tiles`.
    """
    check_tiles(tile, overlap)
    if height <= tile and width <= tile:
        return []

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        count = -(-(n - overlap) // (tile - overlap))  # ceil: enough tiles for the overlap wanted
        step = (n - tile) / (count - 1)
        return [round(i * step) for i in range(count)]

    return [(y, x, min(y + tile, height), min(x + tile, width)) for y in starts(height) for x in starts(width)]


def cut_edges(boxes: torch.Tensor, window: tuple[int, int, int, int], *, height: int, width: int,
              margin: float = 2.0) -> torch.Tensor:
    """N bool: the boxes (pixel xyxy in the image) that touch an edge of ``window`` lying inside the image,
    i.e. that the tile may have cut off."""
    y0, x0, y1, x1 = window
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    for edge, side, inside in ((x0, 0, x0 > 0), (y0, 1, y0 > 0), (x1, 2, x1 < width), (y1, 3, y1 < height)):
        if inside:
            cut |= (boxes[:, side] - edge).abs() <= margin
    return cut


def merge_tiled_boxes(
    boxes: torch.Tensor, scores: torch.Tensor, cut: torch.Tensor, *, nms_iou: float | None, ios: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One set of boxes from the whole-image pass and the tiles' (all in image pixels).

    NMS (IoU ``nms_iou``) first removes the same object seen by several passes; then every box that a tile edge
    cut (``cut``), weakest first, is merged into the kept box it overlaps most by intersection over the smaller
    box (``>= ios``): the kept box grows to the union, keeps its score and phrase. So an object split across
    tiles comes back as one box, and two objects side by side stay two.

    Returns:
        (M x 4 boxes, M scores, M indices into the inputs of each box's representative), best first.
    """
    from torchvision.ops import nms

    order = torch.argsort(scores, descending=True, stable=True)
    keep = order if nms_iou is None or not len(order) else nms(boxes.float(), scores.float(), nms_iou)
    kept = [int(i) for i in keep]
    merged = {i: boxes[i].clone() for i in kept}
    for i in sorted((i for i in kept if bool(cut[i])), key=lambda i: float(scores[i])):
        others = [j for j in kept if j != i]
        if not others:
            continue
        b = merged[i]
        inter = torch.stack([_intersection(b, merged[j]) for j in others])
        smaller = torch.stack([torch.minimum(_area(b), _area(merged[j])) for j in others]).clamp_min(1e-6)
        best = int(torch.argmax(inter / smaller))
        if float(inter[best] / smaller[best]) >= ios:
            j = others[best]
            merged[j] = torch.cat([torch.minimum(merged[j][:2], b[:2]), torch.maximum(merged[j][2:], b[2:])])
            kept.remove(i)
    index = torch.tensor(kept, dtype=torch.int64)
    out = torch.stack([merged[i] for i in kept]) if kept else boxes[:0]
    return out, scores[index], index


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[2] - b[0]).clamp_min(0) * (b[3] - b[1]).clamp_min(0)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    w = torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])
    h = torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])
    return w.clamp_min(0) * h.clamp_min(0)


# ----------------------------------------------------------------------------------------------- mask clean-up


def remove_small_regions(mask: Any, min_area: int) -> Any:
    """H x W bool ``mask`` with its holes smaller than ``min_area`` px filled and its islands smaller than that
    removed: segment-anything's ``remove_small_regions`` (8-connected regions, what SAM's automatic mask
    generator uses), holes first, then islands. A mask whose every island is small keeps its largest one, so a
    small object is not erased."""
    import numpy as np
    from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

    mask = np.asarray(mask, bool)
    if min_area <= 0 or not mask.any():
        return mask
    for mode in ("holes", "islands"):
        mask, _ = sam_remove_small_regions(mask, min_area, mode)
    return np.asarray(mask, bool)


# ------------------------------------------------------------------------------------------ phrases, refinement


def split_phrases(prompt: str) -> list[str]:
    """The phrases of one class prompt, GroundingDINO's caption separator: ``"car . van . truck"`` ->
    ``["car", "van", "truck"]`` (one phrase for a plain prompt; empty pieces are an InputError)."""
    phrases = [p.strip() for p in prompt.strip().rstrip(".").split(" . ")]
    if not all(phrases):
        raise InputError(f"Expected phrases separated by ' . ' (e.g. 'car . van'). Got {prompt!r} instead.")
    return phrases


def check_phrases(phrases: Sequence[str], *, what: str) -> tuple[str, ...]:
    """``phrases`` as a tuple of non-empty, distinct strings without the ' . ' separator; else InputError
    naming ``what``."""
    if isinstance(phrases, str):
        raise InputError(f"{what} must be a list of phrases. Got the string {phrases!r} instead.")
    out = tuple(str(p).strip() for p in phrases)
    if not all(out) or len(set(out)) != len(out) or any(" . " in p or p.endswith(".") for p in out):
        raise InputError(f"{what} must be distinct, non-empty phrases without ' . '. Got {list(phrases)} instead.")
    return out


def refine_window(
    box: Sequence[float], *, height: int, width: int, margin: float, min_side: int = 64
) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` crop around an xyxy pixel ``box``: the box grown by ``margin`` x its side on each
    side (at least ``min_side`` px in all), clipped to the H x W image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    pad_x = max(margin * bw, (min_side - bw) / 2, 0.0)
    pad_y = max(margin * bh, (min_side - bh) / 2, 0.0)
    left, top = max(0, math.floor(x0 - pad_x)), max(0, math.floor(y0 - pad_y))
    right, bottom = min(width, math.ceil(x1 + pad_x)), min(height, math.ceil(y1 + pad_y))
    return top, left, max(bottom, top + 1), max(right, left + 1)
