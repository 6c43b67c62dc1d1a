"""Tests for tasks/data/export.py: mmseg PNG layout, classes.json, images, COCO RLE JSON, non-empty folders."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from addclass.models.labelers.label_record import rle_decode
from addclass.storage.store import open_label_store
from addclass.tasks.data.export import export_coco_rle, export_mmseg
from addclass.tasks.labels.merge import merge
from tests.tasks.test_merge import CAR_T0, E0, T1, V0, I, add_pseudo, box, car_everywhere, make_tiny_store


@pytest.fixture()
def merged(tmp_path: Path) -> Path:
    """The tiny store with car merged into v2."""
    store = make_tiny_store(tmp_path / "tiny.zarr")
    car_everywhere(store)
    assert merge(store, classes="car", progress=False) == "v2"
    return store


def _png(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.dtype == np.uint8 and arr.ndim == 2
    return arr


def test_mmseg_layout_labels_classes_and_symlinks(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "mmseg"
    res = export_mmseg(merged, version="v2", out_dir=out)
    assert res["images"] == {"train": 2, "val": 1, "test": 1}
    assert res["num_classes"] == 8 and not res["remapped"]
    assert _png(out / "annotations/train/t0.png").tolist() == [[7, 7, 7, 2, 2, 2],
                                                               [7, 7, 7, 2, 2, 2],
                                                               [7, 1, 7, 7, I, 0],
                                                               [4, 4, 4, 4, 4, 4]]
    assert _png(out / "annotations/val/v0.png").tolist() == [[3, 3, 7, 7, 7, 0], [3, 3, 7, 7, 7, 0],
                                                             [0, 7, 7, 7, 5, 5], [0, 7, 7, 7, 5, 5]]
    assert np.array_equal(_png(out / "annotations/test/e0.png"), E0)
    st = open_label_store(merged)
    for split in st.splits():
        for rec in st.image_records(split):
            link = out / "images" / split / f"{rec.id}.png"
            assert link.is_symlink() and link.resolve() == Path(rec.path).resolve()
    doc = json.loads((out / "classes.json").read_text())
    assert doc["version"] == "v2" and doc["parent"] == "v1" and doc["ignore_index"] == 255
    assert doc["names"] == ["others", "human", "building", "vegetation", "ground", "sky", "water", "car"]
    assert [c["id"] for c in doc["classes"]] == list(range(8))
    assert doc["palette"][7] == [255, 128, 0] and doc["palette"][0] == [0, 0, 0]
    assert doc["classes"][7]["source"] == "pseudo" and doc["classes"][7]["prompt"] == "car"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_copy_images_and_latest(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "copied"
    res = export_mmseg(merged, version="latest", out_dir=out, copy_images=True)
    assert res["version"] == "v2"
    img = out / "images/train/t1.png"
    src = Path(open_label_store(merged).image_record("train", "t1").path)
    assert not img.is_symlink() and img.read_bytes() == src.read_bytes()
    assert _png(out / "annotations/train/t1.png").tolist() == [[7, 7, 7, 0, 0, 0]] * 3 + [[7, 7, 7, 0, 0, I]]


def test_non_empty_dir_is_refused_unless_overwrite(merged: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_mmseg(merged, version="v2", out_dir=out)
    with pytest.raises(FileExistsError, match="not empty"):
        export_coco_rle(merged, out_dir=out)
    with pytest.raises(FileExistsError, match="holds what no addclass export wrote"):  # only exports are replaced
        export_mmseg(merged, version="v1", out_dir=out, overwrite=True)
    assert (out / "keep.txt").read_text() == "x"
    done = tmp_path / "done"
    export_mmseg(merged, version="v2", out_dir=done)
    export_mmseg(merged, version="v1", out_dir=done, overwrite=True)
    assert np.array_equal(_png(done / "annotations/train/t1.png"), T1)  # v1: no car
    assert json.loads((done / "classes.json").read_text())["num_classes"] == 7
    empty = tmp_path / "empty"
    empty.mkdir()
    export_mmseg(merged, version="v2", out_dir=empty)  # an empty folder is fine
    assert (empty / "classes.json").is_file()
    with pytest.raises(KeyError, match="v7"):
        export_mmseg(merged, version="v7", out_dir=tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_overwrite_never_removes_a_store_or_files_the_export_did_not_write(merged: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    export_mmseg(merged, version="v2", out_dir=work)
    assert "classes.json" in json.loads((work / "export_manifest.json").read_text())["paths"]
    store = make_tiny_store(work / "store.zarr")  # a label store put next to the earlier export
    with pytest.raises(FileExistsError, match=r"holds what no addclass export wrote there \(store.zarr"):
        export_mmseg(merged, version="v2", out_dir=work, overwrite=True)
    assert open_label_store(store).versions()  # still there, intact
    for bad in (merged, merged / "exports", merged.parent):  # the store itself, inside it, or holding it
        with pytest.raises(FileExistsError, match="label store"):
            export_mmseg(merged, version="v2", out_dir=bad, overwrite=True)
    assert open_label_store(merged).versions()
    clean = tmp_path / "clean"
    export_coco_rle(merged, out_dir=clean)
    (clean / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_coco_rle(merged, out_dir=clean, overwrite=True)
    (clean / "notes.txt").unlink()
    export_coco_rle(merged, out_dir=clean, overwrite=True)  # an untouched export is replaced


def test_gap_in_class_ids_is_remapped_for_mmseg(tmp_path: Path) -> None:
    store = make_tiny_store(tmp_path / "tiny.zarr")
    car_everywhere(store)
    add_pseudo(store, "bicycle", "val", {"v0": [(box(2, 3, 0, 0), 0.9)]})
    assert merge(store, classes="car", parent="v1", progress=False) == "v2"  # car = 7
    assert merge(store, classes="bicycle", parent="v1", progress=False) == "v3"  # bicycle = 8, no car
    assert open_label_store(store).versions()["v3"].class_ids == (0, 1, 2, 3, 4, 5, 6, 8)
    out = tmp_path / "v3"
    assert export_mmseg(store, version="v3", out_dir=out)["remapped"]
    expected = V0.copy()
    expected[2:4, 0] = 7  # store id 8 -> export id 7
    assert np.array_equal(_png(out / "annotations/val/v0.png"), expected)
    doc = json.loads((out / "classes.json").read_text())
    assert doc["names"][7] == "bicycle" and doc["classes"][7]["store_id"] == 8 and doc["label_map"]["8"] == 7
    assert doc["palette"][7] == [255, 0, 255]  # the store colour of id 8 travels with the class


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_rle_per_split(merged: Path, tmp_path: Path) -> None:
    add_pseudo(merged, "bicycle", "train", {"t1": [(box(0, 1, 3, 5), 0.6)]})  # t0 not labelled for bicycle
    out = tmp_path / "coco"
    res = export_coco_rle(merged, classes=None, out_dir=out)
    assert res["classes"] == ["bicycle", "car"]
    assert res["splits"] == {"train": {"images": 1, "annotations": 2, "skipped": 1},
                             "val": {"images": 1, "annotations": 1, "skipped": 0}}
    assert sorted(p.name for p in out.iterdir()) == ["export_manifest.json", "instances_train.json", "instances_val.json"]

    car_only = export_coco_rle(merged, classes="car", out_dir=tmp_path / "car")
    assert car_only["splits"]["train"] == {"images": 2, "annotations": 2, "skipped": 0}
    doc = json.loads((tmp_path / "car/instances_train.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "car", "supercategory": "pseudo", "prompt": "car",
                                  "settings_key": doc["categories"][0]["settings_key"], "store_id": 7}]
    assert [im["addclass_id"] for im in doc["images"]] == ["t0", "t1"]
    assert doc["images"][0]["height"] == 4 and doc["images"][0]["width"] == 6
    assert Path(doc["images"][0]["file_name"]).is_file()
    a0 = doc["annotations"][0]
    assert a0["image_id"] == 1 and a0["category_id"] == 1 and a0["iscrowd"] == 0
    assert a0["score"] == pytest.approx(0.8)
    assert a0["bbox"] == [0.0, 0.0, 5.0, 3.0]  # cols 0..4, rows 0..2, as x y w h
    assert a0["area"] == 13
    seg = a0["segmentation"]
    assert seg["size"] == [4, 6] and all(isinstance(c, int) for c in seg["counts"])
    assert np.array_equal(rle_decode(seg), CAR_T0)  # the raw pseudo mask, not the carved label
    # column-major counts: cols 0-3 rows 0-2, then (2, 4): 0 zeros, 3 ones, 1 zero, ...
    assert seg["counts"] == [0, 3, 1, 3, 1, 3, 1, 3, 3, 1, 5]
    from pycocotools import mask as mask_utils

    coded = mask_utils.frPyObjects(seg, 4, 6)
    assert np.array_equal(mask_utils.decode(coded).astype(bool), CAR_T0)
    assert int(mask_utils.area(coded)) == 13


def test_coco_rle_unknown_class(merged: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Not pseudo-labelled.*bus"):
        export_coco_rle(merged, classes="bus", out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
