"""Tests for tasks/evaluation/evaluate.py: the four ground-truth rules on a hand-written store; a real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from addclass.models.hashing import file_sha256
from addclass.models.metrics import MetricAccumulator, binary_counts, class_vs_rest, metrics_from_counts
from addclass.storage.pseudo import record_pseudo_run, write_pseudo_result
from addclass.storage.registry import ImageRecord
from addclass.storage.store import build_label_store, open_label_store
from addclass.tasks.evaluation.evaluate import (
    all_classes_ground_truth,
    evaluate_model,
    evaluate_pseudo,
    fold_new_classes,
    score_prediction,
)
from addclass.tasks.evaluation.evaluation_report import write_evaluation_report
from addclass.tasks.evaluation.evaluation_results import ModelEvaluation, PseudoEvaluation
from addclass.tasks.labels.merge import merge, plan_merge
from addclass.tasks.labels.pseudo_label import settings_key

I = 255  # ignore
CAR = 7

# 6 x 8 label maps (v1) and car hand masks. Classes: 0 others, 2 building, 3 vegetation, 4 ground, 5 sky.
T0 = np.array([[5] * 8,
               [5] * 8,
               [0, 0, 0, 0, 2, 2, 2, 2],
               [0, 0, 0, 0, 2, 2, 2, 2],
               [4] * 8,
               [4] * 8], np.uint8)
V0 = np.array([[5] * 8,
               [3, 3, 0, 0, 0, 0, 3, 3],
               [3, 3, 0, 0, 0, 0, 3, 3],
               [4] * 8,
               [4] * 8,
               [4] * 8], np.uint8)
V1 = np.array([[5] * 8] * 3 + [[0] * 8] * 3, np.uint8)
E0 = np.array([[5] * 8,
               [2, 2, 2, 0, 0, 0, 0, 5],
               [2, 2, 2, 0, 0, 0, 0, 5],
               [2, 2, 2, 0, 0, 0, 0, 4],
               [4] * 8,
               [4] * 8], np.uint8)
E1 = np.array([[5] * 8,
               [5] * 8,
               [0, 0, 0, 0, 3, 3, 3, 3],
               [0, 0, 0, 0, 3, 3, 3, 3],
               [4] * 8,
               [4] * 8], np.uint8)
LABELS = {"train": {"t0": T0}, "val": {"v0": V0, "v1": V1}, "test": {"e0": E0, "e1": E1}}


def box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """uint8 0/1 mask of rows r0..r1, cols c0..c1 (inclusive) on the 6 x 8 grid."""
    m = np.zeros((6, 8), np.uint8)
    m[r0:r1 + 1, c0:c1 + 1] = 1
    return m


HAND_T0 = box(2, 3, 0, 1)
HAND_V0 = box(1, 2, 2, 4)
HAND_V0[1, 5] = I  # ignore on an "others" pixel
HAND_E0 = box(1, 3, 4, 6)  # 9 car pixels inside "others"
HAND_E0[1, 3] = I  # ignore on "others": ignored in the all-classes gt too
HAND_E0[2, 0] = I  # ignore on a building pixel: the building stays in the all-classes gt
HAND_E1 = box(2, 3, 1, 2)  # 4 car pixels
HAND = {"t0": HAND_T0, "v0": HAND_V0, "e0": HAND_E0, "e1": HAND_E1}  # v1 has no hand mask

PSEUDO = {"t0": box(2, 3, 0, 2), "v0": box(1, 2, 3, 5), "v1": box(4, 5, 0, 3)}
SPLIT_OF = {i: s for s, maps in LABELS.items() for i in maps}
COLOUR = {image_id: 20 * (k + 1) for k, image_id in enumerate(SPLIT_OF)}  # unique flat grey per image


def make_store(path: Path, *, id_gap: bool = False) -> Path:
    """The hand-written store, car pseudo labels on train and val, merged into v2 (classes 0..7).

    `id_gap`: an abandoned merge of "bus" first holds draft v2 and id 7, so car becomes id 8 of v3
    (ids 0..6 and 8; the model still predicts car as class index 7)."""
    files = path.parent / f"{path.name}-files"
    files.mkdir(parents=True, exist_ok=True)
    with build_label_store(path, name="tiny", source="test") as st:
        for split, maps in LABELS.items():
            recs = []
            for image_id, labels in maps.items():
                f = files / f"{image_id}.png"
                assert cv2.imwrite(str(f), np.full((6, 8, 3), COLOUR[image_id], np.uint8))
                st.write_precise_labels(split, image_id, labels)
                if image_id in HAND:
                    st.write_hand_mask("eval" if split == "test" else "reference", "car", split, image_id,
                                       HAND[image_id])
                recs.append(ImageRecord(id=image_id, path=str(f), sha256=file_sha256(f), height=6, width=8))
            st.write_image_records(split, recs)
    st = open_label_store(path, mode="a")
    for name in ("bus", "car") if id_gap else ("car",):
        key = settings_key({"name": "simulated", "class": name})
        for split in ("train", "val"):
            for image_id in LABELS[split]:
                write_pseudo_result(st, name, split, image_id, mask=PSEUDO[image_id], record={}, key=key)
            record_pseudo_run(st, name, prompt=name, labeler={"name": "simulated"}, key=key, split=split,
                              images=len(LABELS[split]), detections=len(LABELS[split]))
    if id_gap:
        assert plan_merge(path, classes="bus").spec["class_ids"] == {"bus": CAR}  # then abandoned
    assert merge(path, classes="car", progress=False) == ("v3" if id_gap else "v2")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("evaluate") / "tiny.zarr")


def gt_all(image_id: str) -> np.ndarray:
    """Rule 3 written out: v1 with the car hand mask carved in where v1 is others."""
    labels = LABELS[SPLIT_OF[image_id]][image_id]
    if image_id not in HAND:
        return labels.copy()
    gt = labels.copy()
    gt[(labels == 0) & (HAND[image_id] == 1)] = CAR
    gt[(labels == 0) & (HAND[image_id] == I)] = I
    return gt


def perfect(image_id: str) -> np.ndarray:
    return np.where(gt_all(image_id) == I, 0, gt_all(image_id)).astype(np.uint8)


# e0 with car predicted on three building pixels (none of them ignored in the hand mask).
E0_ERR_PIXELS = [(1, 0), (1, 1), (2, 1)]


def e0_with_error() -> np.ndarray:
    pred = perfect("e0")
    for y, x in E0_ERR_PIXELS:
        pred[y, x] = CAR
    return pred


class FakeModel:
    """Returns fixed label maps, looked up by the (unique, flat) colour of each image."""

    num_classes = 8

    def __init__(self, preds: dict[str, np.ndarray]) -> None:
        self.by_colour = {COLOUR[i]: p for i, p in preds.items()}
        self.calls: list[tuple[int, ...]] = []

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.float32 and images.shape[1] == 3  # B x 3 x H x W RGB 0..255
        self.calls.append(tuple(images.shape))
        preds = [self.by_colour[int(im[0, 0, 0])].astype(np.int64) for im in images]
        return torch.from_numpy(np.stack(preds))  # B x H x W


def all_perfect() -> dict[str, np.ndarray]:
    return {i: perfect(i) for i in SPLIT_OF}


# ---------------------------------------------------------------------------- the rules on arrays
def test_fold_and_compose_by_hand() -> None:
    pred = np.array([[0, 7, 2], [8, 255, 6]], np.int64)
    assert fold_new_classes(pred, 7).tolist() == [[0, 0, 2], [0, 255, 6]]
    v1 = np.array([[0, 0, 0, 2], [0, 0, I, 0]], np.uint8)
    car = np.array([[1, 1, I, 1], [0, 1, 1, I]], np.uint8)
    bike = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], np.uint8)
    # car on others -> 7; car on building stays 2; car 255 on others -> 255 (blocks bike); v1 ignore stays
    assert all_classes_ground_truth(v1, [(7, car)]).tolist() == [[7, 7, I, 2], [0, 7, I, I]]
    # classes carve in id order onto pixels still 0: car (7) wins where both are set
    assert all_classes_ground_truth(v1, [(7, car), (8, bike)]).tolist() == [[7, 7, I, 2], [8, 7, I, I]]


def test_score_prediction_without_hand_mask_has_no_new_class_or_all_score() -> None:
    res = score_prediction(V1, V1, {CAR: None}, num_precise=7, num_classes=8)
    assert res["counts"]["new_classes"] == {} and res["counts"]["all"] is None
    assert res["scores"]["precise"]["miou"] == 1.0


# ---------------------------------------------------------------------------- rules 1-3 through the store
def test_a_version_with_a_class_id_gap_scores_by_model_index(tmp_path: Path) -> None:
    path = make_store(tmp_path / "gap.zarr", id_gap=True)
    assert sorted(open_label_store(path).versions()["v3"].class_ids) == [0, 1, 2, 3, 4, 5, 6, 8]
    res = evaluate_model(path, model=FakeModel(all_perfect()), splits=("test",), progress=False).to_dict()
    assert res["label_version"] == "v3" and res["classes"][CAR] == {"id": 8, "name": "car", "source": "pseudo"}
    car = res["splits"]["test"]["new_classes"]["car"]
    assert (car["iou"], car["biou"], car["bf1"]) == (1.0, 1.0, 1.0)  # predicted index 7 is store id 8


def test_perfect_prediction_scores_one(store: Path) -> None:
    res = evaluate_model(store, model=FakeModel(all_perfect()), splits=("val", "test"), progress=False).to_dict()
    assert res["label_version"] == "v2" and res["num_precise"] == 7 and res["new_classes"] == ["car"]
    assert [c["name"] for c in res["classes"]][-1] == "car"
    for split in ("val", "test"):
        block = res["splits"][split]
        car = block["new_classes"]["car"]
        assert (car["iou"], car["biou"], car["bf1"]) == (1.0, 1.0, 1.0)
        assert block["precise"]["means"]["miou"] == 1.0
        assert block["precise"]["means"]["mbiou"] == 1.0
        assert block["precise"]["means"]["mbf1"] == 1.0
        assert block["all"]["means"]["miou"] == 1.0 and block["all"]["means"]["mbf1"] == 1.0
        assert block["all"]["per_class"][CAR]["iou"] == 1.0 and block["all"]["per_class"][CAR]["biou"] == 1.0
    # v1 (val) has no hand mask: the car and all-classes scores cover v0 only; the 7-class score both images
    val = res["splits"]["val"]
    assert val["num_images"] == 2 and val["precise"]["num_images"] == 2
    assert val["new_classes"]["car"]["num_images"] == 1 and val["all"]["num_images"] == 1
    assert val["new_classes"]["car"]["hand_mask_kind"] == ["reference"]
    assert res["splits"]["test"]["new_classes"]["car"]["hand_mask_kind"] == ["eval"]
    assert [e["id"] for e in val["per_image"]] == ["v0", "v1"]
    assert val["per_image"][1]["new_classes"] == {} and val["per_image"][1]["all"] is None
    json.dumps(res, allow_nan=False)


def test_car_on_building_counts_against_building(store: Path) -> None:
    preds = {**all_perfect(), "e0": e0_with_error()}
    res = evaluate_model(store, model=FakeModel(preds), splits=("test",), progress=False).to_dict()
    test = res["splits"]["test"]
    iou = {c["name"]: c["iou"] for c in test["precise"]["per_class"]}
    # 7 classes: the three car pixels fold to "others": building 6 of 9; others 20 gt px + 3 false px
    assert iou["building"] == pytest.approx(6 / 9, abs=1e-12)
    assert iou["others"] == pytest.approx(20 / 23, abs=1e-12)
    assert iou["sky"] == iou["ground"] == iou["vegetation"] == 1.0
    assert iou["human"] is None and iou["water"] is None  # absent classes
    assert test["precise"]["num_classes"] == 7
    # car vs rest: e0 9 gt px + 3 false px, e1 4 perfect px
    assert test["new_classes"]["car"]["iou"] == pytest.approx(13 / 16, abs=1e-12)
    # all classes: same car and building; others is perfect (the hand-mask ignore pixel is ignored)
    all_iou = {c["name"]: c["iou"] for c in test["all"]["per_class"]}
    assert all_iou["car"] == pytest.approx(13 / 16, abs=1e-12)
    assert all_iou["building"] == pytest.approx(6 / 9, abs=1e-12) and all_iou["others"] == 1.0
    per = {e["id"]: e for e in test["per_image"]}
    assert per["e0"]["new_classes"]["car"]["iou"] == pytest.approx(9 / 12, abs=1e-12)
    assert per["e1"]["new_classes"]["car"]["iou"] == 1.0

    # Every count equals an independent computation on hand-written arrays.
    e0_folded = E0.copy()
    for y, x in E0_ERR_PIXELS:
        e0_folded[y, x] = 0
    precise = MetricAccumulator(num_classes=7)
    precise.update(e0_folded, E0)
    precise.update(E1, E1)
    assert test["precise"]["counts"] == {k: v.tolist() for k, v in precise.counts.items()}
    car = MetricAccumulator(num_classes=2)
    car.add(binary_counts(e0_with_error() == CAR, HAND_E0))
    car.add(binary_counts(perfect("e1") == CAR, HAND_E1))
    assert test["new_classes"]["car"]["counts"] == {k: v.tolist() for k, v in car.counts.items()}
    full = MetricAccumulator(num_classes=8)
    full.update(e0_with_error(), gt_all("e0"))
    full.update(perfect("e1"), gt_all("e1"))
    assert test["all"]["counts"] == {k: v.tolist() for k, v in full.counts.items()}
    m = metrics_from_counts(full.counts)
    assert test["all"]["means"]["mbiou"] == pytest.approx(m["mbiou"])
    assert test["all"]["means"]["mbf1"] == pytest.approx(m["mbf1"])


def test_batches_by_size_and_max_images(store: Path) -> None:
    model = FakeModel(all_perfect())
    res = evaluate_model(store, model=model, splits=("val", "test"), batch_size=2, progress=False).to_dict()
    assert model.calls == [(2, 3, 6, 8), (2, 3, 6, 8)]  # one forward per split
    assert [e["id"] for e in res["splits"]["test"]["per_image"]] == ["e0", "e1"]
    model = FakeModel(all_perfect())
    res = evaluate_model(store, model=model, splits=("train", "test"), max_images=1, progress=False).to_dict()
    assert [(s, b["num_images"]) for s, b in res["splits"].items()] == [("train", 1), ("test", 1)]
    assert res["splits"]["train"]["new_classes"]["car"]["hand_mask_kind"] == ["reference"]


def test_model_for_another_class_set_is_refused(store: Path) -> None:
    model = FakeModel(all_perfect())
    model.num_classes = 7
    with pytest.raises(ValueError, match="predicts 7 classes"):
        evaluate_model(store, model=model, progress=False)
    # the same 7-class model is fine against v1 (no new class: precise score only)
    res = evaluate_model(store, model=model, label_version="v1", splits=("test",), progress=False).to_dict()
    assert res["new_classes"] == [] and res["splits"]["test"]["all"] is None
    assert res["splits"]["test"]["new_classes"] == {}


def test_prediction_png_written(store: Path, tmp_path: Path) -> None:
    evaluate_model(store, model=FakeModel({**all_perfect(), "e0": e0_with_error()}), splits=("test",),
                   progress=False, pred_dir=tmp_path / "pred")
    png = cv2.imread(str(tmp_path / "pred" / "test" / "e0.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and np.array_equal(png, e0_with_error())


# ---------------------------------------------------------------------------- rule 4
def test_pseudo_rows_equal_independent_metrics(store: Path) -> None:
    res = evaluate_pseudo(store).to_dict()
    car = res["classes"]["car"]
    assert sorted(car) == ["train", "val"]
    assert res["skipped"]["car"] == {"test": "no pseudo labels (2 hand masks)"}
    val = car["val"]
    # v0: pseudo rows 1-2 cols 3-5 vs hand rows 1-2 cols 2-4 with (1, 5) ignored: 4 / (5 + 6 - 4)
    assert val["iou"] == pytest.approx(4 / 7, abs=1e-12)
    assert (val["num_images"], val["num_pseudo"], val["num_hand_masks"]) == (1, 2, 1)  # v1 has no hand mask
    expected = binary_counts(PSEUDO["v0"], HAND_V0)
    assert val["counts"] == {k: v.tolist() for k, v in expected.items()}
    scores = class_vs_rest(metrics_from_counts(expected))
    assert (val["biou"], val["bf1"]) == pytest.approx((scores["biou"], scores["bf1"]))
    train = car["train"]
    assert train["iou"] == pytest.approx(4 / 6, abs=1e-12)  # 4 hand px, pseudo 6 px covering them
    assert train["counts"] == {k: v.tolist() for k, v in binary_counts(PSEUDO["t0"], HAND_T0).items()}
    assert train["per_image"] == [{"id": "t0", **{k: train[k] for k in ("iou", "biou", "bf1")}}]
    json.dumps(res, allow_nan=False)


def test_pred_dir_never_overwrites_what_addclass_did_not_write(store: Path, tmp_path: Path) -> None:
    model = FakeModel(all_perfect())
    pred = tmp_path / "pred"
    evaluate_model(store, model=model, progress=False, pred_dir=pred, splits=("val",))
    with pytest.raises(FileExistsError, match=r"pred/val/.*\.png exists .*--overwrite"):  # refused before any work
        evaluate_model(store, model=model, progress=False, pred_dir=pred, splits=("val",))
    evaluate_model(store, model=model, progress=False, pred_dir=pred, splits=("val",), overwrite=True)  # its own
    annotations = tmp_path / "annotations"  # e.g. a dataset's own label PNGs, named like the predictions
    first = pred.glob("val/*.png").__next__()
    (annotations / "val").mkdir(parents=True)
    (annotations / "val" / first.name).write_bytes(b"hand-made")
    with pytest.raises(FileExistsError, match="was not written by addclass"):
        evaluate_model(store, model=model, progress=False, pred_dir=annotations, splits=("val",), overwrite=True)
    assert (annotations / "val" / first.name).read_bytes() == b"hand-made"
    with pytest.raises(FileExistsError, match="label store"):
        evaluate_model(store, model=model, progress=False, pred_dir=store / "preds")


def test_typed_results_read_like_their_json_document_and_round_trip(store: Path) -> None:
    res = evaluate_model(store, model=FakeModel({**all_perfect(), "e0": e0_with_error()}), progress=False)
    doc = res.to_dict()
    test = res.split("test")
    car = test.new_classes["car"]
    assert (car.iou, car.biou, car.bf1) == tuple(doc["splits"]["test"]["new_classes"]["car"][k]
                                                 for k in ("iou", "biou", "bf1"))
    assert car.iou == pytest.approx(13 / 16) and car.class_id == 7 and car.hand_mask_kind == ["eval"]
    assert test.precise.miou == doc["splits"]["test"]["precise"]["means"]["miou"]
    assert ModelEvaluation.from_dict(json.loads(json.dumps(doc, allow_nan=False))) == res
    with pytest.raises(ValueError, match="'train' was not evaluated"):
        res.split("train")
    pseudo = evaluate_pseudo(store)
    assert PseudoEvaluation.from_dict(json.loads(json.dumps(pseudo.to_dict()))) == pseudo
    assert pseudo.classes["car"]["val"].scores.iou == pytest.approx(4 / 7)


# ---------------------------------------------------------------------------- report
def test_report_rows_and_overlays_from_saved_predictions(store: Path, tmp_path: Path) -> None:
    preds = {**all_perfect(), "e0": e0_with_error()}
    res = evaluate_model(store, model=FakeModel(preds), progress=False, pred_dir=tmp_path / "pred")
    paths = write_evaluation_report(
        tmp_path / "report", model_results=res, pseudo_results=evaluate_pseudo(store), k=2
    )
    md = paths["report.md"].read_text()
    for row in ("| car | Pseudo Label (train) | 66.67 |", "| car | Pseudo Label (val) | 57.14 |",
                "| car | Model (val) | 100.00 |", "| car | Model (test) | 81.25 |"):
        assert row in md
    assert md.index("Pseudo Label (val)") < md.index("Model (val)") < md.index("Model (test)")
    assert "No pseudo-label row for test (test: no pseudo labels (2 hand masks)). Evaluation masks never" in md
    assert "| building | Model (test) | 66.67 |" in md  # 7-class table
    assert "## All classes" in md
    overlays = sorted(k for k in paths if k.startswith("overlays/"))
    # per-image car IoU: e0 0.75, v0 1, e1 1 (ties keep split order; best takes the last of them first)
    assert overlays == [
        "overlays/car/best_01_e1.png", "overlays/car/worst_01_e0.png", "overlays/car/worst_02_v0.png"
    ]
    assert cv2.imread(str(paths["overlays/car/worst_01_e0.png"])).shape == (6, 3 * 8, 3)  # no pseudo on test
    assert cv2.imread(str(paths["overlays/car/worst_02_v0.png"])).shape == (6, 4 * 8, 3)  # + pseudo panel
    assert "worst `test/e0`, IoU 75.00 %" in md and "](overlays/car/worst_01_e0.png)" in md
    doc = json.loads(paths["metrics.json"].read_text())
    assert doc["overlays"]["car"] == {
        "worst": ["overlays/car/worst_01_e0.png", "overlays/car/worst_02_v0.png"],
        "best": ["overlays/car/best_01_e1.png"],
    }
    assert doc["model"]["splits"]["test"]["new_classes"]["car"]["iou"] == pytest.approx(13 / 16)


# ---------------------------------------------------------------------------- a real tiny checkpoint
def test_real_tiny_checkpoint_end_to_end(tmp_path: Path) -> None:
    from addclass.models.build import build_massformer_tiny
    from addclass.tasks.data.ingest import ingest_synthetic
    from addclass.tasks.model_files.model_folder import FORMAT, FORMAT_VERSION, save_model_dir

    path = ingest_synthetic(tmp_path / "syn.zarr", images=5, size=(64, 80), seed=1, progress=False)
    st = open_label_store(path, mode="a")
    key = settings_key({"name": "simulated"})
    for split in ("train", "val"):
        for image_id in st.image_ids(split):
            hand = st.read_hand_mask("reference", "car", image_id)
            mask = cv2.dilate(hand, np.ones((3, 3), np.uint8))  # a slightly too large pseudo label
            write_pseudo_result(st, "car", split, image_id, mask=mask, record={}, key=key)
        record_pseudo_run(st, "car", prompt="car", labeler={"name": "simulated"}, key=key, split=split,
                          images=len(st.image_ids(split)), detections=0)
    assert merge(path, classes="car", progress=False) == "v2"

    torch.manual_seed(0)
    model = build_massformer_tiny(num_classes=8).eval()
    names = [c.name for c in open_label_store(path).classes()]
    ckpt = save_model_dir(tmp_path / "run" / "final", model=model, step=0, config={
        "format": FORMAT, "format_version": FORMAT_VERSION, "variant": "tiny", "pixel_decoder": "hr",
        "num_classes": 8, "class_names": names, "label_version": "v2",
    })
    # a run folder resolves to its final/ (tasks.model_folder.resolve_model_dir); no pred_dir, as in the flow
    res = evaluate_model(path, tmp_path / "run", splits=("val", "test"), progress=False)
    assert res.label_version == "v2" and res.split("test").precise.num_images == 1
    test = res.split("test")  # one image: its own scores are the split's
    assert test.per_image[0]["precise"]["miou"] == pytest.approx(test.precise.miou)
    v1 = st.read_labels("test", test.per_image[0]["id"])
    assert sum(test.precise.counts["area_label"]) == int((v1 != I).sum())
    assert ModelEvaluation.from_dict(json.loads(json.dumps(res.to_dict()))) == res  # metrics.json reads back

    pseudo = evaluate_pseudo(path)
    paths = write_evaluation_report(tmp_path / "report", model_results=res, pseudo_results=pseudo)
    assert all(p.is_file() for p in paths.values())
    doc = json.loads(paths["metrics.json"].read_text())
    assert doc["model"]["checkpoint"] == str(tmp_path / "run")
    assert doc["pseudo"]["classes"]["car"]["val"]["num_images"] == 1
    md = paths["report.md"].read_text()
    for row in ("Pseudo Label (train)", "Pseudo Label (val)", "Model (val)", "Model (test)"):
        assert f"| car | {row} |" in md
    pngs = [p for k, p in paths.items() if k.startswith("overlays/car/")]
    assert pngs, md  # re-predicted from the checkpoint (evaluate_model ran without pred_dir)
    for p in pngs:
        img = cv2.imread(str(p))
        split = "val" if p.stem.split("_", 2)[-1] in st.image_ids("val") else "test"
        assert img.shape == (64, (4 if split == "val" else 3) * 80, 3)  # image | pred | gt (| pseudo on val)
    with pytest.raises(ValueError, match="predicts 8 classes but label version 'v1'"):
        evaluate_model(path, ckpt, label_version="v1", progress=False)
