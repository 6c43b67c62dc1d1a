"""The flows' structured parameters and what they turn into.

`LabelingParams` and `TrainingParams` are Pydantic models: Prefect validates them and renders them as forms in
its UI, a deployment run takes them as JSON (``--param training='{"iters": 600}'``), and ``addclass`` sets
each field with one flag (`flows.cli.flow_params`). `labeler_config` and `train_config` are the one place each
becomes the `LabelerConfig` / `TrainConfig` the tasks run; `parse_params` and `check_splits` are the checks
that run before any work (one-line errors naming the parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import InputError
from flows.choices import (
    AutocastDtype,
    DinoConfig,
    LabelerKind,
    ModelVariant,
    PredictMode,
    RecipeChoice,
    ReviewFormat,
    ReviewRanking,
    SamVariant,
)
from models.training.loss_weights import ReweightMode
from storage.names import parse_split
from tasks.predict import DEFAULT_TTA_SCALES, PredictConfig
from tasks.pseudo_label import LabelerConfig
from tasks.train import TrainConfig, run_name
from tasks.train_launch import Launch

# Field descriptions come from the attribute docstrings (Prefect's UI shows them under each field); unknown
# fields are an error, so a typo in a JSON parameter is not silently ignored.
_PARAMS_CONFIG = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class LabelingParams(BaseModel):
    """How the new class is pseudo-labelled (docs/design.md §5). The labeler runs on ``training.device`` with
    ``training.seed``."""

    model_config = _PARAMS_CONFIG

    kind: LabelerKind = "grounded-sam"
    """Labeler; 'simulated' (degraded reference masks) is for experiments and the demo only."""
    sam_variant: SamVariant = "vit_b"
    """SAM image encoder."""
    sam_checkpoint: str | None = None
    """SAM weights (default: $ADDCLASS_SAM_CHECKPOINT, else ~/.cache/addclass/weights/)."""
    dino_config: DinoConfig = "swint_ogc"
    """GroundingDINO model."""
    dino_checkpoint: str | None = None
    """GroundingDINO weights (default: $ADDCLASS_DINO_CHECKPOINT, else ~/.cache/addclass/weights/)."""
    random_weights: bool = False
    """Random model weights: smoke tests only."""
    box_threshold: float = 0.35
    """GroundingDINO box score threshold, in [0, 1]."""
    text_threshold: float = 0.25
    """GroundingDINO phrase score threshold, in [0, 1]."""
    max_boxes: int | None = 20
    """Boxes kept per image, best first (null: all)."""
    dtype: AutocastDtype | None = None
    """Autocast on a GPU (null: fp32)."""
    tile_size: int | None = None
    """Also detect on overlapping tiles of this many px (large images, small objects; null: whole image only)."""
    tile_overlap: int = 128
    """Minimum overlap of neighbouring detection tiles, px."""
    min_region_area: int = 0
    """Remove mask islands and fill holes smaller than this many px (0: masks as SAM gives them)."""
    negative_phrases: list[str] = []
    """Phrases whose boxes remove the prompt's boxes they overlap (e.g. ["toy car"]); they label nothing."""
    negative_iou: float = 0.5
    """IoU at which a negative phrase's box removes a prompt box."""
    refine: bool = False
    """Decode every box again on a crop around it: finer masks of small objects, one encoder pass per box."""
    refine_margin: float = 0.25
    """Context around a refined box, as a fraction of its side."""
    hq_token_only: bool = False
    """HQ-SAM variants only: the HQ token's mask alone (default: added to SAM's mask)."""
    batch_size: int = 8
    """Images per labelling task (the unit of scale-out and retries)."""
    splits: list[str] = ["train", "val"]
    """Splits to pseudo-label (the others keep the parent version's labels)."""
    gpus: list[int] | None = None
    """GPUs to label on, one local Dask worker each (pinned with CUDA_VISIBLE_DEVICES; needs device 'cuda' and a
    Prefect server)."""


