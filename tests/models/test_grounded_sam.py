"""Grounded-SAM labeler: coordinates, selection, upsampling, checkpoints, cache, end to end (random weights).

The heavy models are built once per module: GroundingDINO's test config (Swin-T, 2-layer BERT, enc 1 / dec 1,
100 queries) at 256 px and SAM with a tiny ViT encoder (the real vit_b runs in bench/pseudo_label.py, ~15 s
per encoder pass here; tests/models/test_sam_engines.py runs every mask-model family at test size).

Tests on the small models run with one intra-op thread: they are dominated by many small ops, and two OpenMP
threads on a shared 2-vCPU machine made GroundingDINO up to 9x slower (5.3 s vs 0.6 s per pass).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from torchvision.ops import box_convert, box_iou, nms

from addclass.models.labelers.embedding_cache import (
    EmbeddingCache,
    InMemoryEmbeddingCache,
    embedding_key,
    image_sha256,
)
from addclass.models.labelers.grounded_sam import GroundedSamLabeler, parse_dtype
from addclass.models.labelers.grounded_sam_ops import (
    build_caption,
    cut_edges,
    cxcywh_to_xyxy,
    dino_input_size,
    merge_tiled_boxes,
    remove_small_regions,
    select_boxes,
    tile_windows,
    token_prompt_index,
    upsample_mask_logits,
)
from addclass.models.labelers.grounded_sam_weights import (
    DINO_URL,
    CheckpointMismatchError,
    MissingCheckpointError,
    build_dino,
    check_state_dict,
)
from addclass.models.labelers.label_record import LabelRecord
from addclass.models.labelers.sam_engines import FAMILY_URLS

MAX_BOXES = 3


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (blobs, not white noise)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 3, 6, 8)).astype(np.float32))
    big = F.interpolate(small, (height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [_image(240, 320, 0), _image(300, 200, 1), _image(256, 256, 2)]


@pytest.fixture(autouse=True)
def _one_thread_for_small_models(request: pytest.FixtureRequest) -> Iterator[None]:
    if "labeler" not in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def labeler() -> GroundedSamLabeler:
    return GroundedSamLabeler(
        sam_variant="tiny",
        dino_config="test",
        random_weights=True,
        dino_image_size=256,
        max_boxes=MAX_BOXES,
        embedding_cache=InMemoryEmbeddingCache(),
    )


class _CallCounter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((2160, 3840), 800, 1333, (750, 1333)),  # long side capped: size = round(1333 * 2160 / 3840) = 750
        ((256, 256), 256, 1333, (256, 256)),
        ((300, 400), 256, None, (256, 341)),
    ],
)
def test_dino_input_size(
    hw: tuple[int, int], size: int, max_size: int | None, expected: tuple[int, int]
) -> None:
    assert dino_input_size(*hw, size=size, max_size=max_size) == expected


def test_cxcywh_to_xyxy_exact_values() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.9, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]])
    got = cxcywh_to_xyxy(boxes, height=100, width=200)
    expected = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 70.0, 30.0, 100.0], [0.0, 0.0, 100.0, 50.0]])
    torch.testing.assert_close(got, expected)
    unclipped = cxcywh_to_xyxy(boxes, height=100, width=200, clip=False)
    torch.testing.assert_close(unclipped[1], torch.tensor([-10.0, 70.0, 30.0, 110.0]))
    # Same as the reference conversion (torchvision box_convert on boxes scaled by [W, H, W, H]).
    reference = box_convert(boxes * torch.tensor([200, 100, 200, 100]), in_fmt="cxcywh", out_fmt="xyxy")
    torch.testing.assert_close(unclipped, reference)


def test_select_boxes_threshold_nms_topk() -> None:
    scores = torch.tensor([0.9, 0.35, 0.8, 0.36, 0.7, 0.5])
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],
            [50, 50, 60, 60],
            [0, 0, 10, 9.5],
            [20, 20, 30, 30],
            [40, 0, 50, 10],
            [0, 0, 10, 10],
        ],
        dtype=torch.float32,
    )
    # Strictly greater than the threshold: 0.35 is dropped.
    plain = select_boxes(scores, boxes, box_threshold=0.35, nms_iou=None, max_boxes=None)
    assert plain.tolist() == [0, 2, 4, 5, 3]
    # NMS at 0.8: boxes 2 (IoU 0.95 with box 0) and 5 (identical to box 0) are suppressed.
    kept = select_boxes(scores, boxes, box_threshold=0.35, nms_iou=0.8, max_boxes=None)
    assert kept.tolist() == [0, 4, 3]
    assert select_boxes(scores, boxes, box_threshold=0.35, nms_iou=0.8, max_boxes=2).tolist() == [0, 4]
    assert select_boxes(scores, boxes, box_threshold=0.95, nms_iou=0.8, max_boxes=2).numel() == 0


def test_upsample_mask_logits_alignment_exact() -> None:
    # A 300 x 400 image becomes 768 x 1024 in SAM; its low-res logits cover rows 0..191, cols 0..255 of 256².
    low = torch.full((1, 1, 256, 256), -10.0)
    low[..., 48:96, 64:128] = 10.0  # low-res cells -> 1024 px rows 192..383, cols 256..511 -> x 400/1024
    instances, union = upsample_mask_logits(low, input_size=(768, 1024), original_size=(300, 400))
    expected = torch.zeros(300, 400, dtype=torch.bool)
    expected[75:150, 100:200] = True  # 192 / 2.56 = 75, 384 / 2.56 = 150, 256 / 2.56 = 100, 512 / 2.56 = 200
    assert instances.shape == (1, 300, 400) and instances.dtype == torch.bool
    assert torch.equal(instances[0], expected)
    assert torch.equal(union, expected)


def test_upsample_mask_logits_matches_sam_postprocess_in_chunks() -> None:
    from segment_anything.modeling import Sam

    torch.manual_seed(0)
    low = torch.randn(5, 1, 256, 256) * 4
    input_size, original_size = (576, 1024), (333, 592)

    class _Geometry:  # the only attribute postprocess_masks reads from the encoder
        img_size = 1024

    reference_model = type("SamGeometry", (), {"image_encoder": _Geometry()})()
    reference = Sam.postprocess_masks(reference_model, low, input_size, original_size)[:, 0] > 0  # 5 x H x W
    whole, union_whole = upsample_mask_logits(low, input_size=input_size, original_size=original_size)
    one_by_one, union_chunked = upsample_mask_logits(
        low, input_size=input_size, original_size=original_size, chunk_bytes=1
    )
    assert torch.equal(whole, reference)
    assert torch.equal(one_by_one, reference)
    assert torch.equal(union_whole, reference.any(dim=0)) and torch.equal(union_chunked, union_whole)


def test_build_caption_and_token_prompt_index(labeler: GroundedSamLabeler) -> None:
    caption, spans = build_caption(["Car", "traffic light."])
    assert caption == "car . traffic light ."
    assert spans == [(0, 3), (6, 19)]
    tokenized = labeler.tokenizer(caption, return_offsets_mapping=True)
    assert tokenized["input_ids"] == [101, 2482, 1012, 4026, 2422, 1012, 102]
    assert token_prompt_index(tokenized["offset_mapping"], spans).tolist() == [-1, 0, -1, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="non-empty"):
        build_caption(["car", " . "])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_missing_checkpoint_names_path_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADDCLASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADDCLASS_SAM_CHECKPOINT", raising=False)
    monkeypatch.delenv("ADDCLASS_DINO_CHECKPOINT", raising=False)
    # Default folder: the message names the expected file and where to download it.
    with pytest.raises(MissingCheckpointError) as err:
        GroundedSamLabeler(sam_variant="vit_b", dino_config="swint_ogc")
    default_sam = tmp_path / "cache" / "weights" / "sam_vit_b_01ec64.pth"
    assert str(default_sam) in str(err.value) and FAMILY_URLS["sam"] in str(err.value)
    # Explicit argument.
    missing = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(MissingCheckpointError) as err:
        GroundedSamLabeler(sam_checkpoint=missing, dino_config="test", random_weights=False)
    assert str(missing) in str(err.value) and FAMILY_URLS["sam"] in str(err.value)
    # Environment variable, GroundingDINO side (SAM resolved from an existing file first).
    sam_file = tmp_path / "sam.pth"
    sam_file.write_bytes(b"not read before GroundingDINO is resolved")
    dino_missing = tmp_path / "gd.pth"
    monkeypatch.setenv("ADDCLASS_DINO_CHECKPOINT", str(dino_missing))
    with pytest.raises(MissingCheckpointError) as err:
        GroundedSamLabeler(sam_checkpoint=sam_file, dino_config="swint_ogc")
    assert str(dino_missing) in str(err.value) and DINO_URL in str(err.value)
    assert "ADDCLASS_DINO_CHECKPOINT" in str(err.value)


def test_test_variants_need_random_weights_or_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADDCLASS_SAM_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="random_weights=True"):
        GroundedSamLabeler(sam_variant="tiny", dino_config="test")


def test_mismatching_sam_checkpoint_is_a_clear_error(tmp_path: Path, labeler: GroundedSamLabeler) -> None:
    state = {k: v.clone() for k, v in labeler.sam.state_dict().items()}
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    state[key] = torch.zeros(7, 3)
    path = tmp_path / "bad_sam.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        GroundedSamLabeler(sam_variant="tiny", sam_checkpoint=path, dino_config="test", random_weights=True)
    assert str(path) in str(err.value) and key in str(err.value) and "(7, 3)" in str(err.value)
    # SAM loads strictly: a missing key is an error too.
    state = dict(labeler.sam.state_dict())
    state.pop("prompt_encoder.no_mask_embed.weight")
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        check_state_dict(labeler.sam, state, path=path, strict=True)


def test_dino_checkpoint_round_trip_and_required_keys(
    tmp_path: Path, labeler: GroundedSamLabeler, caplog: pytest.LogCaptureFixture
) -> None:
    state = labeler.dino.state_dict()
    bert_keys = [k for k in state if k.startswith("bert.")]
    for part in ("bert.embeddings.", "bert.encoder.", "bert.pooler."):
        assert any(k.startswith(part) for k in bert_keys), part
    path = tmp_path / "gd_test.pth"
    torch.save({"model": state}, path)
    loaded = build_dino(config="test", checkpoint=path, device=torch.device("cpu"), seed=123)
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"):
        assert torch.equal(
            loaded.state_dict()[key], state[key]
        )  # seed 123 differs: the values came from the file
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    # A missing bert.* or backbone.* weight fails (a strict=False load would leave it random) ...
    for dropped in ("bert.encoder.layer.0.attention.self.query.weight", "backbone.0.patch_embed.proj.weight"):
        partial = {k: v for k, v in state.items() if k != dropped}
        with pytest.raises(CheckpointMismatchError, match="required") as err:
            check_state_dict(
                labeler.dino, partial, path=path, strict=False, required_prefixes=("bert.", "backbone.")
            )
        assert dropped in str(err.value)
    # ... any other missing or unexpected key is logged.
    partial = {k: v for k, v in state.items() if k != "feat_map.bias"}
    partial["extra.key"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING, logger="addclass.models.labelers.grounded_sam_weights"):
        check_state_dict(
            labeler.dino, partial, path=path, strict=False, required_prefixes=("bert.", "backbone.")
        )
    assert "feat_map.bias" in caplog.text and "extra.key" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# End to end (tiny SAM, GroundingDINO test config, random weights)
# ----------------------------------------------------------------------------------------------------------


def _check_record(record: LabelRecord, image: np.ndarray, labeler: GroundedSamLabeler) -> None:
    height, width = image.shape[:2]
    n = record.num_instances
    assert 1 <= n <= MAX_BOXES
    assert record.mask.shape == (height, width) and record.mask.dtype == np.bool_
    assert record.instance_masks.shape == (n, height, width)
    assert record.boxes.shape == (n, 4) and record.boxes.dtype == np.float32
    assert record.scores.dtype == np.float32 and (record.scores > labeler.box_threshold).all()
    assert (np.diff(record.scores) <= 0).all()  # best first
    assert (record.boxes[:, 0] >= 0).all() and (record.boxes[:, 2] <= width).all()
    assert (record.boxes[:, 1] >= 0).all() and (record.boxes[:, 3] <= height).all()
    assert (record.boxes[:, 2] >= record.boxes[:, 0]).all() and (
        record.boxes[:, 3] >= record.boxes[:, 1]
    ).all()
    assert np.array_equal(record.mask, record.instance_masks.any(axis=0))
    assert record.mask.any()


def _raw_dino(
    labeler: GroundedSamLabeler, image: np.ndarray, caption: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference post-processing of one GroundingDINO pass: scores Q, pixel xyxy boxes Q x 4 (query order)."""
    height, width = image.shape[:2]
    with torch.no_grad():
        out = labeler.dino(labeler.dino_preprocess(image)[None], captions=[caption])
    scores = out["pred_logits"][0].sigmoid().max(dim=1).values  # Q
    boxes = box_convert(out["pred_boxes"][0] * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return scores, boxes


def test_label_matches_reference_pipeline(labeler: GroundedSamLabeler, images: list[np.ndarray]) -> None:
    """Boxes as the reference computes them (threshold, NMS 0.8, top-k); masks as predict_torch gives."""
    image = images[0]
    height, width = image.shape[:2]
    record = labeler.label(image, "car")
    _check_record(record, image, labeler)

    scores, boxes = _raw_dino(labeler, image, "car .")
    idx = torch.nonzero(scores > 0.35).flatten()
    idx = idx[nms(boxes[idx], scores[idx], 0.8)][:MAX_BOXES]
    np.testing.assert_allclose(record.boxes, boxes[idx].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(record.scores, scores[idx].numpy(), rtol=0, atol=1e-6)
    assert all(p in ("", "car") for p in record.phrases)

    predictor = SamPredictor(labeler.sam)  # the package's own path, for reference
    predictor.set_image(image)
    transformed = predictor.transform.apply_boxes_torch(boxes[idx], (height, width))
    masks, _, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    assert np.array_equal(record.instance_masks, masks[:, 0].numpy())


def test_thresholds_topk_and_nms(labeler: GroundedSamLabeler, images: list[np.ndarray]) -> None:
    image = images[0]
    scores, boxes = _raw_dino(labeler, image, "car .")
    threshold = float(scores.median())
    above = torch.nonzero(scores > threshold).flatten()
    assert 2 < above.numel() < scores.numel()  # random weights: scores spread over (0, 1]
    for nms_iou, max_boxes in ((None, None), (None, 2), (0.5, None), (0.5, 2)):
        options = {
            "box_threshold": threshold,
            "nms_iou": nms_iou,
            "max_boxes": max_boxes,
            "text_threshold": 0.0,
        }
        picked = labeler.with_options(**options).detect(image, ["car"])[0]
        if nms_iou is None:
            expected = above[torch.argsort(scores[above], descending=True, stable=True)]
        else:
            expected = above[nms(boxes[above], scores[above], nms_iou)]
        expected = expected[:max_boxes]
        torch.testing.assert_close(picked["scores"], scores[expected])
        torch.testing.assert_close(picked["boxes"], boxes[expected], rtol=0, atol=1e-4)
        assert (picked["scores"] > threshold).all()
        if nms_iou is not None:
            assert (box_iou(picked["boxes"], picked["boxes"]).fill_diagonal_(0) <= nms_iou).all()
        # text threshold 0: every prompt token is in the phrase (never [CLS]/[SEP]/'.')
        assert picked["phrases"] == ["car"] * len(expected)
    assert len(picked["scores"]) == 2


def test_tile_windows_cover_the_image_with_the_overlap_asked() -> None:
    assert tile_windows(300, 500, tile=512, overlap=64) == []  # fits: the whole-image pass sees it all
    windows = tile_windows(700, 1500, tile=512, overlap=128)
    covered = np.zeros((700, 1500), bool)
    for y0, x0, y1, x1 in windows:
        assert 0 < y1 - y0 <= 512 and 0 < x1 - x0 <= 512
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({(x0, x1) for _, x0, _, x1 in windows})
    assert all(a[1] - b[0] >= 128 for a, b in zip(xs, xs[1:], strict=False))  # neighbours overlap >= 128 px
    with pytest.raises(ValueError, match="tile_overlap <= tile_size / 2"):
        tile_windows(700, 1500, tile=512, overlap=300)


def test_a_box_split_across_tiles_comes_back_as_one_box() -> None:
    """Constructed detections on a 512 x 1024 image, tiles [0, 512) and [384, 896) and [512, 1024) wide: a car
    at x 300-600 is cut by both tiles (the whole image missed it); a car at x 700-760 is seen whole by two tiles
    and the whole image; a car at x 40-120 by one tile only."""
    height, width = 512, 1024
    windows = [(0, 0, 512, 512), (0, 384, 512, 896), (0, 512, 512, 1024)]
    views = [  # (window, boxes in image pixels, scores)
        ((0, 0, 512, 1024), [[700, 200, 760, 260]], [0.6]),
        (windows[0], [[300, 50, 512, 150], [40, 300, 120, 380]], [0.5, 0.7]),
        (windows[1], [[384, 52, 600, 150], [701, 201, 760, 259]], [0.55, 0.65]),
        (windows[2], [[700, 199, 761, 260]], [0.62]),
    ]
    boxes = torch.cat([torch.tensor(b, dtype=torch.float32) for _, b, _ in views])
    scores = torch.cat([torch.tensor(s) for _, _, s in views])
    cut = torch.cat([cut_edges(torch.tensor(b, dtype=torch.float32), w, height=height, width=width)
                     for w, b, _ in views])
    assert cut.tolist() == [False, True, False, True, False, False]  # the two halves touch inner tile edges
    merged, merged_scores, index = merge_tiled_boxes(boxes, scores, cut, nms_iou=0.5)
    assert merged.tolist() == [[40, 300, 120, 380], [701, 201, 760, 259], [300, 50, 600, 150]]
    assert merged_scores.tolist() == pytest.approx([0.7, 0.65, 0.55]) and index.tolist() == [2, 4, 3]
    side_by_side = torch.tensor([[300, 50, 512, 150], [520, 50, 700, 150]], dtype=torch.float32)
    two, _, _ = merge_tiled_boxes(side_by_side, torch.tensor([0.5, 0.6]), torch.tensor([True, False]), nms_iou=0.5)
    assert len(two) == 2  # two cars next to each other, one cut: not merged (they do not overlap)


def test_remove_small_regions_drops_islands_and_fills_holes() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:12, 10:12] = False  # a 4-px hole
    mask[35:37, 35:37] = True  # a 4-px island
    out = remove_small_regions(mask, 10)
    expected = np.zeros((40, 40), bool)
    expected[5:30, 5:30] = True
    assert np.array_equal(out, expected)
    assert np.array_equal(remove_small_regions(mask, 0), mask)
    lone = np.zeros((40, 40), bool)
    lone[2:4, 2:4] = True  # every island small: the largest stays (a small object is not erased)
    assert np.array_equal(remove_small_regions(lone, 10), lone)


def test_tiled_detection_and_cleanup_on_the_real_models(labeler: GroundedSamLabeler, images: list[np.ndarray]) -> None:
    image = np.ascontiguousarray(np.concatenate([images[0], images[0][:, ::-1]], axis=1))  # 240 x 640: 3 tiles
    tiled = labeler.with_options(tile_size=256, tile_overlap=64, min_region_area=20)
    windows = tile_windows(*image.shape[:2], tile=256, overlap=64)
    counter = _CallCounter(labeler.dino)
    try:
        detections = tiled.detect(image, ["car"])
    finally:
        counter.remove()
    assert counter.calls == 1 + len(windows) and len(windows) > 1  # the whole image, then each tile
    boxes = detections[0]["boxes"]
    assert len(boxes) <= MAX_BOXES and len(detections[0]["phrases"]) == len(boxes)
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= image.shape[1]).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= image.shape[0]).all()
    record = tiled.label(image, "car")
    for m in record.instance_masks:  # clean already: cleaning again changes nothing
        assert np.array_equal(remove_small_regions(m, 20), m)
    if len(record.instance_masks):
        assert np.array_equal(record.mask, record.instance_masks.any(axis=0))
    settings = tiled.settings()
    assert (settings["tile_size"], settings["tile_overlap"], settings["min_region_area"]) == (256, 64, 20)
    assert not {"tile_size", "tile_overlap", "min_region_area"} & set(labeler.settings())  # off: keys unchanged


