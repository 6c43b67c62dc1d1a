"""MaSSFormer, the mask-classification container: backbone + pixel decoder + transformer decoder, with semantic
inference.

The same container holds MaSSFormer (HR pixel decoder, masked-attention decoder) and the baselines built from it:
the FPN ablation, Mask2Former (deformable-attention pixel decoder, masked-attention decoder), MaskFormer (FPN,
standard DETR decoder) and SeMask FPN (SeMask Swin backbone, Semantic FPN, a fixed per-class head); see
`models.build` and docs/design.md §1.8-1.9. The class keeps its name, which saved models and other
code refer to.

The model takes RGB images in 0..255 of any size, normalizes them (ImageNet mean/std), pads bottom/right with
0 in normalized space to multiples of ``size_divisor`` (256 for MaSSFormer: the CST windows tile the stride-16
grid in 16 x 16 windows; 32 for the baselines) and crops every output back at its own stride
(``ceil(H / s) x ceil(W / s)``); see docs/interfaces.md.

Inference can run at another scale (``test_scale``, mmseg's test-time ``Resize``): the image is resized by that
factor, scored, and the class scores are resized back to the input size. The final masks live at half the
network's input resolution, so a model trained on images enlarged 2x (``scale_range`` around 2) and run with
``test_scale=2`` predicts masks on the input's own pixel grid: on small images (the demo's 256 x 384) this is
what makes pixel-exact boundaries possible at all.

A model can also average several inference scales (``test_ratios``, ratios of ``test_scale``, mmseg's
``img_ratios``): its per-pixel class probabilities, normalised at each scale, are averaged before the argmax.
The demo's tiny model predicts at scales 2 and 3: the finer scale places edges better, the coarser one keeps the
context that large regions need (docs/recipes.md).

A model trained on crops predicts, by default, in tiles of the size it was trained on (``test_window``, in the
network's pixels, mmseg's ``mode='slide'``): its global-context branches (pooled features, CST windows) then
see what they saw in training. Whole-image inference on inputs much larger than the training crops can collapse
whole classes (measured on the demo's data: docs/recipes.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from addclass.models.mask2former.msdeform_decoder import MSDeformAttnPixelDecoder
from addclass.models.maskformer.detr_decoder import StandardTransformerDecoder
from addclass.models.maskformer.fpn_decoder import FPNPixelDecoder
from addclass.models.massformer.pixel_decoder import HRPixelDecoder, PixelDecoderOutput
from addclass.models.parts.backbone import ResNetBackbone
from addclass.models.parts.transformer_decoder import MaskedTransformerDecoder
from addclass.models.semask.heads import FixedClassHead, SemanticFPNDecoder
from addclass.models.semask.semask import SeMaskSwinBackbone

Backbone = ResNetBackbone | SeMaskSwinBackbone
PixelDecoder = HRPixelDecoder | FPNPixelDecoder | MSDeformAttnPixelDecoder | SemanticFPNDecoder
TransformerDecoder = MaskedTransformerDecoder | StandardTransformerDecoder | FixedClassHead

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# Budget for one row chunk of full-resolution query masks in `semantic_probs` / `predict`.
CHUNK_BYTES = 128 * 2**20


class MaSSFormer(nn.Module):
    """Mask-classification semantic segmentation model: MaSSFormer, or a baseline in the same container (the FPN
    ablation, Mask2Former, MaskFormer, SeMask FPN); the name is kept for saved models and callers."""

    pixel_mean: Tensor  # 1 x 3 x 1 x 1 buffer
    pixel_std: Tensor  # 1 x 3 x 1 x 1 buffer

    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: PixelDecoder,
        transformer_decoder: TransformerDecoder,
        size_divisor: int = 256,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        """Assembles built submodules.

        Args:
            backbone: returns (normalized image, C2..C5) (the SeMask backbone: and its semantic maps).
            pixel_decoder: returns a `PixelDecoderOutput`.
            transformer_decoder: predicts class and mask logits per decoder output.
            size_divisor: inputs are padded to multiples of this; must be a multiple of the pixel decoder's.
            pixel_mean: RGB mean in 0..255 units.
            pixel_std: RGB std in 0..255 units.
        """
        super().__init__()
        if size_divisor % pixel_decoder.size_divisor:
            raise ValueError(
                f"size_divisor must be a multiple of {pixel_decoder.size_divisor}. "
                f"Got {size_divisor} instead."
            )
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.size_divisor = size_divisor
        mean = torch.tensor(pixel_mean).view(1, -1, 1, 1)  # 1 x 3 x 1 x 1
        std = torch.tensor(pixel_std).view(1, -1, 1, 1)  # 1 x 3 x 1 x 1
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        # Inference settings (not weights): tasks.model_folder.build_model sets them from a model's config.json.
        self.test_scale = 1.0
        self.test_ratios: tuple[float, ...] = (1.0,)  # scales `predict` / `scores` average, ratios of test_scale
        self.test_window = 0  # tile side in network pixels for `predict` / `scores`; 0: whole images

    @property
    def num_classes(self) -> int:
        """K, the number of semantic classes (without no-object)."""
        return self.transformer_decoder.num_classes

    @property
    def num_queries(self) -> int:
        """Q, the number of queries (masks predicted per image)."""
        return self.transformer_decoder.num_queries

    def preprocess(self, images: Tensor) -> Tensor:
        """Normalizes B x 3 x H x W RGB 0..255 images; zero-pads to B x 3 x H' x W' (multiples of
        ``size_divisor``)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W. Got shape {tuple(images.shape)} instead.")
        if not images.is_floating_point():
            images = images.to(self.pixel_mean.dtype)
        x = (images - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        pad_h = -h % self.size_divisor
        pad_w = -w % self.size_divisor
        return F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # B x 3 x H' x W'

    def _decode(
        self, images: Tensor, *, keep_aux: bool
    ) -> tuple[list[tuple[Tensor, Tensor]], PixelDecoderOutput]:
        """Runs the network on padded inputs; predictions are uncropped (strides w.r.t. the padded size)."""
        features = self.backbone(self.preprocess(images))
        decoded = self.pixel_decoder(features)
        predictions = self.transformer_decoder(
            decoded.mask_features, decoded.memories, mask_stride=decoded.mask_stride, keep_aux=keep_aux
        )
        return predictions, decoded

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Training/eval forward pass.

        With the HR pixel decoder, train mode needs B >= 2: its BatchNorms on globally pooled (1 x 1) features
        need more than one value per channel (the reference trains with 4 images per GPU).

        Args:
            images: B x 3 x H x W float RGB in 0..255, any H and W.

        Returns:
            ``pred_logits`` B x Q x (K+1); ``pred_masks`` B x Q x ceil(H/2) x ceil(W/2) logits (last layer);
            ``aux_outputs``: list of ``{pred_logits, pred_masks}`` for the earlier predictions (masked-attention
            decoders: the initial queries and layers 1..L-1; MaskFormer: layers 1..L-1), masks
            B x Q x ceil(H/4) x ceil(W/4); ``pred_edge`` B x 1 x ceil(H/2) x ceil(W/2) logits, or None for
            pixel decoders without an edge head. SeMask FPN only (docs/design.md §1.9): ``aux_semantic``
            B x K x ceil(H/4) x ceil(W/4) semantic-prior logits and ``query_classes`` (Q = K int64, query q
            predicts class ``query_classes[q]``: segments are assigned by class, not by Hungarian matching).
        """
        h, w = images.shape[-2:]
        h2, w2, h4, w4 = math.ceil(h / 2), math.ceil(w / 2), math.ceil(h / 4), math.ceil(w / 4)
        predictions, decoded = self._decode(images, keep_aux=True)
        logits, masks = predictions[-1]
        edge = decoded.edge_logits
        out: dict[str, Any] = {
            "pred_logits": logits,
            "pred_masks": masks[..., :h2, :w2],
            "aux_outputs": [
                {"pred_logits": aux_logits, "pred_masks": aux_masks[..., :h4, :w4]}
                for aux_logits, aux_masks in predictions[:-1]
            ],
            "pred_edge": None if edge is None else edge[..., :h2, :w2],
        }
        if decoded.aux_semantic is not None:
            out["aux_semantic"] = decoded.aux_semantic[..., :h4, :w4]
        if isinstance(self.transformer_decoder, FixedClassHead):
            out["query_classes"] = torch.arange(self.num_classes, device=logits.device)
        return out

    def _at_scale(self, images: Tensor, scale: float | None) -> tuple[Tensor, float]:
        """(images resized by ``scale``, default `test_scale`; the scale used)."""
        scale = self.test_scale if scale is None else float(scale)
        if scale <= 0:
            raise ValueError(f"Expected a test scale > 0. Got {scale} instead.")
        if scale == 1.0:
            return images, scale
        h, w = images.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False), scale

    @torch.no_grad()
    def semantic_probs(
        self, images: Tensor, *, chunk_rows: int | None = None, scale: float | None = None
    ) -> Tensor:
        """Per-class scores ``sum_q softmax(cls)[q, k] * sigmoid(mask_q)`` at the input resolution.

        The last layer's stride-2 mask logits are bilinearly upsampled to the padded input size (as the
        reference does), then cropped. The upsampling, sigmoid and class contraction run in row chunks, so no
        B x Q x H x W tensor is ever built; the result equals the unchunked computation up to float rounding.
        Call ``eval()`` first.

        Args:
            images: B x 3 x H x W float RGB in 0..255.
            chunk_rows: output rows per chunk; None sizes chunks to `CHUNK_BYTES`.
            scale: run the network on the images resized by this factor and resize the scores back
                (bilinear); None: `test_scale`.

        Returns:
            B x K x H x W float scores (not normalized over K).
        """
        h, w = images.shape[-2:]
        scaled, scale = self._at_scale(images, scale)
        if scale != 1.0:
            probs = self.semantic_probs(scaled, chunk_rows=chunk_rows, scale=1.0)  # B x K x sH x sW
            return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        cls_probs, masks = self._final_predictions(images)
        out = masks.new_empty(masks.shape[0], cls_probs.shape[-1], h, w)
        for r0, r1 in _row_chunks(h, w, masks.shape[0] * masks.shape[1], chunk_rows):
            out[:, :, r0:r1] = _probs_rows(cls_probs, masks, r0, r1, w)
        return out

    def default_window(self, size: Sequence[int], scale: float | None = None) -> int | None:
        """The tile side in input pixels `predict` uses for an image of ``size`` (H, W) by default:
        ``test_window / scale`` when the image is larger than that, None (whole image) otherwise or when
        `test_window` is 0."""
        if not self.test_window:
            return None
        scale = self.test_scale if scale is None else float(scale)
        window = max(1, round(self.test_window / scale))
        return window if max(size) > window else None

    @torch.no_grad()
    def scores(self, images: Tensor, *, scale: float | None = None) -> Tensor:
        """The B x K x H x W class scores `predict` takes the argmax of by default: `sliding_probs` in tiles of
        `default_window`, or `semantic_probs` of the whole image, at ``scale``. With ``scale`` None and
        `test_ratios` other than ``(1.0,)``, the mean over those scales of the scores normalised to sum 1 per
        pixel."""
        if scale is None and tuple(self.test_ratios) != (1.0,):
            total = None
            for ratio in self.test_ratios:
                p = self.scores(images, scale=self.test_scale * ratio)  # B x K x H x W
                p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-6)
                total = p if total is None else total + p
            assert total is not None
            return total / len(self.test_ratios)
        window = self.default_window(images.shape[-2:], scale)
        if window is None:
            return self.semantic_probs(images, scale=scale)
        return self.sliding_probs(images, window=window, scale=scale)

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        *,
        chunk_rows: int | None = None,
        window: int | None = None,
        stride: int | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """Semantic labels (argmax of `semantic_probs`), memory-bounded.

        Args:
            images: B x 3 x H x W float RGB in 0..255.
            chunk_rows: rows per chunk for the upsample/argmax; None sizes chunks to `CHUNK_BYTES`.
            window: None: the model's own, `default_window` (tiles of `test_window`, or the whole image).
                0: whole-image inference (the reference's ``mode='whole'``). Otherwise sliding-window
                inference with square ``window`` tiles of the input (a multiple of 256 avoids padding
                waste), averaging the scores where tiles overlap; this bounds the network's activation memory
                by the tile size.
            stride: tile step for sliding windows; default ``3 * window // 4``.
            scale: inference scale (`semantic_probs`); None: `test_scale`. Windows are cut from the input
                image, each scored at this scale. With both ``window`` and ``scale`` None and `test_ratios` other
                than ``(1.0,)``, the argmax of `scores` (the model's scales averaged).

        Returns:
            B x H x W int64 class ids in [0, K).
        """
        b, _, h, w = images.shape
        if window is None and scale is None and tuple(self.test_ratios) != (1.0,):
            return self.scores(images).argmax(dim=1)  # the model's own scales, averaged
        if window is None:
            window = self.default_window((h, w), scale)
        if window:
            return self._predict_sliding(images, window=window, stride=stride or 3 * window // 4, scale=scale)
        if (self.test_scale if scale is None else scale) != 1.0:
            return self.semantic_probs(images, chunk_rows=chunk_rows, scale=scale).argmax(dim=1)
        cls_probs, masks = self._final_predictions(images)
        labels = torch.empty(b, h, w, dtype=torch.int64, device=images.device)
        for r0, r1 in _row_chunks(h, w, b * masks.shape[1], chunk_rows):
            labels[:, r0:r1] = _probs_rows(cls_probs, masks, r0, r1, w).argmax(dim=1)
        return labels

    def _final_predictions(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(class probs without no-object B x Q x K, padded stride-2 mask logits B x Q x H'/2 x W'/2)."""
        predictions, _ = self._decode(images, keep_aux=False)
        logits, masks = predictions[-1]
        return logits.softmax(dim=-1)[..., :-1], masks

    def _predict_sliding(self, images: Tensor, *, window: int, stride: int, scale: float | None) -> Tensor:
        return self.sliding_probs(images, window=window, stride=stride, scale=scale).argmax(dim=1)

    @torch.no_grad()
    def sliding_probs(
        self, images: Tensor, *, window: int, stride: int | None = None, scale: float | None = None
    ) -> Tensor:
        """`semantic_probs` by sliding windows (mmseg's ``mode='slide'``): square ``window`` tiles every
        ``stride`` pixels (default ``3 * window // 4``; the last tile flush with the edge), each scored at
        ``scale``, averaged where they overlap. Bounds the network's memory by the tile size.

        Returns:
            B x K x H x W float scores.
        """
        b, _, h, w = images.shape
        stride = stride or 3 * window // 4
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in (0, window={window}]. Got {stride} instead.")
        scores = images.new_zeros(b, self.num_classes, h, w)
        counts = images.new_zeros(1, 1, h, w)
        for y0 in _tile_starts(h, window, stride):
            for x0 in _tile_starts(w, window, stride):
                tile = images[:, :, y0 : y0 + window, x0 : x0 + window]
                th, tw = tile.shape[-2:]
                scores[:, :, y0 : y0 + th, x0 : x0 + tw] += self.semantic_probs(tile, scale=scale)
                counts[:, :, y0 : y0 + th, x0 : x0 + tw] += 1
        return scores / counts


def _tile_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of tiles covering ``size`` (the last tile is flush with the end), mmseg slide-style."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(n)]


def _row_chunks(h: int, w: int, maps: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) over h rows; ``maps`` full-width float maps per row count against `CHUNK_BYTES`."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * maps * max(w, 1)))
    return [(r0, min(r0 + chunk_rows, h)) for r0 in range(0, h, chunk_rows)]


def _probs_rows(cls_probs: Tensor, masks: Tensor, r0: int, r1: int, width: int) -> Tensor:
    """Scores for output rows [r0, r1): exact 2x bilinear upsampling of the mask rows needed, contraction.

    Args:
        cls_probs: B x Q x K.
        masks: B x Q x h x w mask logits at stride 2 of the padded input.
        r0: first output row.
        r1: end output row (exclusive), at most 2h.
        width: output columns kept (at most 2w).

    Returns:
        B x K x (r1 - r0) x width.
    """
    h = masks.shape[-2]
    # PyTorch's align_corners=False source index for a 2x upsample: (y + 0.5) / 2 - 0.5, clamped at 0.
    ys = torch.arange(r0, r1, device=masks.device, dtype=torch.float32)
    src = ((ys + 0.5) * 0.5 - 0.5).clamp(min=0)
    i0 = src.floor().long()
    lam = (src - i0).to(masks.dtype).view(1, 1, -1, 1)  # 1 x 1 x n x 1
    i1 = (i0 + 1).clamp(max=h - 1)
    rows = masks[:, :, i0] * (1 - lam) + masks[:, :, i1] * lam  # B x Q x n x w
    # Height scale 1 leaves rows untouched; only the width is upsampled here.
    rows = F.interpolate(rows, size=(r1 - r0, 2 * masks.shape[-1]), mode="bilinear", align_corners=False)
    rows = rows[..., :width].sigmoid()  # B x Q x n x W
    return torch.einsum("bqk,bqhw->bkhw", cls_probs, rows)  # B x K x n x W