class TrainingParams(BaseModel):
    """How the model is trained (`tasks.train_config.TrainConfig`, docs/design.md §3); CPU-sized defaults."""

    model_config = _PARAMS_CONFIG

    variant: ModelVariant = "tiny"
    """Model variant: MaSSFormer (tiny, lite_r18, r50) or a baseline (mask2former_*, maskformer_*, semask_fpn_*)."""
    iters: int = 300
    """Training steps."""
    batch_size: int = 2
    """Images per step, >= 2."""
    crop_size: int = 256
    """Side of the square training crops, >= 64."""
    reweight: ReweightMode = "inverse"
    """Point weights of the mask loss: 'inverse' trusts pseudo-label edges less."""
    inverse_weight_near_pseudo: bool = True
    """Precise pixels next to the new class get the inverse weight too (reweight 'inverse' only)."""
    num_points: int = 12544
    """Sampled points per mask (CPU: ~8192)."""
    num_workers: int = 2
    """Data-loader processes (0: load in the training process)."""
    recipe: RecipeChoice = "auto"
    """Optimiser recipe; 'auto': 'scratch' for a random start, 'paper' from init_model."""
    lr: float | None = None
    """Base learning rate (null: the recipe's)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random resize ratio of the training images (low, high)."""
    test_scale: float = 1.0
    """The trained model's inference scale (e.g. 2 with scale_range [0.75, 1.5] on small images)."""
    test_ratios: tuple[float, ...] = (1.0,)
    """Scales the model averages at inference, as ratios of test_scale (e.g. [1, 1.5])."""
    test_window: int | None = None
    """Tile side (network pixels) the model predicts larger images in; None: crop_size; 0: whole images."""
    checkpoint_every: int = 100
    """Steps between checkpoints: a stopped run resumes from the last one."""
    val_every: int | None = None
    """Steps between validations on val during training (None: 10 per run; 0: none)."""
    seed: int = 0
    """Seed of the initialisation, data order, augmentations and loss points (and of the labeler)."""
    device: str = "cpu"
    """Where the labeler, the training and the evaluation run: 'cpu', 'cuda', 'cuda:1', 'auto'."""
    accumulate: int = 1
    """Forward/backward passes per step in each training process (gradient accumulation)."""
    processes: int = 1
    """Training processes per node (torchrun, one per GPU; >1: data-parallel, the batch split over them)."""
    nnodes: int = 1
    """Nodes training together (the flow runs on the first; start the same torchrun on the others)."""
    rdzv_endpoint: str | None = None
    """host:port where several nodes meet (the first node)."""


class ReviewParams(BaseModel):
    """Stop add-class after the merge for a person's review of the new class (`tasks.review`), and train on
    the reviewed labels once they are imported (``addclass review import``): a rerun of the same add-class
    finds the imported version and goes on from it."""

    model_config = _PARAMS_CONFIG

    top: int = 20
    """Images sent for review, the most worth a look first."""
    by: ReviewRanking = "score"
    """Ranking: 'score' (the labeler's lowest confidence first); 'disagreement' or 'uncertainty' need `model`."""
    model: str | None = None
    """A trained model folder or 'champion', for the 'disagreement' and 'uncertainty' rankings."""
    format: ReviewFormat = "coco"
    """'coco' (CVAT's COCO 1.0, FiftyOne, most tools) or 'labelstudio' (tasks with brush pre-annotations)."""
    out: str | None = None
    """Export folder (default: STORE.review/CLASS-VERSION)."""


class PredictionParams(BaseModel):
    """How a trained model predicts new images (`tasks.predict.PredictConfig`)."""

    model_config = _PARAMS_CONFIG

    mode: PredictMode = "auto"
    """'auto': the model's own tiles (its training crop); 'whole': one pass per image; 'slide': window tiles."""
    window: int = 1024
    """Tile size of 'slide', in input pixels."""
    stride: int | None = None
    """Tile step of 'slide' (null: 3/4 of the window)."""
    tta: bool = False
    """Average over tta_scales and horizontal flips, in probability space."""
    tta_scales: list[float] = list(DEFAULT_TTA_SCALES)
    """Ratios of the model's test scale."""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:1'."""
    bf16: bool = True
    """bf16 autocast on a GPU (ignored on the CPU)."""
    overlays: bool = False
    """Also write overlays/NAME.jpg."""
    scores: bool = False
    """Also write scores/NAME.npz (per-class scores; large)."""
    overwrite: bool = False
    """Predict again images predicted before (files addclass did not write are never replaced)."""


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
        from tasks.model_registry import resolve_init_model

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
    """Where the training stage runs: in the flow's process, or under torchrun (`tasks.train_launch`).

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
    t = training
    if t.iters < 1 or t.batch_size < 2 or t.crop_size < 64:
        raise InputError(f"Expected iters >= 1, batch_size >= 2, crop_size >= 64. "
                         f"Got {t.iters}, {t.batch_size}, {t.crop_size}.")
    runs = Path(runs_dir) if runs_dir else Path(f"{store.rstrip('/')}.runs")
    fields = t.model_dump(exclude={"crop_size"} | LAUNCH_FIELDS)
    cfg = TrainConfig(**fields, crop_size=(t.crop_size, t.crop_size), store=store, version=version,
                      out_dir=str(runs), init_model=init_model)
    return dataclasses.replace(cfg, out_dir=str(runs / run_name(cfg)))
