"""The flows' parameter objects and what they turn into (no Prefect API needed)."""

from __future__ import annotations

import dataclasses

import pytest

from addclass.flows.params import (
    LAUNCH_FIELDS,
    LabelingParams,
    PredictionParams,
    ReviewParams,
    TrainingParams,
    check_review,
    labeler_config,
    launch,
    parse_params,
    predict_config,
    train_config,
)
from addclass.tasks.labels.pseudo_label import LabelerConfig
from addclass.tasks.prediction.predict import PredictConfig
from addclass.tasks.training.train import TrainConfig
from addclass.tasks.training.train_launch import Launch


def test_every_parameter_field_reaches_the_task_config() -> None:
    """A field added to a parameter object must mean something to the stage it configures."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TrainingParams.model_fields) - train_fields == LAUNCH_FIELDS  # where it trains: `launch`
    assert set(dataclasses.asdict(launch(TrainingParams(processes=2, nnodes=3, rdzv_endpoint="n0:1")))) == {
        "nproc", "nnodes", "rdzv_endpoint"}
    assert launch(TrainingParams(processes=2, nnodes=3, rdzv_endpoint="n0:1")) == Launch(2, 3, "n0:1")
    labeler_fields = {f.name for f in dataclasses.fields(LabelerConfig)}
    # the stage's batching, and the workers it runs on
    assert set(LabelingParams.model_fields) - labeler_fields == {"batch_size", "splits", "gpus"}
    # prediction: one field each way, so the flow can set everything `addclass predict` can
    assert set(PredictionParams.model_fields) == {f.name for f in dataclasses.fields(PredictConfig)}
    assert predict_config(PredictionParams(tta=True, tta_scales=[1.0, 2.0])) == PredictConfig(tta=True,
                                                                                            tta_scales=(1.0, 2.0))


def test_run_folder_names_are_those_of_earlier_runs() -> None:
    """The same training settings name the same run folder as before the parameters were structured (pinned
    from `flow_train_config`), so a rerun resumes; `checkpoint_every` is not part of a run's identity."""
    cfg = train_config(TrainingParams(num_points=12544), store="s.zarr", version="v2", runs_dir="r", init_model=None)
    assert cfg.out_dir == "r/v2-tiny-inverse-s0-i300-29c09fa5" and cfg.checkpoint_every == 100
    assert cfg.crop_size == (256, 256) and cfg.device == "cpu" and cfg.val_every is None
    # the flows' default points are the CPU's (flows.settings.RUN_SIZES) since they were one definition: 8192,
    # not 12544, so a run with the default settings is a new run (and names a new folder)
    default = train_config(TrainingParams(), store="s.zarr", version="v2", runs_dir="r", init_model=None)
    assert default.num_points == 8192 and default.out_dir == "r/v2-tiny-inverse-s0-i300-7cbbd69e"
    other = TrainingParams(iters=2, crop_size=64, num_points=64, num_workers=0, reweight="edge",
                           inverse_weight_near_pseudo=False, seed=3, recipe="scratch", scale_range=(0.75, 1.5),
                           test_scale=2.0, checkpoint_every=1)
    cfg = train_config(other, store="s.zarr", version="v1", runs_dir="r", init_model=None)
    assert cfg.out_dir == "r/v1-tiny-edge-s3-i2-3fdb13fa"
    # how often a run validates is not what the run is: the same folder, so a rerun resumes it
    validated = train_config(other.model_copy(update={"val_every": 5}), store="s.zarr", version="v1",
                             runs_dir="r", init_model=None)
    assert validated.val_every == 5 and validated.out_dir == cfg.out_dir
    assert train_config(other, store="s.zarr/", version="v1", runs_dir=None, init_model=None).out_dir.startswith(
        "s.zarr.runs/v1-tiny-edge-s3-i2-")


def test_labeler_config_takes_the_training_device_and_seed() -> None:
    labeling = LabelingParams(kind="simulated", box_threshold=0.5, max_boxes=None, dtype="bfloat16")
    cfg = labeler_config(labeling, device="cuda", seed=4)
    assert cfg == LabelerConfig(kind="simulated", box_threshold=0.5, max_boxes=None, dtype="bfloat16",
                                device="cuda", seed=4)


@pytest.mark.parametrize(("value", "message"), [
    ({"iter": 600}, r"^training\.iter: Extra inputs are not permitted\. Got 600 instead\.$"),
    ({"variant": "r101"}, r"^training\.variant: Input should be 'tiny', 'lite_r18', 'r50', 'mask2former_r50', .* or 'semask_fpn_tiny'\. "
                         r"Got 'r101'"),
    ({"scale_range": [1.0]}, r"^training\.scale_range\.1: Field required"),
    ({"iters": "x", "seed": "y"}, r"^training\.iters: .* \(1 more\)\.$"),
])
def test_bad_fields_are_one_line_naming_the_field(value: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_params(TrainingParams, value, "training")


def test_json_objects_become_parameter_objects() -> None:
    assert parse_params(TrainingParams, {"iters": 600}, "training") == TrainingParams(iters=600)
    params = LabelingParams()
    assert parse_params(LabelingParams, params, "labeling") is params


def test_review_parameter_is_checked_before_any_work(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from addclass.common.errors import InputError

    assert check_review(None, store=str(tmp_path)) is None
    assert check_review({"top": 3}, store=str(tmp_path)) == ReviewParams(top=3)
    with pytest.raises(InputError, match="review.top >= 1"):
        check_review({"top": 0}, store=str(tmp_path))
    with pytest.raises(InputError, match="review.by 'uncertainty' needs review.model"):
        check_review({"by": "uncertainty"}, store=str(tmp_path))
    with pytest.raises(ValueError, match="review"):
        check_review({"top": 3, "ranking": "score"}, store=str(tmp_path))  # an unknown field
    with pytest.raises(FileNotFoundError, match="nothing"):
        check_review({"by": "disagreement", "model": str(tmp_path / "nothing")}, store=str(tmp_path))
