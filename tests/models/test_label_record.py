"""LabelRecord validation and COCO RLE helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from addclass.models.labelers.label_record import LabelRecord, rle_decode, rle_encode


def test_rle_encode_known_values() -> None:
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)
    # column-major: col0 = 0,0 ; col1 = 1,1 ; col2 = 1,0  ->  0 0 1 1 1 0
    assert rle_encode(mask) == {"size": [2, 3], "counts": [2, 3, 1]}
    full = np.ones((2, 2), dtype=bool)
    assert rle_encode(full) == {"size": [2, 2], "counts": [0, 4]}  # starts with an empty run of zeros
    assert rle_encode(np.zeros((3, 1), dtype=bool)) == {"size": [3, 1], "counts": [3]}


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 97), (0, 4)])
def test_rle_round_trip_and_pycocotools_agree(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    rle = rle_encode(mask)
    assert sum(rle["counts"]) == mask.size
    assert np.array_equal(rle_decode(rle), mask)
    if mask.size:
        # Our uncompressed RLE is what pycocotools understands ...
        compressed = mask_utils.frPyObjects(rle, *shape)
        assert np.array_equal(mask_utils.decode(compressed).astype(bool), mask)
        # ... and pycocotools' compressed RLE decodes through rle_decode.
        theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert np.array_equal(rle_decode({"size": theirs["size"], "counts": theirs["counts"].decode()}), mask)


def test_rle_decode_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="H \\* W"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})


def _record() -> LabelRecord:
    masks = np.zeros((2, 6, 8), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 2:5, 3:7] = True
    return LabelRecord.from_instances(
        instance_masks=masks,
        boxes=np.array([[1, 1, 4, 3], [3, 2, 7, 5]]),
        scores=np.array([0.9, 0.5]),
        phrases=["car", "car"],
        extra={"prompt": "car"},
    )


def test_from_instances_builds_union_and_dtypes() -> None:
    record = _record()
    assert record.mask.dtype == np.bool_ and record.mask.sum() == 6 + 12 - 1  # they overlap at (row 2, col 3)
    assert np.array_equal(record.mask, record.instance_masks[0] | record.instance_masks[1])
    assert record.boxes.dtype == np.float32 and record.scores.dtype == np.float32
    assert record.num_instances == 2 and record.size == (6, 8)


def test_to_dict_from_dict_json_round_trip() -> None:
    record = _record()
    data = json.loads(json.dumps(record.to_dict()))
    back = LabelRecord.from_dict(data)
    assert np.array_equal(back.instance_masks, record.instance_masks)
    assert np.array_equal(back.mask, record.mask)
    assert np.array_equal(back.boxes, record.boxes) and np.array_equal(back.scores, record.scores)
    assert back.phrases == record.phrases and back.extra == {"prompt": "car"}


def test_empty_record() -> None:
    record = LabelRecord.empty(height=4, width=5)
    assert record.num_instances == 0 and record.instance_masks.shape == (0, 4, 5)
    assert record.mask.shape == (4, 5) and not record.mask.any()
    assert LabelRecord.from_dict(record.to_dict()).instance_masks.shape == (0, 4, 5)


def test_validation_errors() -> None:
    good = _record()
    with pytest.raises(ValueError, match="mask must be H x W bool"):
        LabelRecord(good.mask.astype(np.uint8), good.instance_masks, good.boxes, good.scores, good.phrases)
    with pytest.raises(ValueError, match="instance_masks"):
        LabelRecord(good.mask, good.instance_masks[:, :3], good.boxes, good.scores, good.phrases)
    with pytest.raises(ValueError, match="boxes"):
        LabelRecord(good.mask, good.instance_masks, good.boxes.astype(np.float64), good.scores, good.phrases)
    with pytest.raises(ValueError, match="scores"):
        LabelRecord(good.mask, good.instance_masks, good.boxes, good.scores[:1], good.phrases)
    with pytest.raises(ValueError, match="phrases"):
        LabelRecord(good.mask, good.instance_masks, good.boxes, good.scores, ["car"])
