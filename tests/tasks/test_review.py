"""`addclass review export|import` (tasks/labels/review.py): the worst labels out as COCO, corrections back as provenance 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from addclass.common.errors import InputError
from addclass.storage.pseudo import pseudo_runs, read_pseudo_mask, read_pseudo_record, write_pseudo_result
from addclass.storage.registry import IGNORE_INDEX, PROV_PRECISE, PROV_REVIEWED
from addclass.storage.store import open_label_store
from addclass.tasks.labels.merge import merge
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
from addclass.tasks.labels.review import (
    boundary_band,
    boundary_uncertainty,
    export_review,
    import_review,
    rank_images,
    review_state,
    reviewed_labels,
)

CAR = 7


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """6 synthetic scenes, simulated car pseudo labels on train/val merged into v2."""
    from addclass.tasks.data.ingest import ingest_synthetic

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

    def model(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Agrees with v2 everywhere, sure of it, but on one image, where it sees no car."""
        for split in ("train", "val"):
            for image_id in st.image_ids(split):
                if np.array_equal(st.read_image(split, image_id), image):
                    mask = st.read_labels(split, image_id, version="v2") == CAR
                    mask = np.zeros_like(mask) if image_id == worst_id else mask
                    return mask, mask.astype(np.float32)
        raise AssertionError("unknown image")

    assert (labels == CAR).any()
    ranked = rank_images(st, "car", version="v2", by="disagreement", predict=model)
    assert ranked[0] == ("train", worst_id, 1.0) and all(v == 0.0 for _, _, v in ranked[1:])

    def unsure(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Agrees with v2's regions everywhere, but is 60 % sure of them on one image (certain elsewhere)."""
        mask, _ = model(image)
        if not mask.any() and (st.read_image("train", worst_id) == image).all():
            mask = labels == CAR
            return mask, np.where(mask, 0.6, 0.4).astype(np.float32)
        return mask, mask.astype(np.float32)

    ranked = rank_images(st, "car", version="v2", by="uncertainty", predict=unsure)
    assert ranked[0][:2] == ("train", worst_id) and ranked[0][2] == pytest.approx(0.8)
    assert all(v == 0.0 for _, _, v in ranked[1:])
    with pytest.raises(InputError, match="--by uncertainty needs a trained model"):
        rank_images(st, "car", version="v2", by="uncertainty")


def test_boundary_uncertainty_looks_at_the_band_along_the_label_edge() -> None:
    mask = np.zeros((30, 30), bool)
    mask[10:20, 10:20] = True
    band = boundary_band(mask)
    assert band.sum() == 14 * 14 - 6 * 6  # 2 px inside and 2 px outside the square's edge
    assert band[8, 8] and band[11, 11] and not band[7, 7] and not band[12, 12]
    unsure = np.where(band, 0.5, mask.astype(np.float32))  # 0.5 exactly on the band, certain elsewhere
    assert boundary_uncertainty(mask, unsure) == 1.0
    assert boundary_uncertainty(mask, mask.astype(np.float32)) == 0.0
    assert boundary_uncertainty(mask, np.where(band, 0.75, 0.5)) == pytest.approx(0.5)  # the band alone counts
    assert boundary_uncertainty(np.zeros((30, 30), bool), np.full((30, 30), 0.5)) == 0.0  # no edge to review


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
    from addclass.tasks.data.inspect import format_summary, summarize_store

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


def _ls_reviewer(out: Path, edits: dict[int, list[dict[str, object]] | None]) -> list[dict[str, object]]:
    """Label Studio's JSON export after a reviewer: task i gets an annotation with ``edits[i]`` as its result
    (None: a cancelled annotation; a task not in ``edits`` was never opened)."""
    tasks = json.loads((out / "tasks.json").read_text())
    exported = []
    for i, task in enumerate(tasks, start=1):
        row = {"id": 100 + i, "data": task["data"], "predictions": task["predictions"], "annotations": []}
        if i in edits:
            result = edits[i]
            row["annotations"] = [{"id": i, "result": result or [], "was_cancelled": result is None,
                                   "updated_at": "2026-12-03T10:00:00Z"}]
        exported.append(row)
    return exported


def _brush(mask: np.ndarray, label: str = "car") -> dict[str, object]:
    from label_studio_converter.brush import mask2rle

    h, w = mask.shape
    return {"id": "r1", "type": "brushlabels", "from_name": "label", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)],
                                            "brushlabels": [label]}}


