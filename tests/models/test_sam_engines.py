"""Mask models behind the labeler (SAM, HQ-SAM, SAM 2.1), phrases and negative phrases, per-box refinement.

Random weights throughout; the test variants (``tiny``, ``hq_tiny``, ``sam2_tiny``) are the packages' own classes
at a small width or depth, with the real 1024 input and 64 x 64 embedding.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from addclass.cli.args import build_parser
from addclass.common.errors import InputError
from addclass.models.labelers.build import LABELERS, LabelerConfig
from addclass.models.labelers.embedding_cache import InMemoryEmbeddingCache
from addclass.models.labelers.grounded_sam import GroundedSamLabeler
from addclass.models.labelers.grounded_sam_ops import check_phrases, refine_window, split_phrases
from addclass.models.labelers.grounded_sam_weights import CheckpointMismatchError
from addclass.models.labelers.sam_engines import SAM_VARIANTS, SamEngine, build_sam_model
from addclass.storage.names import class_name_from_prompt

TEST_VARIANTS = ("tiny", "hq_tiny", "sam2_tiny")
PARTS = {
    "tiny": {"image_embed": (1, 256, 64, 64)},
    "hq_tiny": {"image_embed": (1, 256, 64, 64), "interm": (1, 64, 64, 64)},
    "sam2_tiny": {"image_embed": (1, 256, 64, 64), "high_res_0": (1, 32, 256, 256), "high_res_1": (1, 64, 128, 128)},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, 5, 7)).astype(np.float32))
    big = F.interpolate(small, (height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _detections(table: dict[str, Any]) -> Any:
    """A `detect` stand-in: phrase -> [(xyxy box, score)], best first, as GroundingDINO's stage returns them."""
    calls: list[list[str]] = []

    def detect(image: np.ndarray, phrases: list[str]) -> list[dict[str, Any]]:
        calls.append(list(phrases))
        out = []
        for phrase in phrases:
            found = table.get(phrase, [])
            out.append({"boxes": torch.tensor([b for b, _ in found], dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor([s for _, s in found], dtype=torch.float32),
                        "phrases": [phrase] * len(found)})
        return out

    detect.calls = calls  # type: ignore[attr-defined]
    return detect


def _labeler(variant: str, **options: Any) -> GroundedSamLabeler:
    return GroundedSamLabeler(sam_variant=variant, dino_config="test", random_weights=True, dino_image_size=256,
                              **options)


# ---------------------------------------------------------------------------------------------------- engines


@pytest.mark.parametrize("variant", TEST_VARIANTS)
def test_every_mask_model_labels_and_caches_its_features(variant: str) -> None:
    cache = InMemoryEmbeddingCache()
    labeler = _labeler(variant, embedding_cache=cache)
    image = _image(120, 176, 0)
    labeler.detect = _detections({"car": [([10, 20, 90, 100], 0.9), ([100, 30, 170, 110], 0.6)],  # type: ignore[method-assign]
                                  "bus": [([5, 5, 60, 50], 0.7)]})
    calls: list[int] = []
    encoder: Any = labeler.sam.image_encoder
    hook = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = labeler.label(image, "car")
        assert calls == [1]
        parts = PARTS[variant]
        assert labeler.features is not None and set(labeler.features) == set(parts)
        assert {k: tuple(v.shape) for k, v in labeler.features.items()} == parts
        assert len(cache) == len(parts)  # one cache entry per part
        second = labeler.label(image, "bus")  # same image, another prompt: features from the cache
        again = labeler.label(image, "car")
        assert calls == [1]
    finally:
        hook.remove()
    assert first.instance_masks.shape == (2, 120, 176) and first.instance_masks.dtype == np.bool_
    assert np.array_equal(first.mask, first.instance_masks.any(axis=0))
    assert second.instance_masks.shape == (1, 120, 176)
    assert np.array_equal(again.instance_masks, first.instance_masks)  # cached features decode the same
    assert len(first.extra["sam_iou"]) == 2 and all(np.isfinite(first.extra["sam_iou"]))
    settings = labeler.settings()
    assert settings["sam_variant"] == variant and "hq_token_only" not in settings
    assert f"/{variant}/" in labeler.embedding_cache_key("ab" * 32)  # each mask model has its own entries


def test_hq_token_only_changes_masks_settings_and_key() -> None:
    labeler = _labeler("hq_tiny")
    image = _image(96, 128, 1)
    labeler.set_image(image)
    box = torch.tensor([[10.0, 10.0, 100.0, 80.0]])
    both, _ = labeler.segment_boxes(box)
    hq_only = _labeler("hq_tiny", hq_token_only=True)
    hq_only.set_image(image)
    alone, _ = hq_only.segment_boxes(box)
    assert both.shape == alone.shape == (1, 1, 256, 256) and not torch.allclose(both, alone)
    assert hq_only.settings()["hq_token_only"] is True
    on = LabelerConfig(sam_variant="hq_vit_b", hq_token_only=True).resume_settings()
    assert on["hq_token_only"] is True and "hq_token_only" not in LabelerConfig(sam_variant="hq_vit_b").resume_settings()
    with pytest.raises(InputError, match="hq_token_only applies to HQ-SAM"):
        LabelerConfig(sam_variant="vit_b", hq_token_only=True)


@pytest.mark.parametrize(("variant", "layout"), [("hq_vit_tiny", "plain"), ("sam2.1_hiera_t", "model")])
def test_released_checkpoint_layouts_load_through_the_cli_path(tmp_path: Path, variant: str, layout: str) -> None:
    """A file saved the way the released one is (its file name; a plain state dict for HQ-SAM, {"model": ...} for
    SAM 2.1) loads through the CLI's labeler flags, strictly; another variant's file is a one-line error."""
    model = build_sam_model(variant, checkpoint=None, seed=3)
    state = model.state_dict()
    name = SAM_VARIANTS[variant].checkpoint_file
    assert name is not None
    path = tmp_path / name
    torch.save(state if layout == "plain" else {"model": state}, path)
    args = build_parser().parse_args(["pseudo-label", "s.zarr", "--prompt", "car", "--sam", variant,
                                      "--sam-checkpoint", str(path), "--dino", "test", "--random-weights"])
    from addclass.cli.commands_store import labeler_config_from_args

    config = labeler_config_from_args(args)
    LABELERS[config.kind].check(config)
    labeler = LABELERS[config.kind].build(config)
    assert isinstance(labeler, GroundedSamLabeler)
    loaded = labeler.sam.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert labeler.settings()["sam_weights"] != "random-3"  # the file's sha256
    other = "sam2.1_hiera_t" if variant == "hq_vit_tiny" else "hq_vit_tiny"
    with pytest.raises(CheckpointMismatchError, match=str(path)):
        build_sam_model(other, checkpoint=path)


def test_missing_checkpoint_names_the_released_file_and_where_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("ADDCLASS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ADDCLASS_SAM_CHECKPOINT", raising=False)
    for variant, url in (("hq_vit_l", "sam-hq"), ("sam2.1_hiera_b+", "facebookresearch/sam2")):
        config = LabelerConfig(sam_variant=variant, dino_checkpoint=str(tmp_path / "gd.pth"))
        with pytest.raises(FileNotFoundError) as err:
            LABELERS["grounded-sam"].check(config)
        message = str(err.value)
        assert str(SAM_VARIANTS[variant].checkpoint_file) in message and url in message and "\n" not in message


# ---------------------------------------------------------------------------------------- phrases, negatives


def test_phrase_helpers() -> None:
    assert split_phrases("car") == ["car"]
    assert split_phrases("car . van . pickup truck .") == ["car", "van", "pickup truck"]
    assert class_name_from_prompt("Car . van . truck") == "car"
    assert class_name_from_prompt("traffic light") == "traffic_light"
    with pytest.raises(InputError, match="separated"):
        split_phrases("car .  . van")
    assert check_phrases(["toy car", " model car "], what="negative_phrases") == ("toy car", "model car")
    for bad in (["toy car", "toy car"], ["a . b"], [""], "toy car"):
        with pytest.raises(InputError, match="negative_phrases"):
            check_phrases(bad, what="negative_phrases")  # type: ignore[arg-type]


def test_phrases_of_one_class_merge_and_negative_boxes_suppress() -> None:
    labeler = _labeler("tiny", negative_phrases=("toy car",), max_boxes=5)
    table = {
        "car": [([10, 10, 60, 60], 0.9)],
        "van": [([12, 11, 61, 60], 0.5), ([100, 10, 150, 60], 0.8), ([10, 70, 60, 110], 0.4)],  # 1st = the car
        "toy car": [([98, 12, 151, 62], 0.6)],  # over the 0.8 van
    }
    labeler.detect = _detections(table)  # type: ignore[method-assign]
    record = labeler.label(_image(120, 176, 2), "car . van")
    assert labeler.detect.calls == [["car", "van", "toy car"]]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(record.boxes, [[10, 10, 60, 60], [10, 70, 60, 110]])
    np.testing.assert_allclose(record.scores, [0.9, 0.4])
    assert record.phrases == ["car", "van"] and record.extra["caption"] == "car . van . toy car ."
    assert record.instance_masks.shape[0] == 2
    # Without the negative phrase the van comes back; a phrase used twice is refused.
    plain = labeler.with_options(negative_phrases=())
    plain.detect = _detections(table)  # type: ignore[method-assign]
    assert plain.label(_image(120, 176, 2), "car . van").num_instances == 3
    with pytest.raises(InputError, match="twice"):
        labeler.label(_image(120, 176, 2), "car . toy car")
    settings = labeler.settings()
    assert settings["negative_phrases"] == ["toy car"] and settings["negative_iou"] == 0.5
    assert "negative_phrases" not in plain.settings()
    key_on = LabelerConfig(negative_phrases=["toy car"]).resume_settings()  # type: ignore[arg-type]
    assert key_on["negative_phrases"] == ("toy car",) and "negative_iou" not in LabelerConfig().resume_settings()


def test_cli_and_flow_carry_the_new_labeler_options() -> None:
    from addclass.cli.commands_store import labeler_config_from_args
    from addclass.flows.params import LabelingParams, labeler_config

    args = build_parser().parse_args(["pseudo-label", "s", "--prompt", "car . van", "--sam", "hq_vit_b",
                                      "--negative-phrases", "toy car", "model car", "--refine", "--refine-margin",
                                      "0.5", "--hq-token-only"])
    config = labeler_config_from_args(args)
    assert isinstance(args, argparse.Namespace) and config.negative_phrases == ("toy car", "model car")
    assert config.refine and config.refine_margin == 0.5 and config.hq_token_only
    flow = labeler_config(LabelingParams(sam_variant="hq_vit_b", negative_phrases=["toy car"], refine=True,
                                         hq_token_only=True), device="cpu", seed=0)
    assert flow.negative_phrases == ("toy car",) and flow.refine and flow.hq_token_only


# ----------------------------------------------------------------------------------------------- refinement


class _ResolutionLimitedSam(SamEngine):
    """A mask model that is perfect up to its 256 x 256 output: the mask is the image's bright pixels, averaged
    over the 4 x 4-pixel cells of the 1024 input frame and thresholded at half. Whatever it is shown (the whole
    image or a crop), the crop path can only be sharper if the labeler's crop geometry is right."""

    def encode(self, image_rgb: np.ndarray) -> dict[str, torch.Tensor]:
        h, w = image_rgb.shape[:2]
        ih, iw = self.input_size((h, w))
        bright = torch.from_numpy(image_rgb[..., 0] > 127).float()[None, None]  # 1 x 1 x H x W
        frame = torch.zeros(1, 1, self.img_size, self.img_size)
        frame[..., :ih, :iw] = F.interpolate(bright, (ih, iw), mode="bilinear", antialias=True, align_corners=False)
        return {"image_embed": F.avg_pool2d(frame, 4)}  # 1 x 1 x 256 x 256 occupancy

    def decode(self, features: dict[str, torch.Tensor], boxes_xyxy: torch.Tensor,
               original_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        inside = features["image_embed"][0, 0] > 0.5  # 256 x 256
        cells = torch.arange(256, dtype=torch.float32) * 4 + 2  # cell centres in the input frame
        logits = torch.full((len(boxes_xyxy), 1, 256, 256), -8.0)
        for i, (x0, y0, x1, y1) in enumerate(self.boxes_to_input(boxes_xyxy, original_size).tolist()):
            in_box = ((cells >= y0 - 8) & (cells <= y1 + 8))[:, None] & ((cells >= x0 - 8) & (cells <= x1 + 8))[None]
            logits[i, 0][inside & in_box] = 8.0  # the box's object only, as SAM gives it
        return logits, torch.ones(len(boxes_xyxy))


def test_refinement_decodes_small_objects_at_crop_resolution() -> None:
    height, width, r = 1536, 2304, 30.5
    yy, xx = np.mgrid[:height, :width]
    disks = [(300.0, 400.0), (1100.0, 1900.0)]
    truth = np.zeros((height, width), bool)
    for cy, cx in disks:
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = np.repeat((truth * 255).astype(np.uint8)[..., None], 3, axis=2)
    boxes = {"car": [([cx - r, cy - r, cx + r, cy + r], 0.9) for cy, cx in disks]}
    results = {}
    for refine in (False, True):
        labeler = _labeler("tiny", refine=refine)
        labeler.engine = _ResolutionLimitedSam(labeler.sam, device=labeler.device)
        labeler.detect = _detections(boxes)  # type: ignore[method-assign]
        results[refine] = labeler.label(image, "car")
    whole, fine = results[False], results[True]
    assert fine.extra["refined"] == [True, True] and "refined" not in whole.extra

    def iou(mask: np.ndarray) -> float:
        return float((mask & truth).sum() / (mask | truth).sum())

    # The whole image's logits are 9 px apart (2304 / 256): a 61 px disk is a blocky ~7-cell shape. The crop
    # (91 px) fills the 1024 input: cells are 0.36 px, the disk comes back to within rounding.
    assert iou(whole.mask) < 0.93 and iou(fine.mask) > 0.98, (iou(whole.mask), iou(fine.mask))
    assert np.array_equal(fine.mask, fine.instance_masks.any(axis=0))
    for i in range(len(disks)):  # each instance changed only inside its own crop
        y0, x0, y1, x1 = refine_window(boxes["car"][i][0], height=height, width=width, margin=0.25)
        outside = np.ones((height, width), bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(fine.instance_masks[i][outside], whole.instance_masks[i][outside])


def test_refine_window_and_large_boxes_keep_the_whole_image_mask() -> None:
    assert refine_window([100, 50, 200, 90], height=400, width=600, margin=0.25) == (38, 75, 102, 225)
    assert refine_window([0, 0, 10, 10], height=400, width=600, margin=0.25) == (0, 0, 37, 37)  # >= 64 px wide
    assert refine_window([550, 390, 600, 400], height=400, width=600, margin=0.5) == (363, 525, 400, 600)
    labeler = _labeler("tiny", refine=True)
    labeler.engine = _ResolutionLimitedSam(labeler.sam, device=labeler.device)
    labeler.detect = _detections({"car": [([10, 10, 150, 110], 0.9)]})  # type: ignore[method-assign]
    record = labeler.label(_image(120, 160, 3), "car")
    assert record.extra["refined"] == [False]  # its crop is the whole image: nothing finer to gain


def test_each_mask_model_and_option_has_its_own_resume_key() -> None:
    from addclass.tasks.labels.pseudo_label import settings_key

    def key(**fields: Any) -> str:
        return settings_key({"prompt": "car", **LabelerConfig(**fields).resume_settings()})

    plain = key()
    keys = [key(sam_variant=v) for v in ("vit_b", "hq_vit_b", "sam2.1_hiera_t", "sam2.1_hiera_l")]
    keys += [key(sam_variant="hq_vit_b", hq_token_only=True), key(refine=True), key(refine=True, refine_margin=0.5),
             key(negative_phrases=("toy car",)), key(negative_phrases=("toy car",), negative_iou=0.3)]
    assert keys[0] == plain and len(set(keys)) == len(keys)
    # options that are off leave the key of runs made before they existed unchanged
    assert key(refine_margin=0.5, negative_iou=0.3) == plain
