"""The mask stage of Grounded-SAM behind one interface: SAM, HQ-SAM and SAM 2.1 ("engines").

An engine turns an image into features (``encode``: the tensors the embedding cache keeps, one entry per part)
and boxes into low-resolution mask logits on those features (``decode``). The labeler upsamples the logits
itself (``grounded_sam_ops.upsample_mask_logits``), in chunks, whatever the engine.

- **SAM** (``segment_anything``): ``vit_b``, ``vit_l``, ``vit_h``; ``tiny`` for tests. One feature part, the
  1 x 256 x 64 x 64 image embedding. Images are resized so their long side is 1024 and padded bottom/right.
- **HQ-SAM** (``segment_anything_hq``, Ke et al. 2023): ``hq_vit_b``, ``hq_vit_l``, ``hq_vit_h``,
  ``hq_vit_tiny``; ``hq_tiny`` for tests. SAM's encoder and decoder plus a high-quality output token that also
  reads an early ViT layer, so the cache keeps two parts: the embedding and that layer's output
  (``interm``, 1 x 64 x 64 x width). ``hq_token_only`` returns the HQ token's mask alone; by default it is added
  to SAM's mask (the package's default, and what Grounded-SAM's ``--use_sam_hq`` runs).
- **SAM 2.1** (``sam2``, Ravi et al. 2024): ``sam2.1_hiera_t``, ``_s``, ``_b+``, ``_l``; ``sam2_tiny`` for tests
  (a one-block-per-stage Hiera-T). Three parts: the 1 x 256 x 64 x 64 embedding and the two high-resolution
  feature maps its decoder reads (1 x 32 x 256 x 256, 1 x 64 x 128 x 128). Images are resized to 1024 x 1024
  without keeping the aspect ratio; boxes enter the prompt encoder as two corner points (labels 2 and 3).

Released file names (nothing is downloaded; ``SAM_VARIANTS``), loaded by `load_sam_weights`: SAM and HQ-SAM
files are plain state dicts, SAM 2.1 files hold ``{"model": state_dict}``.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from addclass.common.errors import InputError

SamFamily = Literal["sam", "hq", "sam2"]
FAMILY_URLS: dict[str, str] = {
    "sam": "https://github.com/facebookresearch/segment-anything#model-checkpoints",
    "hq": "https://github.com/SysCV/sam-hq#model-checkpoints",
    "sam2": "https://github.com/facebookresearch/sam2#model-description",
}
# The test-size SAM 2 trunk: Hiera-T with one block per stage and window attention only.
SAM2_TINY_OVERRIDES = (
    "++model.image_encoder.trunk.stages=[1,1,1,1]",
    "++model.image_encoder.trunk.global_att_blocks=[]",
    "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
)


@dataclass(frozen=True)
class SamVariant:
    """One mask model: its family, the released checkpoint's file name (None: test-only) and its architecture
    (the package's registry key, or the SAM 2 config)."""

    family: SamFamily
    checkpoint_file: str | None
    arch: str


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant("sam", "sam_vit_b_01ec64.pth", "vit_b"),
    "vit_l": SamVariant("sam", "sam_vit_l_0b3195.pth", "vit_l"),
    "vit_h": SamVariant("sam", "sam_vit_h_4b8939.pth", "vit_h"),
    "tiny": SamVariant("sam", None, "tiny"),
    "hq_vit_b": SamVariant("hq", "sam_hq_vit_b.pth", "vit_b"),
    "hq_vit_l": SamVariant("hq", "sam_hq_vit_l.pth", "vit_l"),
    "hq_vit_h": SamVariant("hq", "sam_hq_vit_h.pth", "vit_h"),
    "hq_vit_tiny": SamVariant("hq", "sam_hq_vit_tiny.pth", "vit_tiny"),
    "hq_tiny": SamVariant("hq", None, "tiny"),
    "sam2.1_hiera_t": SamVariant("sam2", "sam2.1_hiera_tiny.pt", "configs/sam2.1/sam2.1_hiera_t.yaml"),
    "sam2.1_hiera_s": SamVariant("sam2", "sam2.1_hiera_small.pt", "configs/sam2.1/sam2.1_hiera_s.yaml"),
    "sam2.1_hiera_b+": SamVariant("sam2", "sam2.1_hiera_base_plus.pt", "configs/sam2.1/sam2.1_hiera_b+.yaml"),
    "sam2.1_hiera_l": SamVariant("sam2", "sam2.1_hiera_large.pt", "configs/sam2.1/sam2.1_hiera_l.yaml"),
    "sam2_tiny": SamVariant("sam2", None, "configs/sam2.1/sam2.1_hiera_t.yaml"),
}


