"""Tests for tasks/evaluation/report.py: number formats, tables and overlays."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from addclass.tasks.evaluation.report import (
    FALSE_BOUNDARY_COLOR,
    MISSED_BOUNDARY_COLOR,
    format_fraction,
    format_percent,
    overlay_image,
    per_class_table,
    select_images,
    summary_table,
    write_overlays,
)


def _result(miou: float | None, mbiou: float, mbf1: float, per_class: list[tuple[float | None, ...]]) -> dict:
    names = ["others", "car"]
    return {
        "num_images": 3,
        "means": {"miou": miou, "mbiou": mbiou, "mbf1": mbf1, "aAcc": 0.9},
        "per_class": [
            {"id": i, "name": names[i], "iou": v[0], "biou": v[1], "bf1": v[2]}
            for i, v in enumerate(per_class)
        ],
    }


PSEUDO = _result(0.80123, 0.40004, 0.512345, [(0.9, 0.5, 0.6), (0.70246, 0.30008, 0.42449)])
MODEL = _result(0.88214, 0.48386, 0.55931, [(0.95, 0.6, 0.7), (None, math.nan, None)])


def test_number_formats() -> None:
    assert format_percent(0.88214) == "88.21"
    assert format_percent(0.48385) == "48.38"
    assert format_percent(1.0) == "100.00"
    assert format_fraction(0.55931) == "0.5593"
    assert format_fraction(0.0) == "0.0000"
    for missing in (None, math.nan):
        assert format_percent(missing) == "n/a"
        assert format_fraction(missing) == "n/a"


def test_summary_table() -> None:
    table = summary_table({"Pseudo Label": PSEUDO, "Model": MODEL})
    assert table.splitlines() == [
        "| Method | mIoU (%) | mBIoU (%) | mBF1 | aAcc (%) | Images |",
        "|---|---:|---:|---:|---:|---:|",
        "| Pseudo Label | 80.12 | 40.00 | 0.5123 | 90.00 | 3 |",
        "| Model | 88.21 | 48.39 | 0.5593 | 90.00 | 3 |",
    ]


def test_per_class_table_groups_methods_by_class() -> None:
    table = per_class_table({"Pseudo Label": PSEUDO, "Model": MODEL})
    assert table.splitlines()[2:] == [
        "| others | Pseudo Label | 90.00 | 50.00 | 0.6000 |",
        "| others | Model | 95.00 | 60.00 | 0.7000 |",
        "| car | Pseudo Label | 70.25 | 30.01 | 0.4245 |",
        "| car | Model | n/a | n/a | n/a |",
    ]
    only_car = per_class_table({"Pseudo Label": PSEUDO}, classes=["car"]).splitlines()[2:]
    assert only_car == ["| car | Pseudo Label | 70.25 | 30.01 | 0.4245 |"]
    assert per_class_table({"Model": MODEL}, classes=[0]).splitlines()[2:] == [
        "| others | Model | 95.00 | 60.00 | 0.7000 |"
    ]


def _shifted_pixel() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((9, 9), dtype=np.uint8)
    gt[4, 4] = 1  # boundary points (3,3), (3,4), (4,3), (4,4)
    pred = np.zeros_like(gt)
    pred[4, 7] = 1  # 3 px to the right: its far column (x = 7) and the gt's far column (x = 3) are errors
    return pred, gt


def test_overlay_highlights_boundary_errors() -> None:
    pred, gt = _shifted_pixel()
    palette = {1: (0, 0, 255)}
    out = overlay_image(None, pred, gt, palette=palette, num_classes=2, titles=False)
    assert out.shape == (9, 18, 3) and out.dtype == np.uint8
    pred_panel, gt_panel = out[:, :9], out[:, 9:]
    assert tuple(pred_panel[3, 7]) == FALSE_BOUNDARY_COLOR
    assert tuple(pred_panel[4, 7]) == FALSE_BOUNDARY_COLOR
    assert tuple(pred_panel[3, 3]) == MISSED_BOUNDARY_COLOR
    assert tuple(pred_panel[4, 3]) == MISSED_BOUNDARY_COLOR
    assert tuple(pred_panel[3, 6]) == (0, 0, 0)  # matched boundary: plain class colour
    assert tuple(pred_panel[0, 0]) == (0, 0, 0)
    assert tuple(gt_panel[4, 4]) == (0, 0, 255)
    assert tuple(gt_panel[3, 3]) == (0, 0, 0)  # errors are drawn on the prediction panel only


def test_overlay_with_image_pseudo_and_downscale() -> None:
    pred, gt = _shifted_pixel()
    image = np.full((9, 9, 3), 200, dtype=np.uint8)
    pseudo = gt.astype(bool)
    out = overlay_image(
        image, pred, gt, pseudo=pseudo, pseudo_class=1, num_classes=2, titles=False, alpha=0.5
    )
    assert out.shape == (9, 36, 3)
    assert tuple(out[0, 0]) == (200, 200, 200)  # image panel
    assert tuple(out[0, 27]) == (100, 100, 100)  # pseudo panel: class 0 (black) at 50 % over grey 200
    assert tuple(out[4, 27 + 4]) == (228, 100, 100)  # class 1 (255, 0, 0) at 50 % over 200 (rounded)
    small = overlay_image(image, pred, gt, num_classes=2, titles=True, max_width=3)
    assert small.shape == (3, 9, 3)
    # 1-px errors survive the 3x downscale (max-pooled).
    pred_small = small[:, 3:6]
    assert (np.all(pred_small == FALSE_BOUNDARY_COLOR, axis=-1)).any()
    assert (np.all(pred_small == MISSED_BOUNDARY_COLOR, axis=-1)).any()


def test_select_images() -> None:
    per_image = [
        {"name": "a", "miou": 0.5},
        {"name": "b", "miou": None},
        {"name": "c", "miou": 0.9},
        {"name": "d", "miou": 0.1},
        {"name": "e", "miou": 0.7},
    ]
    sel = select_images(per_image, k=2)
    assert [e["name"] for e in sel["worst"]] == ["d", "a"]
    assert [e["name"] for e in sel["best"]] == ["c", "e"]
    sel = select_images(per_image, k=3)  # only 4 scored images: disjoint, best gets the rest
    assert [e["name"] for e in sel["worst"]] == ["d", "a", "e"]
    assert [e["name"] for e in sel["best"]] == ["c"]


def test_write_overlays(tmp_path: Path) -> None:
    pred, gt = _shifted_pixel()

    def load(name: str) -> tuple[None, np.ndarray, np.ndarray, None]:
        return None, (pred if name == "bad.png" else gt), gt, None

    per_image = [{"name": "bad.png", "miou": 0.4}, {"name": "good.png", "miou": 1.0}]
    written = write_overlays(tmp_path / "overlays", per_image, load=load, k=1, num_classes=2)
    assert [p.name for p in written["worst"]] == ["worst_01_bad.png"]
    assert [p.name for p in written["best"]] == ["best_01_good.png"]
    bgr = cv2.imread(str(written["worst"][0]), cv2.IMREAD_UNCHANGED)
    assert bgr.shape == (9, 18, 3)
