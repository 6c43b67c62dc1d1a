"""`addclass review export|import` (tasks/review.py): the worst labels out as COCO, corrections back as provenance 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from common.errors import InputError
from storage.pseudo import pseudo_runs, read_pseudo_mask, read_pseudo_record, write_pseudo_result
from storage.registry import IGNORE_INDEX, PROV_PRECISE, PROV_REVIEWED
from storage.store import open_label_store
from tasks.merge import merge
from tasks.pseudo_label import LabelerConfig, pseudo_label
from tasks.review import export_review, import_review, rank_images, reviewed_labels

CAR = 7


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """6 synthetic scenes, simulated car pseudo labels on train/val merged into v2."""
    from tasks.ingest import ingest_synthetic

    path = tmp_path / "s.zarr"
    ingest_synthetic(path, images=6, size=(64, 80), seed=4, progress=False)
    for split in ("train", "val"):
        pseudo_label(path, prompt="car", split=split, labeler=LabelerConfig(kind="simulated"), progress=False)
    merge(path, classes="car", parent="v1", allow_partial=True, progress=False)
    return path


def test_the_rule_changes_only_the_class_within_others() -> None:
    precise = np.array([[0, 0, 0, 2, IGNORE_INDEX]], np.uint8)
    parent = np.array([[CAR, CAR, 0, 2, IGNORE_INDEX]], np.uint8)
    prov = np.array([[1, 1, 0, 0, 255]], np.uint8)
    reviewed = np.array([[True, False, True, True, True]])
    labels, provenance = reviewed_labels(precise, parent, prov, reviewed, CAR)
    assert labels.tolist() == [[CAR, 0, CAR, 2, IGNORE_INDEX]]  # kept, removed, added; precise and ignore kept
    assert provenance.tolist() == [[PROV_REVIEWED, PROV_PRECISE, PROV_REVIEWED, 0, 255]]


def test_ranking_puts_the_known_worst_image_first(store: Path) -> None:
    st = open_label_store(store, mode="a")
    worst_id = st.image_ids("train")[1]
    # the labeler was least sure on one image: its lowest detection score is the lowest of all
    record = read_pseudo_record(st, "car", "train", worst_id)
    assert record["scores"] and min(record["scores"]) > 0.05
    record["scores"] = [0.05] + record["scores"][1:]
    write_pseudo_result(st, "car", "train", worst_id, mask=read_pseudo_mask(st, "car", "train", worst_id),
                        record=record, key=pseudo_runs(st)["car"]["settings_key"])
    by_score = rank_images(st, "car", version="v2", by="score")
    assert by_score[0] == ("train", worst_id, 0.05) and all(v > 0.05 for _, _, v in by_score[1:])
    labels = st.read_labels("train", worst_id, version="v2")

    def model(image: np.ndarray) -> np.ndarray:  # agrees with v2 everywhere but on one image, where it sees no car
        for split in ("train", "val"):
            for image_id in st.image_ids(split):
                if np.array_equal(st.read_image(split, image_id), image):
                    mask = st.read_labels(split, image_id, version="v2") == CAR
                    return np.zeros_like(mask) if image_id == worst_id else mask
        raise AssertionError("unknown image")

    assert (labels == CAR).any()
    ranked = rank_images(st, "car", version="v2", by="disagreement", predict_mask=model)
    assert ranked[0] == ("train", worst_id, 1.0) and all(v == 0.0 for _, _, v in ranked[1:])


def test_export_edit_import_changes_exactly_the_edited_pixels(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "review"
    manifest = export_review(store, "car", out, version="v2", top=2, by="score")
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["car"] and len(coco["images"]) == 2
    assert all((out / "images" / im["file_name"]).is_file() for im in coco["images"])
    st = open_label_store(store)
    # a reviewer: erases the first image's car and paints a block of car into the second image's others
    first, second = manifest["images"]
    v1_second = st.read_labels(second["split"], second["image_id"], version="v1")
    painted = st.read_labels(second["split"], second["image_id"], version="v2") == CAR
    painted[:8, :8] = True
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != first["coco_id"]]
    for a in coco["annotations"]:
        rle = mask_utils.encode(np.asfortranarray(painted.astype(np.uint8)))
        a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    (out / "annotations.json").write_text(json.dumps(coco))
    done = import_review(store, out)
    st.refresh()
    version = done["version"]
    assert (version, done["parent"], done["images"]) == ("v3", "v2", 2)
    assert st.versions()[version].policy == "reviewed"
    for split in st.splits():
        for image_id in st.image_ids(split):
            new, prov = st.read_labels_and_provenance(split, image_id, version=version)
            old, old_prov = st.read_labels_and_provenance(split, image_id, version="v2")
            if image_id == first["image_id"]:
                assert not (new == CAR).any() and (old == CAR).any()
                assert np.array_equal(new, np.where(old == CAR, 0, old))
            elif image_id == second["image_id"]:
                expected = np.where((v1_second == 0) & painted, CAR, old)
                assert np.array_equal(new, expected)
                assert np.array_equal(prov == PROV_REVIEWED, (v1_second == 0) & painted)
            else:
                assert np.array_equal(new, old) and np.array_equal(prov, old_prov)
    assert import_review(store, out)["existing"]  # the same file again: the same version
    from tasks.inspect import format_summary, summarize_store

    summary = summarize_store(store, max_images=None)
    car = summary["versions"][version]["class_provenance"]["car"]
    assert car["reviewed_share"] == pytest.approx(((v1_second == 0) & painted).sum() / car["pixels"], abs=1e-6)
    assert summary["versions"][version]["provenance_share"]["reviewed"] > 0
    assert f"car {100 * car['pseudo_share']:.1f}% (reviewed {100 * car['reviewed_share']:.1f}%)" in format_summary(
        summary)


@pytest.mark.parametrize(("edit", "message"), [
    ("unknown_image", "was not in this review export"),
    ("wrong_size", "is a mask of size"),
    ("unknown_label", "has label 'bus'; this review is of 'car'"),
    ("changed_image", "changed since the review export"),
])
def test_bad_corrections_are_named_and_nothing_is_published(store: Path, tmp_path: Path, edit: str,
                                                            message: str) -> None:
    out = tmp_path / "review"
    manifest = export_review(store, "car", out, version="v2", top=2)
    coco = json.loads((out / "annotations.json").read_text())
    if edit == "unknown_image":
        coco["images"][0]["file_name"] = "someone_else.png"
    elif edit == "wrong_size":
        coco["annotations"][0]["segmentation"]["size"] = [10, 10]
    elif edit == "unknown_label":
        coco["categories"][0]["name"] = "bus"
    else:
        st = open_label_store(store)
        entry = manifest["images"][0]
        path = st.image_path(st.image_record(entry["split"], entry["image_id"]))
        shutil.copyfile(path, tmp_path / "keep.png")
        path.write_bytes(path.read_bytes() + b"\0")  # the file changed after the export
    (out / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(InputError, match=message):
        import_review(store, out)
    st = open_label_store(store)
    assert list(st.versions()) == ["v1", "v2"] and not st.drafts()
