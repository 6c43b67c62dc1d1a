"""What the flows' structured parameters turn into.

`LabelingParams`, `TrainingParams`, `ReviewParams` and `PredictionParams` (`flows.settings`, re-exported here)
are Pydantic models: Prefect validates them and renders them as forms in its UI, a deployment run takes them
as JSON (``--param training='{"iters": 600}'``), and ``addclass`` sets each field with one flag generated
from it (`cli.fields`). `labeler_config`, `train_config` and `predict_config` are the one place each
becomes the `LabelerConfig` / `TrainConfig` / `PredictConfig` the tasks run; `parse_params` and
`check_splits` are the checks that run before any work (one-line errors naming the parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from addclass.common.errors import InputError
from addclass.flows.settings import LabelingParams as LabelingParams
from addclass.flows.settings import PredictionParams as PredictionParams
from addclass.flows.settings import ReviewParams as ReviewParams
from addclass.flows.settings import TrainingParams as TrainingParams
from addclass.storage.names import parse_split
from addclass.tasks.labels.pseudo_label import LabelerConfig
from addclass.tasks.prediction.predict import PredictConfig
from addclass.tasks.training.train import TrainConfig, run_name
from addclass.tasks.training.train_launch import Launch

P = TypeVar("P", bound=BaseModel)


def parse_params(model: type[P], value: P | Mapping[str, Any], parameter: str) -> P:
    """`value` as a `model` (a flow called through ``.fn`` gets the JSON as it came; Prefect's own call has
    validated it already); a bad field is one line naming ``parameter.field``.

    Raises:
        InputError: quoting the first bad value.
    """
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as e:
        first, more = e.errors()[0], e.error_count() - 1
        where = ".".join([parameter, *map(str, first["loc"])])
        also = f" ({more} more)" if more else ""
        raise InputError(f"{where}: {first['msg']}. Got {first['input']!r} instead{also}.") from None


def check_splits(parameter: str, splits: Sequence[str]) -> list[str]:
    """`splits` as a list of train/val/test names; a typo ("valid") is a ValueError naming `parameter`."""
    if isinstance(splits, str) or not splits:
        raise InputError(f"Expected {parameter} to be a non-empty list of splits. Got {splits!r} instead.")
    try:
        return [parse_split(s) for s in splits]
    except ValueError as e:
        raise InputError(f"{parameter}: {e}") from None


def check_review(review: ReviewParams | Mapping[str, Any] | None, *, store: str) -> ReviewParams | None:
    """The ``review`` parameter checked (None: no pause for review); its model resolved to a folder.

    Raises:
        ValueError, FileNotFoundError: naming the field.
    """
    if review is None:
        return None
    checked = parse_params(ReviewParams, review, "review")
    if checked.top < 1:
        raise InputError(f"Expected review.top >= 1. Got {checked.top} instead.")
    if checked.by != "score" and checked.model is None:
        raise InputError(f"review.by {checked.by!r} needs review.model (a trained model folder, or 'champion').")
    if checked.model is not None:
        from addclass.tasks.model_files.model_registry import resolve_init_model

        checked = checked.model_copy(update={"model": resolve_init_model(store, checked.model)})
    return checked


def labeler_config(labeling: LabelingParams, *, device: str, seed: int) -> LabelerConfig:
    """The pseudo-label stage's `LabelerConfig` (the fields of `LabelingParams` but the task batching)."""
    if labeling.gpus is not None and (not labeling.gpus or min(labeling.gpus) < 0 or not device.startswith("cuda")):
        raise InputError(f"Expected labeling.gpus: GPU numbers >= 0, with training.device 'cuda' (each worker's "
                         f"'cuda' is its GPU). Got {labeling.gpus} with device {device!r} instead.")
    fields = labeling.model_dump(exclude={"batch_size", "splits", "gpus"})
    device = "cuda" if labeling.gpus else device  # a pinned worker sees its GPU as cuda:0
    return LabelerConfig(**fields, device=device, seed=seed)


def predict_config(prediction: PredictionParams) -> PredictConfig:
    """The prediction tasks' `PredictConfig` (one field each); building it checks the values.

    Raises:
        ValueError: naming the values.
    """
    return PredictConfig(**{**prediction.model_dump(), "tta_scales": tuple(prediction.tta_scales)})


LAUNCH_FIELDS = {"processes", "nnodes", "rdzv_endpoint"}  # where the run trains (`launch`), not what it is


def launch(training: TrainingParams) -> Launch:
    """Where the training stage runs: in the flow's process, or under torchrun (`tasks.training.train_launch`).

    Raises:
        ValueError: naming the values.
    """
    return Launch(nproc=training.processes, nnodes=training.nnodes, rdzv_endpoint=training.rdzv_endpoint)


def train_config(training: TrainingParams, *, store: str, version: str, runs_dir: str | None,
                 init_model: str | None) -> TrainConfig:
    """The training stage's `TrainConfig` (square crops) in a folder of `runs_dir` (default ``STORE.runs``)
    named by `run_name`, so that the same settings resume their run; building it checks the training
    parameters. Every `TrainingParams` field but `LAUNCH_FIELDS` is a `TrainConfig` field; the others keep
    TrainConfig's defaults.

    Raises:
        ValueError: naming the parameter.
    """
    runs = Path(runs_dir) if runs_dir else Path(f"{store.rstrip('/')}.runs")
    cfg = task_train_config(training, store=store, version=version, out_dir=str(runs), init_model=init_model)
    return dataclasses.replace(cfg, out_dir=str(runs / run_name(cfg)))


def task_train_config(training: TrainingParams, *, store: str, version: str, out_dir: str, init_model: str | None,
                      **more: Any) -> TrainConfig:
    """The `TrainConfig` of `training` (square crops) in run folder `out_dir`: every `TrainingParams` field but
    `LAUNCH_FIELDS` is a `TrainConfig` field; `more` sets others (``addclass train``'s ``lr``, ``amp``, ...),
    and the rest keep TrainConfig's defaults. Building it checks the values (`training`'s ranges were checked
    when it was built).

    Raises:
        ValueError: naming the values.
    """
    fields = training.model_dump(exclude={"crop_size"} | LAUNCH_FIELDS)
    return TrainConfig(**fields, crop_size=(training.crop_size, training.crop_size), store=store, version=version,
                       out_dir=out_dir, init_model=init_model, **more)
