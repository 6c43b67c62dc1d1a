"""The flows run in-process on Prefect's test harness (a temporary server and database, stopped at the end of
the module): the scheduled `retrain` (a challenger trained on the newest labels, promoted only if it beats the
champion; bad parameters fail before any work) and an add-class rerun after its merge."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    LogFilter,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.logging.handlers import APILogHandler
from prefect.testing.utilities import prefect_test_harness

from addclass.flows.add_class import add_class
from addclass.flows.params import LabelingParams, ReviewParams, TrainingParams
from addclass.flows.retrain import retrain
from addclass.storage.registry import ClassInfo
from addclass.storage.store import open_label_store
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.labels.review import import_review

TRAINING = TrainingParams(variant="tiny", iters=2, batch_size=2, crop_size=64, num_points=64, num_workers=0)
SMALL = {"training": TRAINING, "eval_splits": ["val"]}


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture()
def store(tmp_path: Path) -> str:
    return str(ingest_synthetic(tmp_path / "s.zarr", images=4, size=(64, 96), seed=3, progress=False))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"eval_splits": ["valid"]}, ValueError, "eval_splits: .*'valid'"),
        ({"version": "v9"}, KeyError, "v9"),
        ({"training": {"num_points": 0}}, ValueError, "num_points >= 1"),
        ({"training": {"crop_size": 32}}, ValueError, "training.crop_size: Input should be greater than or equal to 64"),
        ({"init_model": "champion"}, KeyError, "no champion model yet"),
    ],
)
def test_bad_parameters_fail_before_any_work(store: str, kwargs: dict, error: type[Exception],
                                             message: str) -> None:
    with pytest.raises(error, match=message):
        retrain.fn(store=store, **{**SMALL, **kwargs})
    assert open_label_store(store).section("models") == {} and not Path(f"{store}.runs").exists()


def test_challenger_is_registered_and_promoted_only_when_allowed(store: str) -> None:
    first = retrain(store=store, **SMALL)
    models = open_label_store(store).section("models")
    assert models["champion"] == first["registry"]["model_id"] == Path(first["checkpoint"]).parent.name
    assert first["registry"]["model_id"].startswith("v1-tiny-inverse-s0-i2-")  # version, recipe, config hash
    assert Path(first["report"]["report.md"]).is_file()
    second = retrain(store=store, **{**SMALL, "training": {**TRAINING.model_dump(), "seed": 1}}, promote="never",
                     init_model="champion")  # JSON, as a deployment run gets it
    models = open_label_store(store).section("models")
    assert second["registry"]["promoted"] is False and models["champion"] == first["registry"]["model_id"]
    assert set(models["models"]) == {first["registry"]["model_id"], second["registry"]["model_id"]}
    assert second["registry"]["model_id"].startswith("v1-tiny-inverse-s1-i2")  # a warm start from the champion


def test_retrain_trains_on_two_processes_under_torchrun(store: str) -> None:
    """`training.processes` 2: the train task launches torchrun (gloo on the CPU); Prefect sees one task whose logs
    carry rank 0's lines, and the progress artifact follows the run's log."""
    result = retrain(store=store, training={**TRAINING.model_dump(), "processes": 2}, eval_splits=["val"],
                     promote="never")
    run = Path(result["checkpoint"]).parent
    assert (run / "final" / "model.safetensors").is_file() and Path(result["report"]["report.md"]).is_file()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        trains = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-")))
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[t.id for t in trains])))
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"train-progress-{run.name}"])))
    text = "\n".join(log.message for log in logs)
    assert ("[rank 0] INFO addclass.tasks.training.train: data parallel: 2 processes x 1 images x 1 accumulation "
            "steps = batch 2") in text
    assert "train 2/2 (100 %)" in text  # the progress hook, fed from the run's log
    assert progress and max(progress, key=lambda a: a.created).data == 100.0  # its last version


def test_add_class_rerun_after_the_merge_trains_on_the_version_that_added_the_class(store: str) -> None:
    params = {**SMALL, "prompt": "car", "store": store, "labeling": LabelingParams(kind="simulated", batch_size=2)}
    environ = dict(os.environ)
    first = add_class(**params)  # on the harness's API: its mapped stages run on a local Dask cluster
    assert dict(os.environ) == environ  # the nannies' OMP_NUM_THREADS=1 etc. did not stay in this process
    assert first["version"] == "v2" and first["class"] == "car"
    check_what_the_ui_shows(Path(first["checkpoint"]).parent.name)
    st = open_label_store(store, mode="a")  # a later version on top (another class), as a later merge makes
    st.begin_version("v3", parent="v2", class_ids=[*range(8), 8], policy="test", spec={})
    for split in st.splits():
        for image_id in st.image_ids(split):
            labels, provenance = st.read_labels_and_provenance(split, image_id, version="v2")
            st.write_version_labels("v3", split, image_id, labels, provenance)
    st.publish_version("v3", new_classes=[ClassInfo(id=8, name="bus", source="pseudo", prompt="bus")])
    again = add_class(**params)  # e.g. after a crash during training: pseudo-label and merge are done
    assert again["version"] == "v2" and again["checkpoint"] == first["checkpoint"]  # its own run, resumed
    assert again["pseudo"] == [] and list(open_label_store(store).versions()) == ["v1", "v2", "v3"]
    # the evaluation kept its predictions (the rerun replaced its own files), for the overlays and evaluate-masks
    predictions = Path(again["report"]["report.md"]).parent / "predictions" / "val"
    ids = open_label_store(store).image_ids("val")
    assert sorted(p.stem for p in predictions.glob("*.png")) == sorted(ids)
    assert f"Predicted labels: `{predictions.parent}`" in Path(again["report"]["report.md"]).read_text()


def test_add_class_pauses_for_review_and_trains_on_the_reviewed_version(store: str, tmp_path: Path) -> None:
    folder = tmp_path / "review"
    params = {**SMALL, "prompt": "car", "store": store, "scale_out": "threads",
              "labeling": LabelingParams(kind="simulated", batch_size=2),
              "review": ReviewParams(top=2, out=str(folder))}
    first = add_class(**params)  # pseudo-label, merge, export for review, stop
    assert first["waiting_for_review"] and (first["version"], first["review"]) == ("v2", str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["class"], manifest["version"], len(manifest["images"])) == ("car", "v2", 2)
    assert not Path(f"{store}.runs").exists() and not open_label_store(store).section("models")  # no training
    exported_at = (folder / "manifest.json").stat().st_mtime_ns
    again = add_class(**params)  # not imported yet: still waiting, the export untouched
    assert again["waiting_for_review"] and (folder / "manifest.json").stat().st_mtime_ns == exported_at
    assert import_review(store, folder)["version"] == "v3"  # the reviewer's work (here: the masks unchanged)
    done = add_class(**params)
    assert not done.get("waiting_for_review") and done["version"] == "v3"
    assert json.loads((Path(done["checkpoint"]).parent / "train_config.json").read_text())["version"] == "v3"
    models = open_label_store(store).section("models")["models"]
    assert models[done["registry"]["model_id"]]["label_version"] == "v3"


def check_what_the_ui_shows(run_name: str) -> None:
    """The add-class run's artifacts, its train task's inputs (no subflow result: the UI draws them) and the
    training progress and validation scores in the train task's logs."""
    APILogHandler().flush()  # logs go to the API in batches
    with get_client(sync_client=True) as client:
        artifacts: dict[str, Any] = {
            a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=[f"add-class-car-{k}" for k in ("metrics", "report", "outputs", "registry")]
                + [f"train-progress-{run_name}"])))
        }
        trains = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-")))
        ids = LogFilterTaskRunId(any_=[t.id for t in trains])
        logs = client.read_logs(log_filter=LogFilter(task_run_id=ids))
    assert set(artifacts) == {"add-class-car-metrics", "add-class-car-report", "add-class-car-outputs",
                              "add-class-car-registry", f"train-progress-{run_name}"}
    assert artifacts[f"train-progress-{run_name}"].data == 100.0
    report = artifacts["add-class-car-report"].data
    assert "data:image/" in report and "](overlays/" not in report and len(report) < 1_100_000
    assert "Promoted" in artifacts["add-class-car-registry"].data
    assert run_name in artifacts["add-class-car-outputs"].data
    inputs = [i for t in trains for ins in t.task_inputs.values() for i in ins]
    assert trains and all(i.input_type != "flow_run" for i in inputs)
    text = "\n".join(log.message for log in logs)
    assert "train 2/2 (100 %)" in text and "step 2/2 val" in text  # the hook's lines and tasks.train's