def test_settings_json_and_with_options(labeler: GroundedSamLabeler) -> None:
    settings = labeler.settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["sam_variant"] == "tiny" and settings["sam_weights"] == "random-0"
    assert settings["dino_config"] == "test" and settings["dino_weights"] == "random-0"
    assert settings["box_threshold"] == 0.35 and settings["text_threshold"] == 0.25
    assert (
        settings["nms_iou"] == 0.8
        and settings["max_boxes"] == MAX_BOXES
        and settings["dino_image_size"] == 256
    )
    assert settings["simulated"] is False and settings["multimask_output"] is False
    other = labeler.with_options(box_threshold=0.5, nms_iou=None)
    assert other.settings() == {**settings, "box_threshold": 0.5, "nms_iou": None}
    assert other.sam is labeler.sam and other.engine is labeler.engine
    with pytest.raises(ValueError, match="with_options accepts"):
        labeler.with_options(sam_variant="vit_h")
    with pytest.raises(ValueError, match="box_threshold"):
        labeler.with_options(box_threshold=1.5)


def test_in_memory_cache_keys_copies_and_lru() -> None:
    cache = InMemoryEmbeddingCache(max_items=2)
    assert isinstance(cache, EmbeddingCache)
    value = torch.ones(1, 256, 64, 64)
    cache.put("a", value)
    value.zero_()  # the cache holds its own copy
    assert cache.get("a").sum() == 256 * 64 * 64 and cache.get("zzz") is None
    assert (cache.hits, cache.misses) == (1, 1)
    cache.put("b", value)
    cache.get("a")  # "a" is now the most recently used
    cache.put("c", value)
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    key = embedding_key(image_sha256="ab" * 32, sam_variant="vit_b", weights_id="random-0")
    assert key == f"sam-embedding/vit_b/random-0/{'ab' * 32}"
    with pytest.raises(ValueError, match="weights_id"):
        embedding_key(image_sha256="ab", sam_variant="vit_b", weights_id="a/b")
    pixels = np.arange(24, dtype=np.uint8)
    assert image_sha256(pixels.reshape(2, 4, 3)) != image_sha256(pixels.reshape(4, 2, 3))
    assert image_sha256(pixels.reshape(2, 4, 3)) == image_sha256(pixels.copy().reshape(2, 4, 3))


