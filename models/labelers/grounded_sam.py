"""Grounded-SAM pseudo-labeler: GroundingDINO boxes for a text prompt, SAM masks for the boxes.

Behaviour follows the reference demos (docs/design.md §5.1, §5.2): caption ``"<prompt> ."``; a
query is kept when its max-over-tokens sigmoid score is > ``box_threshold``; its phrase is the tokens
scoring > ``text_threshold`` (0.25); optional class-agnostic NMS (IoU 0.8) and a top-k cap; every box of an
image goes through SAM in one batched decoder call on one image embedding, ``multimask_output=False``; mask
logits are upsampled to the original resolution (bilinear 256 -> 1024, crop the padding, bilinear to H x W)
and thresholded at 0. The upsampling runs in chunks of boxes, so 20 float masks of a 12 MP image are never
held at once.

Weights (nothing is downloaded; random weights only with ``random_weights=True``). Default file names:

- SAM ``vit_b``: ``sam_vit_b_01ec64.pth``; ``vit_l``: ``sam_vit_l_0b3195.pth``; ``vit_h``:
  ``sam_vit_h_4b8939.pth``. Download: https://github.com/facebookresearch/segment-anything#model-checkpoints
- HQ-SAM (``hq_vit_b`` ...: ``sam_hq_vit_b.pth`` ...) and SAM 2.1 (``sam2.1_hiera_t`` ...:
  ``sam2.1_hiera_tiny.pt`` ...): ``models.labelers.sam_engines.SAM_VARIANTS``, which also says where to get them.
- GroundingDINO ``swint_ogc``: ``groundingdino_swint_ogc.pth``; ``swinb``:
  ``groundingdino_swinb_cogcoor.pth``. Download: https://github.com/IDEA-Research/GroundingDINO/releases

A checkpoint path is taken from the ``sam_checkpoint`` / ``dino_checkpoint`` argument, else from the
environment variables ``ADDCLASS_SAM_CHECKPOINT`` / ``ADDCLASS_DINO_CHECKPOINT``, else from the default folder
``~/.cache/addclass/weights/`` (``$ADDCLASS_CACHE_DIR/weights`` when that is set) with the file names above.

Stages: the image input (``models.labelers.image_input``), GroundingDINO's boxes
(``models.labelers.grounded_sam_detect``, `BoxStage`), the mask model's masks (``models.labelers.sam_engines``,
through ``GroundedSamLabeler.set_image`` / ``segment_boxes`` of ``models.labelers.grounded_sam_masks``,
`MaskStage`, optionally refined per box on crops), pure ops (``models.labelers.grounded_sam_ops``) and weights
(``models.labelers.grounded_sam_weights``). This module holds the options and the public API.

Test-only variants (random weights or a checkpoint saved from them): ``sam_variant="tiny"`` (a 2-block,
64-wide, window-attention ViT encoder with SAM's real prompt encoder and mask decoder, still a 64 x 64
embedding) and ``dino_config="test"`` (Swin-T, 2-layer BERT, 1 encoder / 1 decoder layer, 100 queries, FFN
512).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from addclass.common.errors import InputError
from addclass.models.hashing import file_sha256
from addclass.models.labelers.embedding_cache import EmbeddingCache
from addclass.models.labelers.grounded_sam_detect import BoxStage
from addclass.models.labelers.grounded_sam_masks import MaskStage
from addclass.models.labelers.grounded_sam_ops import check_phrases, parse_dtype, remove_small_regions
from addclass.models.labelers.grounded_sam_weights import (
    DINO_ENV,
    DINO_URL,
    DINO_VARIANTS,
    SAM_ENV,
    build_dino,
    resolve_checkpoint,
)
from addclass.models.labelers.image_input import ImageInput, load_image_rgb, prefetch_images
from addclass.models.labelers.label_record import LabelRecord
from addclass.models.labelers.options import (
    BOX_THRESHOLD,
    DINO_CONFIG,
    DINO_IMAGE_SIZE,
    MAX_BOXES,
    NEGATIVE_IOU,
    NMS_IOU,
    REFINE_MARGIN,
    SAM_VARIANT,
    TEXT_THRESHOLD,
    TILE_OVERLAP,
    check_options,
    without_off_options,
)
from addclass.models.labelers.sam_engines import FAMILY_URLS, build_engine, build_sam_model
from addclass.models.labelers.sam_engines import sam_variant as sam_variant_entry

logger = logging.getLogger(__name__)


class GroundedSamLabeler(BoxStage, MaskStage):
    """Text prompt -> pseudo-masks with GroundingDINO + SAM, models built once and reused for every image.

    Not thread-safe (it holds SAM's current image embedding, like ``SamPredictor``); use one labeler per
    worker.

    Args:
        sam_variant: A ``sam_engines.SAM_VARIANTS`` key: SAM ``vit_b``/``vit_l``/``vit_h``, HQ-SAM ``hq_vit_*``,
            SAM 2.1 ``sam2.1_hiera_t/s/b+/l``; ``tiny``, ``hq_tiny``, ``sam2_tiny`` for tests.
        sam_checkpoint: SAM checkpoint path (else ``$ADDCLASS_SAM_CHECKPOINT``, else the default folder).
        dino_config: ``swint_ogc``, ``swinb`` or ``test``.
        dino_checkpoint: GroundingDINO checkpoint path (else ``$ADDCLASS_DINO_CHECKPOINT``, else the default
            folder).
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        box_threshold: Keep a query whose best token score is > this.
        text_threshold: Tokens scoring > this form the phrase.
        nms_iou: Class-agnostic NMS IoU per prompt; None disables it.
        max_boxes: Top-k cap on boxes per prompt; None = no cap.
        dtype: ``bfloat16``/``float16`` runs both models under autocast; None = float32.
        dino_image_size: GroundingDINO input short side (reference 800).
        dino_max_size: GroundingDINO input long-side cap (reference 1333).
        random_weights: Give every model without an explicit checkpoint argument seeded random weights (tests,
            smoke runs only; the environment variables and the default folder are then ignored).
        seed: Seed of the random weights.
        embedding_cache: Optional SAM image-embedding cache (see ``models.labelers.embedding_cache``).
        mask_chunk_bytes: Memory budget of the full-resolution float masks upsampled at once.
        tile_size: Also run GroundingDINO on overlapping tiles of at most this many px (``tile_windows``), each
            resized to its input size, so small objects of a large image are seen closer; the boxes of the whole
            image and of the tiles are merged (``merge_tiled_boxes``: one box for an object split across tiles).
            None: the whole image only (the reference).
        tile_overlap: Minimum overlap of neighbouring tiles, px.
        min_region_area: Per instance mask, islands smaller than this many px are removed and holes smaller than
            that filled (``remove_small_regions``); 0: masks as SAM gives them.
        negative_phrases: Phrases detected with the prompts (``"toy car"``) whose boxes remove every prompt box
            they overlap by IoU >= ``negative_iou``; they label nothing themselves.
        negative_iou: IoU at which a negative phrase's box removes a prompt's box.
        refine: Decode every box again on a crop around it (the box plus ``refine_margin`` of its size on each
            side), so a small object fills the mask model's input instead of a few of its 256 x 256 logits;
            the crop's mask replaces the whole-image mask inside the crop (`_refine`). Costs one image-encoder
            pass per refined box.
        refine_margin: Context around a refined box, as a fraction of its side.
        hq_token_only: HQ-SAM variants: the HQ token's mask alone (default: added to SAM's mask).
    """

    _RUNTIME_OPTIONS = ("box_threshold", "text_threshold", "nms_iou", "max_boxes", "embedding_cache", "dtype",
                        "tile_size", "tile_overlap", "min_region_area", "negative_phrases", "negative_iou",
                        "refine", "refine_margin")

    def __init__(
        self,
        *,
        sam_variant: str = SAM_VARIANT,
        sam_checkpoint: str | os.PathLike[str] | None = None,
        dino_config: str = DINO_CONFIG,
        dino_checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
        nms_iou: float | None = NMS_IOU,
        max_boxes: int | None = MAX_BOXES,
        dtype: str | None = None,
        dino_image_size: int = DINO_IMAGE_SIZE,
        dino_max_size: int | None = 1333,
        random_weights: bool = False,
        seed: int = 0,
        embedding_cache: EmbeddingCache | None = None,
        mask_chunk_bytes: int = 64 << 20,
        tile_size: int | None = None,
        tile_overlap: int = TILE_OVERLAP,
        min_region_area: int = 0,
        negative_phrases: Sequence[str] = (),
        negative_iou: float = NEGATIVE_IOU,
        refine: bool = False,
        refine_margin: float = REFINE_MARGIN,
        hq_token_only: bool = False,
    ) -> None:
        variant = sam_variant_entry(sam_variant)
        if dino_config not in DINO_VARIANTS:
            raise InputError(
                f"dino_config must be one of {sorted(DINO_VARIANTS)}. Got {dino_config!r} instead."
            )
        self.device = torch.device(device)
        self.sam_variant = sam_variant
        self.dino_config = dino_config
        self.dino_image_size = int(dino_image_size)
        self.dino_max_size = None if dino_max_size is None else int(dino_max_size)
        self.random_weights = bool(random_weights)
        self.seed = int(seed)
        self.mask_chunk_bytes = int(mask_chunk_bytes)
        self._set_options(
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            nms_iou=nms_iou,
            max_boxes=max_boxes,
            embedding_cache=embedding_cache,
            dtype=dtype,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            min_region_area=min_region_area,
            negative_phrases=negative_phrases,
            negative_iou=negative_iou,
            refine=refine,
            refine_margin=refine_margin,
        )

        sam_path = dino_path = None
        if not random_weights or sam_checkpoint is not None:
            sam_path = resolve_checkpoint(
                explicit=sam_checkpoint, env_var=SAM_ENV, file_name=variant.checkpoint_file,
                url=FAMILY_URLS[variant.family], what=f"SAM {sam_variant}",
            )  # fmt: skip
        if not random_weights or dino_checkpoint is not None:
            dino_path = resolve_checkpoint(
                explicit=dino_checkpoint, env_var=DINO_ENV,
                file_name=DINO_VARIANTS[dino_config].checkpoint_file,
                url=DINO_URL, what=f"GroundingDINO {dino_config}",
            )  # fmt: skip
        self.sam_weights = file_sha256(sam_path) if sam_path else f"random-{self.seed}"
        self.dino_weights = file_sha256(dino_path) if dino_path else f"random-{self.seed}"

        self.hq_token_only = bool(hq_token_only)
        self.sam = build_sam_model(sam_variant, checkpoint=sam_path, seed=self.seed).to(self.device)
        self.engine = build_engine(sam_variant, self.sam, device=self.device, hq_token_only=self.hq_token_only)
        self.dino = build_dino(config=dino_config, checkpoint=dino_path, device=self.device, seed=self.seed)
        self.dino = self.dino.to(self.device)
        self.tokenizer = self.dino.tokenizer
        self.features: dict[str, torch.Tensor] | None = None  # the current image's (set_image)
        self.original_size: tuple[int, int] = (0, 0)

    # -- configuration --------------------------------------------------------------------------------

    def _set_options(
        self,
        *,
        box_threshold: float,
        text_threshold: float,
        nms_iou: float | None,
        max_boxes: int | None,
        embedding_cache: EmbeddingCache | None,
        dtype: str | None,
        tile_size: int | None,
        tile_overlap: int,
        min_region_area: int,
        negative_phrases: Sequence[str],
        negative_iou: float,
        refine: bool,
        refine_margin: float,
    ) -> None:
        check_options(box_threshold=box_threshold, text_threshold=text_threshold, nms_iou=nms_iou,
                      max_boxes=max_boxes, tile_size=tile_size, tile_overlap=tile_overlap,
                      min_region_area=min_region_area, negative_iou=negative_iou, refine_margin=refine_margin)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.max_boxes = None if max_boxes is None else int(max_boxes)
        self.embedding_cache = embedding_cache
        self.dtype = parse_dtype(dtype, self.device)
        self.tile_size = None if tile_size is None else int(tile_size)
        self.tile_overlap = int(tile_overlap)
        self.min_region_area = int(min_region_area)
        self.negative_phrases = check_phrases(negative_phrases, what="negative_phrases")
        self.negative_iou = float(negative_iou)
        self.refine = bool(refine)
        self.refine_margin = float(refine_margin)

    def with_options(self, **options: Any) -> GroundedSamLabeler:
        """A labeler sharing this one's models with other run-time options.

        Accepted keys: ``box_threshold``, ``text_threshold``, ``nms_iou``, ``max_boxes``, ``embedding_cache``,
        ``dtype``, ``tile_size``, ``tile_overlap``, ``min_region_area``, ``negative_phrases``, ``negative_iou``,
        ``refine``, ``refine_margin``.
        """
        unknown = sorted(set(options) - set(self._RUNTIME_OPTIONS))
        if unknown:
            raise InputError(f"with_options accepts {self._RUNTIME_OPTIONS}. Got {unknown} instead.")
        other = copy.copy(self)
        current = {name: getattr(self, name) for name in self._RUNTIME_OPTIONS}
        other._set_options(**{**current, **options})
        other.features = None  # per-image state
        return other

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (JSON-serialisable); use it as the resume key.

        The device is left out (it changes results only at rounding level). When several prompts share one
        caption (``label_prompts``/``label_many``), the prompt list also changes the output and belongs in the
        caller's key.
        """
        return {
            "labeler": "grounded_sam",
            "version": 1,
            "simulated": False,
            "sam_variant": self.sam_variant,
            "sam_weights": self.sam_weights,
            "dino_config": self.dino_config,
            "dino_weights": self.dino_weights,
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
            "max_boxes": self.max_boxes,
            "dino_image_size": self.dino_image_size,
            "dino_max_size": self.dino_max_size,
            "dtype": self.dtype or "float32",
            "multimask_output": False,
            "mask_threshold": self.engine.mask_threshold,
            "caption_format": "<prompt> . <prompt> .",
            **without_off_options({
                "tile_size": self.tile_size, "tile_overlap": self.tile_overlap,
                "min_region_area": self.min_region_area,
                "negative_phrases": list(self.negative_phrases), "negative_iou": self.negative_iou,
                "refine": self.refine, "refine_margin": self.refine_margin, "hq_token_only": self.hq_token_only,
            }),  # options left out while off, so the keys of runs made before they existed stay the same
        }

    # -- public API --------------------------------------------------------------------------------

    def label(
        self,
        image_rgb: np.ndarray | None,
        prompt: str,
        *,
        image_sha256: str | None = None,
        reference_mask: np.ndarray | None = None,
    ) -> LabelRecord:
        """Pseudo-label one prompt on one H x W x 3 uint8 RGB image (the ``Labeler`` interface).

        Args:
            image_rgb: The image (required).
            prompt: The text prompt; several phrases of one class are separated by " . " (``"car . van"``).
            image_sha256: The image file's sha256 (the embedding cache key; else a hash of the pixels).
            reference_mask: Must be None: Grounded-SAM reads no hand mask.
        """
        if image_rgb is None:
            raise InputError("GroundedSamLabeler labels an image. Got image_rgb=None instead.")
        if reference_mask is not None:
            raise InputError("GroundedSamLabeler reads no reference mask. Got one instead.")
        return self.label_prompts(image_rgb, [prompt], image_sha256=image_sha256)[prompt]

    def label_prompts(
        self, image_rgb: np.ndarray, prompts: Sequence[str], *, image_sha256: str | None = None
    ) -> dict[str, LabelRecord]:
        """Pseudo-label several prompts on one image.

        One GroundingDINO pass with the joint caption of every prompt's phrases and the negative phrases
        (``"car . van . bicycle . toy car ."``), one image embedding and one decoder call for all boxes (plus
        one encoder and decoder call per refined box with ``refine``).

        Returns:
            prompt -> ``LabelRecord`` (boxes best first; ``extra`` holds the prompt, caption and the mask
            model's IoU predictions).
        """
        image_rgb = load_image_rgb(image_rgb)
        if len(set(prompts)) != len(prompts) or not prompts:
            raise InputError(
                f"Prompts must be a non-empty list without duplicates. Got {list(prompts)} instead."
            )
        height, width = image_rgb.shape[:2]
        caption, detections = self._class_detections(image_rgb, prompts)
        counts = [len(d["phrases"]) for d in detections]
        records: dict[str, LabelRecord] = {}
        if sum(counts) == 0:
            for prompt in prompts:
                records[prompt] = LabelRecord.empty(
                    height=height, width=width, extra={"prompt": prompt, "caption": caption, "sam_iou": []}
                )
            return records
        all_boxes = torch.cat([d["boxes"] for d in detections])
        instances, iou = self._segment_view(image_rgb, all_boxes, image_sha256=image_sha256)
        refined = self._refine(image_rgb, all_boxes, instances) if self.refine else None
        start = 0
        for prompt, det, n in zip(prompts, detections, counts, strict=True):
            instance_masks = instances[start : start + n].numpy()
            if self.min_region_area and len(instance_masks):
                instance_masks = np.stack([remove_small_regions(m, self.min_region_area) for m in instance_masks])
            union_mask = np.asarray(instance_masks.any(axis=0)) if n else np.zeros((height, width), bool)
            extra: dict[str, Any] = {"prompt": prompt, "caption": caption, "sam_iou": iou[start : start + n].tolist()}
            if refined is not None:
                extra["refined"] = refined[start : start + n]  # per box: decoded again on its crop
            records[prompt] = LabelRecord(
                mask=union_mask,
                instance_masks=instance_masks,
                boxes=det["boxes"].numpy().astype(np.float32),
                scores=det["scores"].numpy().astype(np.float32),
                phrases=det["phrases"],
                extra=extra,
            )
            start += n
        return records

    def label_many(
        self, images: Iterable[ImageInput], prompts: Sequence[str], *, prefetch: int = 2
    ) -> Iterator[dict[str, LabelRecord]]:
        """Label every image for all ``prompts`` (joint caption); images are read on a background thread.

        Args:
            images: Arrays, image paths or zero-argument callables returning an H x W x 3 uint8 RGB array.
            prompts: Prompts labelled together in one caption.
            prefetch: How many decoded images may wait in the queue.

        Yields:
            prompt -> ``LabelRecord``, one dict per image, in input order.
        """
        for image, sha in prefetch_images(images, depth=max(1, prefetch)):
            yield self.label_prompts(image, prompts, image_sha256=sha)

