"""bench/camvid_confusion.py: car shares and the classes under false-positive car pixels."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from addclass.storage.store import open_label_store
from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location("camvid_confusion", REPO / "bench" / "camvid_confusion.py")
assert _SPEC is not None and _SPEC.loader is not None
confusion = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("camvid_confusion", confusion)
_SPEC.loader.exec_module(confusion)

CAR = 7


@pytest.mark.parametrize("split", ["val", "test"])
def test_car_everywhere_and_car_exactly(synthetic_store: Path, split: str) -> None:
    st = open_label_store(synthetic_store)
    kind = "eval" if split == "test" else "reference"
    ids = st.hand_mask_ids(kind, "car", split)
    hands = {i: st.read_hand_mask(kind, "car", i) for i in ids}
    v1 = np.concatenate([st.read_labels(split, i)[hands[i] != 255].ravel() for i in ids])
    car = np.concatenate([(hands[i] == 1)[hands[i] != 255].ravel() for i in ids])

    everywhere = confusion.car_confusion(st, lambda im: np.full(im.shape[:2], CAR, np.uint8), split, car_id=CAR)
    assert everywhere["images"] == len(ids) and everywhere["pred_car_share"] == 1.0
    assert everywhere["gt_car_share"] == pytest.approx(car.mean()) and everywhere["recall"] == 1.0
    assert everywhere["precision"] == pytest.approx(car.mean())
    names = {c.id: c.name for c in st.classes()}
    fp = v1[~car]
    expected = {names[k]: round(float((fp == k).mean()), 4) for k in np.unique(fp)}
    assert everywhere["false_positive_v1_classes"] == expected

    order = iter(ids)  # images come in store order: predict each image's own hand mask
    exact = confusion.car_confusion(
        st, lambda im: np.where(hands[next(order)] == 1, CAR, 0).astype(np.uint8), split, car_id=CAR)
    assert exact["recall"] == exact["precision"] == 1.0 and exact["false_positive_v1_classes"] == {}