def sam_variant(name: str) -> SamVariant:
    """The table entry of ``name``; an unknown name is an InputError listing the choices."""
    if name not in SAM_VARIANTS:
        raise InputError(f"sam_variant must be one of {sorted(SAM_VARIANTS)}. Got {name!r} instead.")
    return SAM_VARIANTS[name]


# ---------------------------------------------------------------------------------------------------- models


def _tiny_sam_parts(package: Any, *, hq: bool) -> nn.Module:
    """SAM (or HQ-SAM) with a 2-block, 64-wide ViT encoder; SAM's real prompt encoder and mask decoder and the
    same 1024 input / 64 x 64 x 256 embedding. HQ-SAM's token reads a global-attention block's output, so the
    HQ version makes its second block global."""
    m = package.modeling
    decoder_cls = m.MaskDecoderHQ if hq else m.MaskDecoder
    decoder_extra = {"vit_dim": 64} if hq else {}
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=2, embed_dim=64, img_size=1024, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=False,
            global_attn_indexes=(1,) if hq else (), window_size=14, out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=decoder_cls(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, **decoder_extra,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip


def _build_architecture(variant: SamVariant) -> nn.Module:
    """The untrained network of ``variant`` (the package's own classes), on the CPU."""
    if variant.family == "sam2":
        from sam2.build_sam import build_sam2

        overrides = list(SAM2_TINY_OVERRIDES) if variant.checkpoint_file is None else []
        with contextlib.redirect_stdout(None):
            return build_sam2(variant.arch, ckpt_path=None, device="cpu", mode="eval",
                              hydra_overrides_extra=overrides)
    if variant.family == "hq":
        with warnings.catch_warnings():  # it re-registers timm's tiny_vit models under the same names
            warnings.simplefilter("ignore")
            import segment_anything_hq as package
    else:
        import segment_anything as package  # type: ignore[no-redef]
    if variant.arch == "tiny":
        return _tiny_sam_parts(package, hq=variant.family == "hq")
    return package.sam_model_registry[variant.arch](checkpoint=None)


def build_sam_model(name: str, *, checkpoint: Path | None, seed: int = 0) -> nn.Module:
    """Build mask model ``name`` (a `SAM_VARIANTS` key) in eval mode: ``checkpoint`` loaded strictly by
    `load_sam_weights`, else seeded random weights."""
    from addclass.models.labelers.grounded_sam_weights import check_state_dict, load_state_dict_file

    variant = sam_variant(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_architecture(variant)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        check_state_dict(model, state, path=checkpoint, strict=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- engines


class SamEngine(ABC):
    """Encode an image, decode boxes: what the labeler needs from a mask model (see the module docstring).

    Attributes:
        model: The network (weights, hooks).
        parts: Names of the feature tensors ``encode`` returns, in the order the cache stores them.
        img_size: Side of the square network input.
        mask_threshold: Logit threshold of a mask pixel.
        keeps_aspect: Images are resized to a long side of ``img_size`` and padded (SAM); False: resized to
            ``img_size`` x ``img_size`` (SAM 2).
    """

    parts: tuple[str, ...] = ("image_embed",)
    keeps_aspect = True

    def __init__(self, model: nn.Module, *, device: torch.device) -> None:
        self.model: Any = model  # the packages' classes are untyped
        self.device = device
        self.img_size = 1024
        self.mask_threshold = 0.0

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) the image takes inside the ``img_size`` square network input (segment-anything's resize)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        if not self.keeps_aspect:
            return self.img_size, self.img_size
        return ResizeLongestSide.get_preprocess_shape(*original_size, self.img_size)

    def boxes_to_input(self, boxes_xyxy: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """N x 4 pixel boxes at the original size -> the network input's frame."""
        h, w = original_size
        ih, iw = self.input_size(original_size)
        scale = torch.tensor([iw / w, ih / h, iw / w, ih / h], dtype=torch.float32)
        return boxes_xyxy.float() * scale

    @abstractmethod
    def encode(self, image_rgb: np.ndarray) -> dict[str, torch.Tensor]:
        """H x W x 3 uint8 RGB -> the features (``parts``), on the engine's device."""

    @abstractmethod
    def decode(
        self, features: dict[str, torch.Tensor], boxes_xyxy: torch.Tensor, original_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All boxes in one batched decoder call, ``multimask_output=False``.

        Returns:
            (low-res logits N x 1 x 256 x 256, predicted IoU N), on the engine's device.
        """


class Sam1Engine(SamEngine):
    """SAM and HQ-SAM (``hq=True``): ``SamPredictor``'s image transform and decoder call, without its
    all-at-once full-resolution postprocessing."""

    def __init__(self, model: nn.Module, *, device: torch.device, hq: bool, hq_token_only: bool = False) -> None:
        super().__init__(model, device=device)
        self.hq = hq
        self.hq_token_only = hq_token_only
        self.parts = ("image_embed", "interm") if hq else ("image_embed",)
        self.img_size = int(self.model.image_encoder.img_size)
        self.mask_threshold = float(self.model.mask_threshold)

    def encode(self, image_rgb: np.ndarray) -> dict[str, torch.Tensor]:
        from segment_anything.utils.transforms import ResizeLongestSide

        resized = ResizeLongestSide(self.img_size).apply_image(image_rgb)  # h x w x 3, long side img_size
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # 1 x 3 x h x w
        out = self.model.image_encoder(self.model.preprocess(x))
        if self.hq:
            embedding, interm = out
            return {"image_embed": embedding, "interm": interm[0]}  # 1 x 256 x 64 x 64, 1 x 64 x 64 x width
        return {"image_embed": out}

    def decode(
        self, features: dict[str, torch.Tensor], boxes_xyxy: torch.Tensor, original_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = self.boxes_to_input(boxes_xyxy, original_size).to(self.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
        extra = {"hq_token_only": self.hq_token_only, "interm_embeddings": [features["interm"]]} if self.hq else {}
        low_res, iou = self.model.mask_decoder(
            image_embeddings=features["image_embed"],  # 1 x 256 x 64 x 64
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,  # N x 2 x 256
            dense_prompt_embeddings=dense,  # N x 256 x 64 x 64
            multimask_output=False,
            **extra,
        )  # N x 1 x 256 x 256, N x 1
        return low_res, iou[:, 0]


class Sam2Engine(SamEngine):
    """SAM 2.1's image path (``SAM2ImagePredictor``'s encoding; its decoder call for boxes)."""

    parts = ("image_embed", "high_res_0", "high_res_1")
    keeps_aspect = False

    def __init__(self, model: nn.Module, *, device: torch.device) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        super().__init__(model, device=device)
        self.predictor = SAM2ImagePredictor(model)
        self.img_size = int(self.model.image_size)
        self.mask_threshold = float(self.predictor.mask_threshold)

    def encode(self, image_rgb: np.ndarray) -> dict[str, torch.Tensor]:
        self.predictor.set_image(image_rgb)
        features = self.predictor._features  # {"image_embed", "high_res_feats": [s4, s8]}
        high = features["high_res_feats"]
        return {"image_embed": features["image_embed"], "high_res_0": high[0], "high_res_1": high[1]}

    def decode(
        self, features: dict[str, torch.Tensor], boxes_xyxy: torch.Tensor, original_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = self.boxes_to_input(boxes_xyxy, original_size).to(self.device)
        corners = boxes.reshape(-1, 2, 2)  # N x 2 x 2: top-left, bottom-right
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(corners.shape[0], 1)
        sparse, dense = self.model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"],  # 1 x 256 x 64 x 64
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=corners.shape[0] > 1,
            high_res_features=[features["high_res_0"], features["high_res_1"]],
        )  # N x 1 x 256 x 256, N x 1
        return low_res.clamp(-32.0, 32.0), iou[:, 0]


def build_engine(name: str, model: nn.Module, *, device: torch.device, hq_token_only: bool = False) -> SamEngine:
    """The engine of mask model ``name`` around its built ``model``."""
    family = sam_variant(name).family
    if hq_token_only and family != "hq":
        raise InputError(f"hq_token_only applies to HQ-SAM variants (hq_*). Got sam_variant {name!r}.")
    make: dict[str, Callable[[], SamEngine]] = {
        "sam": lambda: Sam1Engine(model, device=device, hq=False),
        "hq": lambda: Sam1Engine(model, device=device, hq=True, hq_token_only=hq_token_only),
        "sam2": lambda: Sam2Engine(model, device=device),
    }
    return make[family]()
