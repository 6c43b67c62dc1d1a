from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from addclass.storage.store import open_label_store
from addclass.tasks.data.ingest import (
    CAMVID_TO_PRECISE,
    camvid_to_precise,
    ingest_camvid,
    ingest_mass13k,
    ingest_synthetic,
)
from addclass.tasks.data.inspect import render_overlay, summarize_store
from addclass.tasks.data.synthetic_scenes import make_scene
from tests.conftest import CAMVID, needs_camvid


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".trash-" in p.name]


def _mass13k(root: Path, n: int = 2, split: str = "train", size: tuple[int, int] = (40, 48), prefix: str = "img") -> Path:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        s = make_scene(height=size[0], width=size[1], seed=k)
        cv2.imwrite(str(root / "images" / split / f"{prefix}{k}.jpg"), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "annotations" / split / f"{prefix}{k}.png"), s.labels)
    return root


def test_synthetic_is_deterministic_and_complete(tmp_path: Path) -> None:
    a = ingest_synthetic(tmp_path / "a.zarr", images=5, size=(48, 64), seed=7, progress=False)
    b = ingest_synthetic(tmp_path / "b.zarr", images=5, size=(48, 64), seed=7, progress=False)
    sa, sb = open_label_store(a), open_label_store(b)
    assert {s: len(sa.image_ids(s)) for s in sa.splits()} == {"train": 3, "val": 1, "test": 1}
    for split in sa.splits():
        for i in sa.image_ids(split):
            assert np.array_equal(sa.read_labels(split, i), sb.read_labels(split, i))
            assert sa.image_record(split, i).sha256 == sb.image_record(split, i).sha256
    test_id = sa.image_ids("test")[0]
    car = sa.read_hand_mask("eval", "car", test_id)
    assert car.any() and (sa.read_labels("test", test_id)[car == 1] == 0).all()  # car hidden in "others"
    assert set(sa.hand_mask_sets("reference")["car"]) == {"train", "val"}
    assert "test" not in sa.hand_mask_sets("reference")["car"]  # eval masks never feed labelers
    c = ingest_synthetic(tmp_path / "c.zarr", images=5, size=(48, 64), seed=8, progress=False)
    sc = open_label_store(c)
    first = sc.image_ids("train")[0]
    assert not np.array_equal(sc.read_labels("train", first), sa.read_labels("train", sa.image_ids("train")[0]))


