"""`addclass predict MODEL --into-store STORE` (tasks/prediction/predict_store.py): a model's predictions as a label version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from addclass.common.errors import InputError
from addclass.storage.registry import IGNORE_INDEX, PROV_PRECISE, PROV_PREDICTED, PROV_PSEUDO
from addclass.storage.store import open_label_store
from addclass.tasks.labels.merge import merge
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
from addclass.tasks.prediction.predict import PredictConfig, image_scores
from addclass.tasks.prediction.predict_store import SECTION, predict_into_store, predicted_labels
from addclass.tasks.training.train import TrainConfig, train

CAR = 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a store with simulated car pseudo labels merged into v2, a tiny model trained 2 steps on v2)."""
    from addclass.tasks.data.ingest import ingest_synthetic

    root = tmp_path_factory.mktemp("predict_store")
    store = root / "s.zarr"
    ingest_synthetic(store, images=5, size=(64, 80), seed=2, progress=False)
    for split in ("train", "val"):
        pseudo_label(store, prompt="car", split=split, labeler=LabelerConfig(kind="simulated"), progress=False)
    merge(store, classes="car", parent="v1", allow_partial=True, progress=False)
    cfg = TrainConfig(store=str(store), out_dir=str(root / "run"), version="v2", variant="tiny", iters=2,
                      batch_size=2, crop_size=(64, 64), num_points=64, num_workers=0, device="cpu", val_every=0)
    return store, train(cfg, progress=False)


def test_the_rule_carves_new_classes_into_others_only() -> None:
    precise = np.array([[0, 0, 3, IGNORE_INDEX]], np.uint8)
    prediction = np.array([[CAR, 4, CAR, CAR]], np.uint8)  # car on others, a precise class, car on sky, ignore
    labels, provenance = predicted_labels(precise, prediction, [CAR])
    assert labels.tolist() == [[CAR, 0, 3, IGNORE_INDEX]]
    assert provenance.tolist() == [[PROV_PREDICTED, PROV_PRECISE, PROV_PRECISE, IGNORE_INDEX]]


def test_a_predicted_version_holds_the_models_labels_and_keeps_every_precise_pixel(
    trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store_path, model_dir = trained
    import addclass.tasks.prediction.predict_store as ps

    # a model that predicts car on the left half: its new-class pixels are then known
    def left_half_car(model: object, image: np.ndarray, config: PredictConfig) -> object:
        import torch

        scores = torch.zeros(8, *image.shape[:2])
        scores[0] = 1.0
        scores[CAR, :, : image.shape[1] // 2] = 2.0
        return scores

    monkeypatch.setattr(ps, "image_scores", left_half_car)
    done = predict_into_store(model_dir, store_path, splits=["train"])
    st = open_label_store(store_path)
    version = done["version"]
    assert (version, done["parent"], done["splits"], done["images"]) == ("v3", "v2", ["train"], 3)
    info = st.versions()[version]
    assert info.parent == "v2" and info.policy == "predicted" and info.class_ids == st.versions()["v2"].class_ids
    spec = st.section(SECTION)[version]
    assert spec["model"] == str(model_dir.resolve()) and len(spec["weights_sha256"]) == 64
    for image_id in st.image_ids("train"):
        v1 = st.read_labels("train", image_id, version="v1")
        labels, provenance = st.read_labels_and_provenance("train", image_id, version=version)
        half = np.zeros(v1.shape, bool)
        half[:, : v1.shape[1] // 2] = True
        carved = half & (v1 == 0)
        assert np.array_equal(labels, np.where(carved, CAR, v1))  # precise pixels and ignore untouched
        assert np.array_equal(provenance == PROV_PREDICTED, carved)
        assert not (provenance == PROV_PSEUDO).any()  # v2's pseudo car pixels are the model's call now
    for split in ("val", "test"):  # the splits not predicted keep the parent's labels and provenance
        for image_id in st.image_ids(split):
            a = st.read_labels_and_provenance(split, image_id, version=version)
            b = st.read_labels_and_provenance(split, image_id, version="v2")
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    again = predict_into_store(model_dir, store_path, splits=["train"])
    assert again["existing"] and again["version"] == version and list(st.versions()) == ["v1", "v2", version]


def test_a_crash_mid_run_is_finished_by_the_same_command(trained: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store_path, model_dir = trained
    import addclass.tasks.prediction.predict_store as ps

    calls = {"n": 0}

    def crash_on_the_third(model: object, image: np.ndarray, config: PredictConfig) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill would: the draft stays unpublished
        return image_scores(model, image, config)  # type: ignore[arg-type]

    monkeypatch.setattr(ps, "image_scores", crash_on_the_third)
    config = PredictConfig(window=64)  # other settings than the test above: another version
    with pytest.raises(KeyboardInterrupt):
        predict_into_store(model_dir, store_path, config=config)
    st = open_label_store(store_path)
    [draft] = [v for v, d in st.drafts().items() if d["policy"] == "predicted"]
    assert draft not in st.versions()
    monkeypatch.setattr(ps, "image_scores", image_scores)
    done = predict_into_store(model_dir, store_path, config=config)
    assert done["version"] == draft and done["resumed"] == 2 and done["images"] == 5 - 2
    st.refresh()
    assert draft in st.versions() and not st.drafts()
    assert st.verify_version(draft) == []


def test_bad_inputs_are_named_before_anything_is_written(trained: tuple[Path, Path], tmp_path: Path) -> None:
    store_path, model_dir = trained
    before = json.dumps(open_label_store(store_path).info, sort_keys=True, default=str)
    with pytest.raises(InputError, match="Split 'valid' is not in"):
        predict_into_store(model_dir, store_path, splits=["valid"])
    from addclass.tasks.data.ingest import ingest_synthetic

    other = ingest_synthetic(tmp_path / "other.zarr", images=3, size=(64, 80), seed=0, progress=False)
    with pytest.raises(InputError, match="label version 'v2', which .* does not have"):
        predict_into_store(model_dir, other)
    assert json.dumps(open_label_store(store_path).info, sort_keys=True, default=str) == before
    assert list(open_label_store(other).versions()) == ["v1"] and not open_label_store(other).drafts()
