"""Tests for tasks/evaluation/evaluate_masks.py: folder scoring with hand-computed values and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from addclass.models.metrics import COUNT_KEYS
from addclass.tasks.evaluation.evaluate_masks import (
    evaluate_mask_folders,
    folder_loader,
    list_label_pngs,
    read_label_png,
)


def _write(folder: Path, name: str, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / name), labels)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    # a.png: gt all 0, prediction's top half is class 1.
    gt_a = np.zeros((4, 4), dtype=np.uint8)
    pred_a = gt_a.copy()
    pred_a[:2] = 1
    # b.png: a vertical straight edge, predicted exactly.
    gt_b = np.zeros((8, 8), dtype=np.uint8)
    gt_b[:, 4:] = 1
    _write(gt_dir, "a.png", gt_a)
    _write(pred_dir, "a.png", pred_a)
    _write(gt_dir, "b.png", gt_b)
    _write(pred_dir, "b.png", gt_b)
    return pred_dir, gt_dir


def test_scores_two_folders(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    res = evaluate_mask_folders(pred_dir, gt_dir, num_classes=2, class_names=["others", "human"])
    json.dumps(res, allow_nan=False)  # JSON-serialisable, no NaN
    assert res["num_images"] == 2
    # a: I [8, 0], U [16, 8]; b: I [32, 32], U [32, 32].
    assert res["counts"]["area_intersect"] == [40, 32]
    assert res["counts"]["area_union"] == [48, 40]
    # BIoU (d = 1): a: class 0 BI 6, BU 14 (gt frame 12, pred rows 2..3 all band 8), class 1 BU 8; b: 20 / 20.
    assert res["counts"]["biou_intersect"] == [26, 20]
    assert res["counts"]["biou_union"] == [34, 28]
    # BF1: a: 4 predicted boundary points per class, none in gt; b: 8 matched points per class.
    assert res["counts"]["bf_pred_total"] == [12, 12]
    assert res["counts"]["bf_pred_match"] == [8, 8]
    assert res["counts"]["bf_gt_total"] == [8, 8]
    assert res["counts"]["bf_gt_match"] == [8, 8]
    assert sorted(res["counts"]) == sorted(COUNT_KEYS)

    per_class = res["per_class"]
    assert [c["name"] for c in per_class] == ["others", "human"]
    assert per_class[0]["iou"] == pytest.approx(40 / 48)
    assert per_class[1]["iou"] == pytest.approx(32 / 40)
    assert per_class[0]["biou"] == pytest.approx(26 / 34)
    assert per_class[1]["biou"] == pytest.approx(20 / 28)
    assert per_class[0]["bf1"] == pytest.approx(0.8)  # P 2/3, R 1
    assert res["means"]["miou"] == pytest.approx((40 / 48 + 32 / 40) / 2)
    assert res["means"]["mbf1"] == pytest.approx(0.8)
    assert res["means"]["aAcc"] == pytest.approx(72 / 80)

    per_image = {e["name"]: e for e in res["per_image"]}
    assert per_image["a.png"]["miou"] == pytest.approx(0.25)  # (8/16 + 0/8) / 2
    assert per_image["a.png"]["mbf1"] == 0.0
    assert per_image["b.png"]["miou"] == 1.0
    assert (per_image["b.png"]["height"], per_image["b.png"]["width"]) == (8, 8)


def test_absent_class_is_null_in_json(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    res = evaluate_mask_folders(pred_dir, gt_dir, num_classes=3, progress=True)
    assert res["per_class"][2] == {
        "id": 2,
        "name": "class_2",
        "iou": None,
        "biou": None,
        "bf1": None,
        "acc": None,
        "bf_precision": None,
        "bf_recall": None,
    }
    assert res["means"]["miou"] == pytest.approx((40 / 48 + 32 / 40) / 2)  # NaN class excluded


def test_ignore_pixels_in_16_bit_pngs(tmp_path: Path) -> None:
    gt = np.zeros((4, 4), dtype=np.uint16)
    gt[:2, :2] = 255
    pred = np.ones((4, 4), dtype=np.uint16)
    pred[2:, :] = 0
    _write(tmp_path / "gt", "x.png", gt)
    _write(tmp_path / "pred", "x.png", pred)
    res = evaluate_mask_folders(tmp_path / "pred", tmp_path / "gt", num_classes=2)
    # 12 valid pixels, all gt 0; prediction 0 on the bottom 8.
    assert res["counts"]["area_intersect"] == [8, 0]
    assert res["counts"]["area_union"] == [12, 4]


def test_mismatched_names(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    (pred_dir / "b.png").rename(pred_dir / "c.png")
    with pytest.raises(ValueError, match=r"c\.png.*b\.png"):
        evaluate_mask_folders(pred_dir, gt_dir, num_classes=2)


def test_mismatched_sizes(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    _write(pred_dir, "b.png", np.zeros((8, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"'b\.png'.*8x9.*8x8"):
        evaluate_mask_folders(pred_dir, gt_dir, num_classes=2)


def test_colour_png_is_rejected(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    _write(pred_dir, "a.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a\.png.*single-channel"):
        evaluate_mask_folders(pred_dir, gt_dir, num_classes=2)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "gt", "a.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty.*no .png"):
        evaluate_mask_folders(tmp_path / "empty", tmp_path / "gt", num_classes=2)
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_mask_folders(tmp_path / "nope", tmp_path / "gt", num_classes=2)


def test_unreadable_png(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png"):
        read_label_png(tmp_path / "bad.png")


def test_listing_and_loader(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, gt_dir = folders
    (pred_dir / "notes.txt").write_text("ignored")
    assert list_label_pngs(pred_dir) == ["a.png", "b.png"]
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red in RGB
    assert cv2.imwrite(str(images / "a.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image, pred, gt, pseudo = folder_loader(pred_dir, gt_dir, image_dir=images)("a.png")
    assert image is not None and image.shape == (4, 4, 3) and abs(int(image[0, 0, 0]) - 200) <= 3
    assert pred[:2].tolist() == [[1] * 4] * 2 and gt.sum() == 0 and pseudo is None
    image_b, *_ = folder_loader(pred_dir, gt_dir, image_dir=images)("b.png")
    assert image_b is None