def test_mass13k_round_trip_and_inspect(tmp_path: Path) -> None:
    src = _mass13k(tmp_path / "m", n=3)
    _mass13k(src, n=1, split="test", prefix="t")
    out = ingest_mass13k(src, tmp_path / "m.zarr", progress=False)
    st = open_label_store(out)
    assert st.image_ids("train") == ["img0", "img1", "img2"]
    expected = cv2.imread(str(src / "annotations/train/img1.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(st.read_labels("train", "img1"), expected)
    assert st.image_path(st.image_record("train", "img1")) == (src / "images/train/img1.jpg").resolve()
    s = summarize_store(out)
    assert s["splits"] == {"train": 3, "test": 1}
    share = s["versions"]["v1"]["pixel_share"]
    total = np.bincount(np.concatenate([st.read_labels(sp, i).ravel() for sp in st.splits() for i in st.image_ids(sp)]),
                        minlength=7)
    assert share["sky"] == pytest.approx(total[5] / total.sum(), abs=1e-6)
    assert s["versions"]["v1"]["provenance_share"]["precise"] == pytest.approx(1.0)
    overlay = render_overlay(out, "img0", version="v1")
    assert overlay.shape == (40, 48 * 3, 3)


def test_an_annotation_without_an_image_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _mass13k(tmp_path / "m", n=2)
    cv2.imwrite(str(src / "annotations/train/lost.png"), np.zeros((40, 48), np.uint8))
    with caplog.at_level("WARNING", logger="addclass.tasks.data.ingest"):
        st = open_label_store(ingest_mass13k(src, tmp_path / "m.zarr", progress=False))
    assert st.image_ids("train") == ["img0", "img1"]
    assert "1 annotations in" in caplog.text and "lost.png" in caplog.text


def test_mass13k_palette_labels_and_the_released_layout(tmp_path: Path) -> None:
    """Palette PNGs give their indices (as mmseg reads them); train/val images come from images_pad/ as in the
    released dataset (test from images/)."""
    from PIL import Image

    src = _mass13k(tmp_path / "m", n=2)
    _mass13k(src, n=1, split="test", prefix="t")
    (src / "images").rename(src / "images_pad")
    (src / "images").mkdir()
    (src / "images_pad" / "test").rename(src / "images" / "test")
    grey = cv2.imread(str(src / "annotations/train/img1.png"), cv2.IMREAD_UNCHANGED)
    palette = Image.fromarray(grey, mode="L").convert("P")
    palette.putpalette([v for c in range(256) for v in ((c * 37) % 256, (c * 91) % 256, (c * 53) % 256)])
    palette.save(src / "annotations/train/img1.png")
    assert cv2.imread(str(src / "annotations/train/img1.png"), cv2.IMREAD_UNCHANGED).ndim == 3  # OpenCV: colours
    st = open_label_store(ingest_mass13k(src, tmp_path / "m.zarr", progress=False))
    assert np.array_equal(st.read_labels("train", "img1"), grey)
    assert st.image_path(st.image_record("train", "img0")) == (src / "images_pad/train/img0.jpg").resolve()
    assert st.image_ids("test") == ["t0"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_annotation", "Missing annotation .*img1.png"),
        ("corrupt_image", "Cannot decode image .*img1.jpg"),
        ("size_mismatch", "img1.png.*differs from image"),
        ("bad_values", r"img1.png.*values \[9\]"),
        ("duplicate_id", "Duplicate image id 'img1'"),
        ("rgb_label", "img1.png.*3 channels"),
        ("sixteen_bit_label", "img1.png.*expected 8-bit labels"),
        ("truncated_label", "Cannot decode annotation .*img1.png"),
        ("truncated_jpeg", "img1.jpg.*cut short"),
        ("looping_val", "images/val is a broken or looping symbolic link"),
        ("empty_split", "Empty split"),
    ],
)
def test_bad_mass13k_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, breakage: str, message: str) -> None:
    src = _mass13k(tmp_path / "m", n=3)
    img1, ann1 = src / "images/train/img1.jpg", src / "annotations/train/img1.png"
    if breakage == "missing_annotation":
        ann1.unlink()
    elif breakage == "corrupt_image":
        img1.write_bytes(b"not a jpeg at all")
    elif breakage == "size_mismatch":
        cv2.imwrite(str(ann1), np.zeros((10, 10), np.uint8))
    elif breakage == "bad_values":
        lab = cv2.imread(str(ann1), cv2.IMREAD_UNCHANGED)
        lab[0, 0] = 9
        cv2.imwrite(str(ann1), lab)
    elif breakage == "duplicate_id":
        cv2.imwrite(str(src / "images/train/img1.png"), np.zeros((40, 48, 3), np.uint8))
    elif breakage == "rgb_label":
        cv2.imwrite(str(ann1), np.zeros((40, 48, 3), np.uint8))
    elif breakage == "sixteen_bit_label":
        cv2.imwrite(str(ann1), np.zeros((40, 48), np.uint16))
    elif breakage == "truncated_label":
        ann1.write_bytes(ann1.read_bytes()[:40])
    elif breakage == "truncated_jpeg":
        img1.write_bytes(img1.read_bytes()[: img1.stat().st_size // 2])
    elif breakage == "looping_val":
        (src / "images" / "val").symlink_to("val")
    elif breakage == "empty_split":
        (src / "images/val").mkdir()
        (src / "annotations/val").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ingest_mass13k(src, out / "m.zarr", progress=False)
    assert list(out.iterdir()) == []  # no half store, no temporary folder


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    path = ingest_synthetic(tmp_path / "s.zarr", images=3, size=(40, 40), seed=1, progress=False)
    before = open_label_store(path).info["created"]
    with pytest.raises(FileExistsError, match="overwrite"):
        ingest_synthetic(path, images=3, size=(40, 40), seed=2, progress=False)
    assert open_label_store(path).info["name"] == "synthetic-seed1" and open_label_store(path).info["created"] == before
    ingest_synthetic(path, images=3, size=(40, 40), seed=2, overwrite=True, progress=False)
    assert open_label_store(path).info["name"] == "synthetic-seed2"
    _no_leftovers(tmp_path)


def test_overwrite_replaces_only_a_label_store_and_never_its_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = _mass13k(data / "mass13k")
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not an addclass label store"):
        ingest_mass13k(src, data, overwrite=True, progress=False)  # a typo: the parent folder as the store
    assert (data / "notes.txt").read_text() == "keep me" and (src / "images" / "train").is_dir()
    store = ingest_mass13k(src, data / "m.zarr", progress=False)
    inside = _mass13k(store / "inbox")  # a source kept inside the store it would replace
    with pytest.raises(ValueError, match="is inside .*m.zarr"):
        ingest_mass13k(inside, store, overwrite=True, progress=False)
    assert (inside / "images" / "train").is_dir() and open_label_store(store).splits() == ["train"]


def test_camvid_mapping() -> None:
    raw = np.arange(12, dtype=np.uint8).reshape(3, 4)
    precise, car = camvid_to_precise(raw)
    # Sky->sky 5, Building->2, Pole->0, Road/Pavement->4, Tree->3, Sign/Fence/Car->0, Ped/Bicyclist->1, Unl.->255
    assert precise.ravel().tolist() == [5, 2, 0, 4, 4, 3, 0, 0, 0, 1, 1, 255]
    assert car.ravel().tolist() == [0] * 8 + [1, 0, 0, 255]
    assert CAMVID_TO_PRECISE.dtype == np.uint8


@needs_camvid
def test_camvid_ingest_hides_car_in_others(tmp_path: Path) -> None:
    st = open_label_store(ingest_camvid(CAMVID, tmp_path / "cv.zarr", progress=False))
    assert {s: len(st.image_ids(s)) for s in st.splits()} == {"train": 81, "val": 20, "test": 40}
    test_id = st.image_ids("test")[0]
    raw = cv2.imread(str(CAMVID / "testannot" / f"{test_id}.png"), cv2.IMREAD_UNCHANGED)
    car = st.read_hand_mask("eval", "car", test_id)
    assert np.array_equal(car == 1, raw == 8) and (raw == 8).any()
    assert (st.read_labels("test", test_id)[raw == 8] == 0).all()
    assert st.hand_mask_ids("reference", "car", "val") == st.image_ids("val")
    # the val split is the tail of the train sequence: no frame is in two splits
    assert not set(st.image_ids("train")) & set(st.image_ids("val"))
