"""Grounded-SAM pseudo-labeler: GroundingDINO boxes for a text prompt, SAM masks for the boxes.

Behaviour follows the reference demos (shared/spec/grounded_sam.md section 4): caption ``"<prompt> ."``; a
query is kept when its max-over-tokens sigmoid score is > ``box_threshold`` (0.35); its phrase is the tokens
scoring > ``text_threshold`` (0.25); optional class-agnostic NMS (IoU 0.8) and a top-k cap; every box of an
image goes through SAM in one batched decoder call on one image embedding, ``multimask_output=False``; mask
logits are upsampled to the original resolution (bilinear 256 -> 1024, crop the padding, bilinear to H x W)
and thresholded at 0. The upsampling runs in chunks of boxes, so 20 float masks of a 12 MP image are never
held at once.

Weights (nothing is downloaded; random weights only with ``random_weights=True``). Default file names:

- SAM ``vit_b``: ``sam_vit_b_01ec64.pth``; ``vit_l``: ``sam_vit_l_0b3195.pth``; ``vit_h``:
  ``sam_vit_h_4b8939.pth``. Download: https://github.com/facebookresearch/segment-anything#model-checkpoints
- GroundingDINO ``swint_ogc``: ``groundingdino_swint_ogc.pth``; ``swinb``:
  ``groundingdino_swinb_cogcoor.pth``. Download: https://github.com/IDEA-Research/GroundingDINO/releases

A checkpoint path is taken from the ``sam_checkpoint`` / ``dino_checkpoint`` argument, else from the
environment variables ``ADDCLASS_SAM_CHECKPOINT`` / ``ADDCLASS_DINO_CHECKPOINT``, else from the default folder
``~/.cache/addclass/weights/`` (``$ADDCLASS_CACHE_DIR/weights`` when that is set) with the file names above.

Test-only variants (random weights or a checkpoint saved from them): ``sam_variant="tiny"`` (a 2-block,
64-wide, window-attention ViT encoder with SAM's real prompt encoder and mask decoder, still a 64 x 64
embedding) and ``dino_config="test"`` (Swin-T, 2-layer BERT, 1 encoder / 1 decoder layer, 100 queries, FFN
512).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.bert_offline import OFFLINE_BERT_PREFIX, cache_root, file_sha256, install_offline_patches
from models.embedding_cache import EmbeddingCache, embedding_key
from models.embedding_cache import image_sha256 as compute_image_sha256
from models.label_record import LabelRecord

logger = logging.getLogger(__name__)

SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
DINO_URL = "https://github.com/IDEA-Research/GroundingDINO/releases"
SAM_ENV = "ADDCLASS_SAM_CHECKPOINT"
DINO_ENV = "ADDCLASS_DINO_CHECKPOINT"
SAM_CHECKPOINT_FILES: dict[str, str | None] = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "tiny": None,
}


@dataclass(frozen=True)
class DinoVariant:
    """A GroundingDINO layout: shipped config file, released checkpoint name, config overrides."""

    config_file: str
    checkpoint_file: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)


DINO_VARIANTS: dict[str, DinoVariant] = {
    "swint_ogc": DinoVariant("GroundingDINO_SwinT_OGC.py", "groundingdino_swint_ogc.pth"),
    "swinb": DinoVariant("GroundingDINO_SwinB_cfg.py", "groundingdino_swinb_cogcoor.pth"),
    "test": DinoVariant(
        "GroundingDINO_SwinT_OGC.py",
        None,
        {
            "enc_layers": 1,
            "dec_layers": 1,
            "num_queries": 100,
            "dim_feedforward": 512,
            "text_encoder_type": f"{OFFLINE_BERT_PREFIX}2",
        },
    ),
}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint file does not exist; the message names the path and the download URL."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (wrong shapes, missing required keys, unreadable)."""


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def weights_dir() -> Path:
    """Default checkpoint folder: ``~/.cache/addclass/weights`` (``$ADDCLASS_CACHE_DIR/weights`` when set)."""
    return cache_root() / "weights"