# ---------------------------------------------------------------------------- predict
def test_the_predict_flow_writes_what_predict_images_writes_and_names_a_corrupt_image(store: str,
                                                                                    tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from addclass.flows.predict import predict
    from addclass.tasks.prediction.predict import predict_images
    from addclass.tasks.training.train import TrainConfig, train

    model = train(TrainConfig(store=store, out_dir=str(tmp_path / "run"), variant="tiny", iters=2, batch_size=2,
                              crop_size=(64, 64), num_points=64, num_workers=0, device="cpu", val_every=0),
                  progress=False)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a", (70, 90, 3)), ("b", (50, 61, 3)), ("c", (33, 40, 3))):
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match=r"1 of 4 images could not be predicted .*broken\.jpg"):
        predict(inputs=[str(folder)], out_dir=str(tmp_path / "flow"), model=str(model), images_per_task=2)
    direct = predict_images(model, [folder], tmp_path / "direct")
    assert sorted(Path(p).name for p in direct["written"]) == ["a.png", "b.png", "c.png"]
    for name in ("a", "b", "c"):  # the same label maps, batch by batch on the flow's runner
        flow_png = cv2.imread(str(tmp_path / "flow" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(flow_png, cv2.imread(str(tmp_path / "direct" / f"{name}.png"), cv2.IMREAD_UNCHANGED))
    (folder / "broken.jpg").unlink()
    again = predict(inputs=[str(folder)], out_dir=str(tmp_path / "flow"), model=str(model))
    assert again["written"] == [] and len(again["skipped"]) == 3  # a rerun resumes
    with pytest.raises(ValueError, match="needs store"):
        predict.fn(inputs=[str(folder)], out_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="prediction.mode"):
        predict.fn(inputs=[str(folder)], out_dir=str(tmp_path / "x"), model=str(model), prediction={"mode": "tiles"})