def test_embedding_cache_skips_encoder_on_second_prompt(
    labeler: GroundedSamLabeler, images: list[np.ndarray]
) -> None:
    cache = InMemoryEmbeddingCache()
    cached = labeler.with_options(embedding_cache=cache)
    counter = _CallCounter(labeler.sam.image_encoder)
    two = images[1:]
    try:
        first = [cached.label(image, "dog") for image in two]
        assert counter.calls == len(two) and len(cache) == len(two) and cache.hits == 0
        second = [cached.label(image, "bicycle") for image in two]
        assert counter.calls == len(two)  # the image encoder did not run again
        assert cache.hits == len(two)
        again = cached.label(two[0], "dog")
        assert counter.calls == len(two) and cache.hits == len(two) + 1
    finally:
        counter.remove()
    # an embedding from the cache gives the same masks as a freshly computed one
    assert np.array_equal(first[0].instance_masks, again.instance_masks)
    assert np.array_equal(first[0].boxes, again.boxes)
    assert all(r.num_instances for r in second)
    key = cached.embedding_cache_key(image_sha256(images[1]))
    assert key in cache and cache.get(key).shape == (1, 256, 64, 64)
    assert "tiny" in key and "random-0" in key


def test_label_many_joint_caption_paths_and_prefetch(
    labeler: GroundedSamLabeler, images: list[np.ndarray], tmp_path: Path
) -> None:
    import cv2

    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    sources = [paths[0], lambda: images[1]]
    results = list(labeler.label_many(sources, ["car", "bicycle"], prefetch=1))
    assert len(results) == 2
    for image, result in zip(images[:2], results, strict=True):
        assert list(result) == ["car", "bicycle"]
        direct = labeler.label_prompts(image, ["car", "bicycle"])
        for prompt in ("car", "bicycle"):
            _check_record(result[prompt], image, labeler)
            assert result[prompt].extra["caption"] == "car . bicycle ."
            assert np.array_equal(result[prompt].boxes, direct[prompt].boxes)
            assert np.array_equal(result[prompt].mask, direct[prompt].mask)
            assert all(set(p.split()) <= {"car", "bicycle"} for p in result[prompt].phrases)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list(labeler.label_many([images[0], tmp_path / "missing.png"], ["car"]))