def resolve_checkpoint(
    *, explicit: str | os.PathLike[str] | None, env_var: str, file_name: str | None, url: str, what: str
) -> Path:
    """Find a checkpoint: explicit path, else ``$env_var``, else ``weights_dir() / file_name``.

    Raises:
        MissingCheckpointError: the file does not exist (message: path, file name, URL).
        ValueError: no path given and the variant has no released checkpoint.
    """
    if explicit is not None:
        path, origin = Path(explicit).expanduser(), "argument"
    elif os.environ.get(env_var):
        path, origin = Path(os.environ[env_var]).expanduser(), f"${env_var}"
    elif file_name is not None:
        path, origin = weights_dir() / file_name, "default folder"
    else:
        raise ValueError(f"{what} has no released checkpoint; pass a checkpoint path or random_weights=True.")
    if not path.is_file():
        expected = file_name or path.name
        raise MissingCheckpointError(
            f"{what} checkpoint not found: {path} (from {origin}). Download {expected} from {url} "
            "and put it at "
            f"{path}, or pass its path (argument or ${env_var}). For tests only: random_weights=True."
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``weights_only``): a state dict or ``{"model": state_dict}``; strips ``module.``."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / zip errors: say which file
        raise CheckpointMismatchError(f"Cannot read checkpoint {path}: {exc}") from exc
    state = raw.get("model", raw) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict (or a dict with a 'model' state dict).")
    return {(k.removeprefix("module.")): v for k, v in state.items()}


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    path: Path,
    strict: bool,
    required_prefixes: tuple[str, ...] = (),
) -> None:
    """Validate ``state`` against ``model`` before loading; log what a non-strict load would skip.

    Raises:
        CheckpointMismatchError: a shape differs; (strict) any key is missing or unexpected; (non-strict) a
            parameter under ``required_prefixes`` is missing.
    """
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the model ({len(wrong)} shape mismatches, e.g. "
            f"{'; '.join(wrong[:3])}). Is it the checkpoint of the selected variant?"
        )
    if strict and (missing or unexpected):
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
    params = {name for name, _ in model.named_parameters()}
    required_missing = [k for k in missing if k in params and k.startswith(required_prefixes)]
    if required_missing:
        raise CheckpointMismatchError(
            f"Checkpoint {path} lacks {len(required_missing)} required weights under {required_prefixes} "
            f"(e.g. {required_missing[:3]}); they would stay random."
        )
    if missing or unexpected:
        logger.warning(
            "Loading %s non-strictly: missing keys %s; unexpected keys %s", path, missing, unexpected
        )


# ----------------------------------------------------------------------------------------------------------
# Model builders
# ----------------------------------------------------------------------------------------------------------


def build_tiny_sam() -> torch.nn.Module:
    """SAM with a tiny ViT encoder (2 windowed blocks, width 64) for tests; same 1024 input and 64 x 64 x 256
    embedding, and SAM's real prompt encoder and mask decoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=1024,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=False,  # window attention only: global attention over 4096 tokens dominates the time
            global_attn_indexes=(),
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_sam(*, variant: str, checkpoint: Path | None, seed: int = 0) -> torch.nn.Module:
    """Build SAM ``variant`` (vit_b, vit_l, vit_h, tiny): load ``checkpoint`` strictly, else seeded random."""
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam() if variant == "tiny" else sam_model_registry[variant](checkpoint=None)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        check_state_dict(sam, state, path=checkpoint, strict=True)
        sam.load_state_dict(state, strict=True)
    return sam.eval()


def build_dino(
    *, config: str, checkpoint: Path | None, device: torch.device, seed: int = 0
) -> torch.nn.Module:
    """Build GroundingDINO offline (Recipe A); load ``checkpoint`` with ``strict=False`` (as the reference).

    Fails when any ``bert.*`` or ``backbone.*`` parameter is missing from the checkpoint; other differences
    are logged.
    """
    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    install_offline_patches()
    variant = DINO_VARIANTS[config]
    args = SLConfig.fromfile(str(Path(groundingdino.__file__).parent / "config" / variant.config_file))
    for key, value in variant.overrides.items():
        setattr(args, key, value)
    args.device = str(device)
    # Gradient checkpointing is a training-memory option; numerically identical, and slower in inference.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(args)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        check_state_dict(
            model, state, path=checkpoint, strict=False, required_prefixes=("bert.", "backbone.")
        )
        model.load_state_dict(state, strict=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: coordinates, selection, mask upsampling
# ----------------------------------------------------------------------------------------------------------


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
            raise ValueError(f"Prompts must be non-empty. Got {prompt!r} instead.")
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


# ----------------------------------------------------------------------------------------------------------
# The labeler
# ----------------------------------------------------------------------------------------------------------

ImageInput = np.ndarray | str | os.PathLike[str] | Callable[[], np.ndarray]


def load_image_rgb(source: ImageInput) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from an array, an image path (OpenCV) or a zero-argument callable."""
    if isinstance(source, np.ndarray):
        image = source
    elif callable(source):
        image = source()
    else:
        import cv2

        bgr = cv2.imread(os.fspath(source), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"Cannot read image {os.fspath(source)}")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an H x W x 3 uint8 RGB image. Got {image.shape} {image.dtype} instead.")
    return image