def test_label_studio_round_trip_changes_exactly_the_reviewed_tasks(store: Path, tmp_path: Path) -> None:
    from label_studio_converter.brush import decode_rle

    out = tmp_path / "review_ls"
    manifest = export_review(store, "car", out, version="v2", top=3, fmt="labelstudio")
    assert manifest["format"] == "labelstudio"
    tasks = json.loads((out / "tasks.json").read_text())
    assert '<Label value="car"' in (out / "labeling_config.xml").read_text() and len(tasks) == 3
    st = open_label_store(store)
    first, second, third = manifest["images"]
    for task, entry in zip(tasks, manifest["images"], strict=True):  # the pre-annotations are v2's masks
        assert task["data"]["image"].endswith(entry["file_name"]) and (out / "images" / entry["file_name"]).is_file()
        v2_car = st.read_labels(entry["split"], entry["image_id"], version="v2") == CAR
        result = task["predictions"][0]["result"]
        decoded = (decode_rle(result[0]["value"]["rle"]).reshape(*v2_car.shape, 4)[:, :, 3] > 0) if result else \
            np.zeros_like(v2_car)
        assert np.array_equal(decoded, v2_car)
    # the reviewer paints a block and a polygon (a rectangle over the top-left quarter, in % of the image) on
    # the first image, cancels the third, never opens the second
    h, w = first["height"], first["width"]
    painted = st.read_labels(first["split"], first["image_id"], version="v2") == CAR
    painted[-8:, -8:] = True
    polygon = {"id": "p1", "type": "polygonlabels", "original_width": w, "original_height": h,
               "value": {"points": [[0, 0], [25, 0], [25, 25], [0, 25]], "polygonlabels": ["car"]}}
    reviewed = painted.copy()
    reviewed[: h // 4 + 1, : w // 4 + 1] = True
    (out / "reviewed.json").write_text(json.dumps(_ls_reviewer(out, {1: [_brush(painted), polygon], 3: None})))
    done = import_review(store, out)
    st.refresh()
    assert (done["version"], done["images"]) == ("v3", 1)
    v1_first = st.read_labels(first["split"], first["image_id"], version="v1")
    for split in st.splits():
        for image_id in st.image_ids(split):
            new, prov = st.read_labels_and_provenance(split, image_id, version="v3")
            old, old_prov = st.read_labels_and_provenance(split, image_id, version="v2")
            if image_id == first["image_id"]:
                others = v1_first == 0
                expected = np.where(others & reviewed, CAR, np.where(others & (old == CAR), 0, old))
                assert np.array_equal(new, expected)
                assert np.array_equal(prov == PROV_REVIEWED, others & reviewed)
            else:  # second (not opened), third (cancelled) and the rest keep v2
                assert np.array_equal(new, old) and np.array_equal(prov, old_prov)


@pytest.mark.parametrize(("edit", "message"), [
    ("unknown_image", "is not an image of this review export"),
    ("wrong_size", "is a mask of 10x10"),
    ("unknown_label", "has label 'bus'; this review is of 'car'"),
    ("nothing_reviewed", "reviews no image of this export"),
])
def test_bad_label_studio_exports_are_named_and_nothing_is_published(store: Path, tmp_path: Path, edit: str,
                                                                     message: str) -> None:
    out = tmp_path / "review_ls"
    manifest = export_review(store, "car", out, version="v2", top=2, fmt="labelstudio")
    entry = manifest["images"][0]
    mask = np.zeros((entry["height"], entry["width"]), bool)
    mask[:4, :4] = True
    exported = _ls_reviewer(out, {1: [_brush(mask, "bus" if edit == "unknown_label" else "car")]})
    if edit == "unknown_image":
        exported[0]["data"] = {"image": "/data/upload/1/someone_else.png"}
    elif edit == "wrong_size":
        exported[0]["annotations"][0]["result"] = [_brush(np.ones((10, 10), bool))]
    elif edit == "nothing_reviewed":
        exported = _ls_reviewer(out, {})
    (out / "reviewed.json").write_text(json.dumps(exported))
    with pytest.raises(InputError, match=message):
        import_review(store, out)
    st = open_label_store(store)
    assert list(st.versions()) == ["v1", "v2"] and not st.drafts()


def test_review_state_follows_an_export_to_its_import_and_refuses_a_stranger_folder(store: Path,
                                                                                    tmp_path: Path) -> None:
    st = open_label_store(store)
    folder = tmp_path / "r"
    assert review_state(st, folder, class_name="car", version="v2") == "none"
    export_review(store, "car", folder, version="v2", top=1)
    assert review_state(st, folder, class_name="car", version="v2") == "exported"
    with pytest.raises(InputError, match="is not the review export of 'car' in v1"):  # another version's
        review_state(st, folder, class_name="car", version="v1")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not an export")
    with pytest.raises(InputError, match="mine exists and is not the review export of 'car' in v2"):
        review_state(st, other, class_name="car", version="v2")
    assert (other / "notes.txt").read_text() == "not an export"  # left alone
    assert import_review(store, folder)["version"] == "v3"
    st.refresh()
    assert review_state(st, folder, class_name="car", version="v2") == "v3"