def test_parse_dtype() -> None:
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) is None and parse_dtype("fp32", cpu) is None
    assert (
        parse_dtype("bf16", cpu) == "bfloat16" and parse_dtype("float16", torch.device("cuda")) == "float16"
    )
    with pytest.raises(ValueError, match="CUDA"):
        parse_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="dtype must be"):
        parse_dtype("int8", cpu)


def test_bfloat16_autocast_sam_decoder_on_cpu(labeler: GroundedSamLabeler, images: list[np.ndarray]) -> None:
    """The autocast path (meant for bf16/fp16 on GPU; no GPU here) for SAM's decoder, fed from the cache.

    bf16 on this AVX2 CPU is emulated (tiny SAM encoder 22 s, GroundingDINO 5.7 s vs 0.2 s / 1.1 s in fp32),
    so the test stores an embedding under the bf16 key and runs only the decoder under autocast.
    """
    image = images[1]
    labeler.set_image(image)  # float32 embedding (fixture cache or encoder)
    assert labeler.features is not None
    features = labeler.features["image_embed"].clone()
    box = torch.tensor([[20.0, 30.0, 150.0, 260.0]])
    fp32_logits, _ = labeler.segment_boxes(box)
    cache = InMemoryEmbeddingCache()
    bf16 = labeler.with_options(dtype="bf16", embedding_cache=cache)
    key = bf16.embedding_cache_key(image_sha256(image))
    assert "@bfloat16" in key and key != labeler.embedding_cache_key(image_sha256(image))
    cache.put(key, features)
    assert bf16.set_image(image) is True
    logits, _ = bf16.segment_boxes(box)
    assert logits.dtype == torch.float32 and logits.shape == (1, 1, 256, 256) and torch.isfinite(logits).all()
    agree = ((logits > 0) == (fp32_logits > 0)).float().mean()
    assert agree > 0.95, float(agree)
    assert bf16.settings()["dtype"] == "bfloat16" and labeler.settings()["dtype"] == "float32"


def test_no_detection_skips_sam(
    labeler: GroundedSamLabeler, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "phrases": []}
    monkeypatch.setattr(labeler, "detect", lambda image, prompts: [dict(empty) for _ in prompts])
    counter = _CallCounter(labeler.sam.image_encoder)
    try:
        record = labeler.label(images[1], "car")
    finally:
        counter.remove()
    assert counter.calls == 0
    assert record.num_instances == 0 and record.mask.shape == images[1].shape[:2] and not record.mask.any()