def parse_dtype(dtype: str | None, device: torch.device) -> str | None:
    """Canonical autocast dtype name (None = float32, no autocast)."""
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None. Got {dtype!r} instead.")
    if name == "float16" and device.type != "cuda":
        raise ValueError(f"dtype float16 needs a CUDA device. Got device {device} instead.")
    return None if name == "float32" else name


class GroundedSamLabeler:
    """Text prompt -> pseudo-masks with GroundingDINO + SAM, models built once and reused for every image.

    Not thread-safe (it holds SAM's current image embedding, like ``SamPredictor``); use one labeler per
    worker.

    Args:
        sam_variant: ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny`` (tests).
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
        embedding_cache: Optional SAM image-embedding cache (see ``models.embedding_cache``).
        mask_chunk_bytes: Memory budget of the full-resolution float masks upsampled at once.
    """

    _RUNTIME_OPTIONS = ("box_threshold", "text_threshold", "nms_iou", "max_boxes", "embedding_cache", "dtype")

    def __init__(
        self,
        *,
        sam_variant: str = "vit_b",
        sam_checkpoint: str | os.PathLike[str] | None = None,
        dino_config: str = "swint_ogc",
        dino_checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_iou: float | None = 0.8,
        max_boxes: int | None = 20,
        dtype: str | None = None,
        dino_image_size: int = 800,
        dino_max_size: int | None = 1333,
        random_weights: bool = False,
        seed: int = 0,
        embedding_cache: EmbeddingCache | None = None,
        mask_chunk_bytes: int = 64 << 20,
    ) -> None:
        from segment_anything import SamPredictor

        if sam_variant not in SAM_CHECKPOINT_FILES:
            raise ValueError(
                f"sam_variant must be one of {sorted(SAM_CHECKPOINT_FILES)}. Got {sam_variant!r} instead."
            )
        if dino_config not in DINO_VARIANTS:
            raise ValueError(
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
        )

        sam_path = dino_path = None
        if not random_weights or sam_checkpoint is not None:
            sam_path = resolve_checkpoint(
                explicit=sam_checkpoint, env_var=SAM_ENV, file_name=SAM_CHECKPOINT_FILES[sam_variant],
                url=SAM_URL, what=f"SAM {sam_variant}",
            )  # fmt: skip
        if not random_weights or dino_checkpoint is not None:
            dino_path = resolve_checkpoint(
                explicit=dino_checkpoint, env_var=DINO_ENV,
                file_name=DINO_VARIANTS[dino_config].checkpoint_file,
                url=DINO_URL, what=f"GroundingDINO {dino_config}",
            )  # fmt: skip
        self.sam_weights = file_sha256(sam_path) if sam_path else f"random-{self.seed}"
        self.dino_weights = file_sha256(dino_path) if dino_path else f"random-{self.seed}"

        self.sam = build_sam(variant=sam_variant, checkpoint=sam_path, seed=self.seed).to(self.device)
        self.dino = build_dino(config=dino_config, checkpoint=dino_path, device=self.device, seed=self.seed)
        self.dino = self.dino.to(self.device)
        self.tokenizer = self.dino.tokenizer
        self.predictor = SamPredictor(self.sam)

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
    ) -> None:
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} must be in [0, 1). Got {value} instead.")
        if nms_iou is not None and not 0.0 < float(nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None. Got {nms_iou} instead.")
        if max_boxes is not None and int(max_boxes) < 1:
            raise ValueError(f"max_boxes must be >= 1 or None. Got {max_boxes} instead.")
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.max_boxes = None if max_boxes is None else int(max_boxes)
        self.embedding_cache = embedding_cache
        self.dtype = parse_dtype(dtype, self.device)

    def with_options(self, **options: Any) -> GroundedSamLabeler:
        """A labeler sharing this one's models with other run-time options.

        Accepted keys: ``box_threshold``, ``text_threshold``, ``nms_iou``, ``max_boxes``, ``embedding_cache``,
        ``dtype``.
        """
        from segment_anything import SamPredictor

        unknown = sorted(set(options) - set(self._RUNTIME_OPTIONS))
        if unknown:
            raise ValueError(f"with_options accepts {self._RUNTIME_OPTIONS}. Got {unknown} instead.")
        other = copy.copy(self)
        current = {name: getattr(self, name) for name in self._RUNTIME_OPTIONS}
        other._set_options(**{**current, **options})
        other.predictor = SamPredictor(self.sam)  # the predictor holds per-image state
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
            "mask_threshold": float(self.sam.mask_threshold),
            "caption_format": "<prompt> . <prompt> .",
        }

    # -- stages --------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def dino_preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 -> 3 x h x w normalized float, resized as the reference (PIL bilinear)."""
        import torchvision.transforms.functional as TF
        from PIL import Image

        height, width = image_rgb.shape[:2]
        size = dino_input_size(height, width, size=self.dino_image_size, max_size=self.dino_max_size)
        resized = TF.resize(Image.fromarray(image_rgb), list(size))
        return TF.normalize(TF.to_tensor(resized), list(IMAGENET_MEAN), list(IMAGENET_STD))  # 3 x h x w

    @torch.no_grad()
    def detect(self, image_rgb: np.ndarray, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Run GroundingDINO once with the joint caption; per prompt, the selected detections.

        A kept query goes to the prompt whose tokens score highest for it. Its score is the max over all
        caption tokens (the reference's ``logits.max(dim=1)``), so a single prompt behaves exactly as the
        reference.

        Returns:
            Per prompt: ``boxes`` K x 4 pixel xyxy, ``scores`` K, ``phrases`` list of K str, best first.
        """
        from groundingdino.util.utils import get_phrases_from_posmap

        height, width = image_rgb.shape[:2]
        caption, spans = build_caption(prompts)
        tokenized = self.tokenizer(caption, return_offsets_mapping=True)
        num_tokens = len(tokenized["input_ids"])
        if num_tokens > self.dino.max_text_len:
            raise ValueError(
                f"Caption has {num_tokens} tokens, GroundingDINO reads {self.dino.max_text_len}."
            )
        token_prompt = token_prompt_index(tokenized["offset_mapping"], spans)  # T
        image = self.dino_preprocess(image_rgb).to(self.device)
        with self._autocast():
            out = self.dino(image[None], captions=[caption])
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
                    scores[candidates], boxes[candidates], box_threshold=self.box_threshold,
                    nms_iou=self.nms_iou, max_boxes=self.max_boxes,
                )
            ]  # fmt: skip
            # Reference: tokens scoring > text_threshold, decoded, '.' removed. Only prompt tokens are decoded
            # (no [CLS]/[SEP]/'.'), as upstream GroundingDINO's later left_idx/right_idx exclusion intends.
            phrases = [
                get_phrases_from_posmap(
                    (probs[q, :num_tokens] > self.text_threshold) & (token_prompt >= 0),
                    tokenized,
                    self.tokenizer,
                ).strip()
                for q in keep.tolist()
            ]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "phrases": phrases})
        return results

    def embedding_cache_key(self, image_sha: str) -> str:
        """Cache key of an image's SAM embedding for this labeler's SAM weights (and autocast dtype)."""
        variant = self.sam_variant if self.dtype is None else f"{self.sam_variant}@{self.dtype}"
        return embedding_key(image_sha256=image_sha, sam_variant=variant, weights_id=self.sam_weights)

    @torch.no_grad()
    def set_image(self, image_rgb: np.ndarray, *, image_sha256: str | None = None) -> bool:
        """Give SAM the image's embedding, from the cache when present. Returns True on a cache hit."""
        original_size = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
        img_size = self.sam.image_encoder.img_size
        key = None
        if self.embedding_cache is not None:
            key = self.embedding_cache_key(image_sha256 or compute_image_sha256(image_rgb))
            cached = self.embedding_cache.get(key)
            if cached is not None:
                # What SamPredictor.set_torch_image sets, without running the image encoder.
                self.predictor.reset_image()
                self.predictor.features = cached.to(self.device)  # 1 x 256 x 64 x 64
                self.predictor.original_size = original_size
                self.predictor.input_size = self.predictor.transform.get_preprocess_shape(
                    *original_size, img_size
                )
                self.predictor.is_image_set = True
                return True
        with self._autocast():
            self.predictor.set_image(image_rgb, image_format="RGB")
        if key is not None:
            self.embedding_cache.put(key, self.predictor.features)
        return False

    @torch.no_grad()
    def segment_boxes(self, boxes_xyxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All boxes of the current image through SAM's decoder in one batched call.

        The decoder part of ``SamPredictor.predict_torch``, without its all-boxes-at-once full-resolution
        postprocessing (see ``upsample_mask_logits``).

        Args:
            boxes_xyxy: N x 4 pixel boxes at the original size.

        Returns:
            (low-res logits N x 1 x 256 x 256 float32, predicted IoU N), on CPU.
        """
        boxes = self.predictor.transform.apply_boxes_torch(boxes_xyxy.float(), self.predictor.original_size)
        with self._autocast():
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes.to(self.device), masks=None)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=self.predictor.features,  # 1 x 256 x 64 x 64
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,  # N x 2 x 256
                dense_prompt_embeddings=dense,  # N x 256 x 64 x 64
                multimask_output=False,
            )  # N x 1 x 256 x 256, N x 1
        return low_res.float().cpu(), iou[:, 0].float().cpu()

    # -- public API --------------------------------------------------------------------------------

    def label(self, image_rgb: np.ndarray, prompt: str, *, image_sha256: str | None = None) -> LabelRecord:
        """Pseudo-label one prompt on one H x W x 3 uint8 RGB image."""
        return self.label_prompts(image_rgb, [prompt], image_sha256=image_sha256)[prompt]

    def label_prompts(
        self, image_rgb: np.ndarray, prompts: Sequence[str], *, image_sha256: str | None = None
    ) -> dict[str, LabelRecord]:
        """Pseudo-label several prompts on one image.

        One GroundingDINO pass with the joint caption ``"p1 . p2 ."``, one SAM embedding and one decoder call
        for all boxes.

        Returns:
            prompt -> ``LabelRecord`` (boxes best first; ``extra`` holds the prompt, caption and SAM IoU
            predictions).
        """
        image_rgb = load_image_rgb(image_rgb)
        if len(set(prompts)) != len(prompts) or not prompts:
            raise ValueError(
                f"Prompts must be a non-empty list without duplicates. Got {list(prompts)} instead."
            )
        height, width = image_rgb.shape[:2]
        caption, _ = build_caption(prompts)
        detections = self.detect(image_rgb, prompts)
        counts = [len(d["phrases"]) for d in detections]
        records: dict[str, LabelRecord] = {}
        if sum(counts) == 0:
            for prompt in prompts:
                extra = {"prompt": prompt, "caption": caption, "sam_iou": []}
                records[prompt] = LabelRecord.empty(height=height, width=width, extra=extra)
            return records
        self.set_image(image_rgb, image_sha256=image_sha256)
        low_res, iou = self.segment_boxes(torch.cat([d["boxes"] for d in detections]))
        input_size = self.predictor.input_size
        start = 0
        for prompt, det, n in zip(prompts, detections, counts, strict=True):
            instances, union = upsample_mask_logits(
                low_res[start : start + n], input_size=input_size, original_size=(height, width),
                img_size=self.sam.image_encoder.img_size, threshold=float(self.sam.mask_threshold),
                chunk_bytes=self.mask_chunk_bytes,
            )  # fmt: skip
            records[prompt] = LabelRecord(
                mask=union.numpy(),
                instance_masks=instances.numpy(),
                boxes=det["boxes"].numpy().astype(np.float32),
                scores=det["scores"].numpy().astype(np.float32),
                phrases=det["phrases"],
                extra={"prompt": prompt, "caption": caption, "sam_iou": iou[start : start + n].tolist()},
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
        for image, sha in _prefetch_images(images, depth=max(1, prefetch)):
            yield self.label_prompts(image, prompts, image_sha256=sha)


_DONE = object()


def _prefetch_images(images: Iterable[ImageInput], *, depth: int) -> Iterator[tuple[np.ndarray, str]]:
    """Decode images (and hash their pixels) on a daemon thread, ``depth`` ahead of the consumer."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def _put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _worker() -> None:
        try:
            for source in images:
                image = load_image_rgb(source)
                if not _put((image, compute_image_sha256(image))):
                    return
        except Exception as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            _put(exc)
            return
        _put(_DONE)

    thread = threading.Thread(target=_worker, name="addclass-image-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
