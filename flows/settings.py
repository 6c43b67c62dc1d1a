"""Each stage's settings, one typed model each: at once the Prefect flow parameter, the source of the
``addclass`` flags that set it (`cli.fields` generates them from the fields: names, types, defaults,
choices, help) and its validator.

Light on purpose (pydantic and `flows.choices`, no torch): `cli.args` builds the parser from these
models, and ``addclass --help`` stays instant. `flows.params` turns them into the tasks' configs.

Defaults that depend on the device (the sizes that decide a run's time and memory) are `RUN_SIZES`, applied
by `sized_defaults`. The entry points share every default but these, for the reasons given:

=========================================  ======================  ======================  ======================
setting                                    flows (add-class,       ``addclass train``      why
                                           retrain)
=========================================  ======================  ======================  ======================
``iters``                                  300                     `RUN_SIZES` of the      a flow's default is a
                                                                   device (the CPU's: a    quick first run (a few
                                                                   few times longer)       minutes on a laptop);
                                                                                           ``train`` is asked for
                                                                                           a model that learns
``batch_size``, ``crop_size``,             ``RUN_SIZES["cpu"]``    `RUN_SIZES` of the      the flows are
``num_points``                                                     device                  CPU-sized: a flow run
                                                                                           on a GPU sets them
``variant``                                ``tiny``                ``r50``                 as ``iters``: ``r50``
                                                                                           is the release's model
``checkpoint_every``                       100                     1000                    in step with ``iters``
``device``                                 ``cpu``                 ``auto``                a flow's device is
                                                                                           that of its worker,
                                                                                           chosen where it is
                                                                                           deployed
=========================================  ======================  ======================  ======================

(`TRAIN_COMMAND_DEFAULTS` is the ``train`` column; tests/flows/test_settings_single_source.py checks the
table against the code.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from addclass.flows.choices import (
    AutocastDtype,
    DinoConfig,
    LabelerKind,
    ModelVariant,
    PredictMode,
    RecipeChoice,
    ReviewFormat,
    ReviewRanking,
    ReweightChoice,
    SamVariant,
)
from addclass.models import release
from addclass.models.labelers import options
from addclass.models.labelers.build import LabelerConfig

# Field descriptions come from the attribute docstrings (Prefect's UI shows them under each field, the CLI in
# --help); unknown fields are an error, so a typo in a JSON parameter is not silently ignored.
_PARAMS_CONFIG = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _cli(flag: str, **more: Any) -> Any:
    """The flag users know for a field, where it is not the field's name (`cli.fields`)."""
    return {"cli": flag, **more}


@dataclass(frozen=True)
class RunSizes:
    """The training settings that decide a run's time and memory, for one kind of device."""

    iters: int
    batch_size: int
    crop_size: int
    num_points: int


# On a GPU: the release's recipe per device (its config is 8 GPUs x 2 images). On the CPU: a run that fits a
# laptop and learns (the demo's measured setting, a few times longer; README "Points per mask").
RUN_SIZES = {
    "cuda": RunSizes(iters=release.ITERS, batch_size=2, crop_size=release.CROP_SIZE, num_points=release.NUM_POINTS),
    "cpu": RunSizes(iters=2000, batch_size=2, crop_size=256, num_points=release.CPU_NUM_POINTS),
}
SIZED_FIELDS = ("iters", "batch_size", "crop_size", "num_points")  # the fields of RunSizes


def sized_defaults(values: dict[str, Any], *, device_kind: str) -> dict[str, Any]:
    """The `RunSizes` fields missing from `values`, at the sizes of `device_kind` ('cpu' or 'cuda'); the
    caller adds them and says so (`cli.commands_models.cmd_train`)."""
    sizes = RUN_SIZES[device_kind]
    return {name: getattr(sizes, name) for name in SIZED_FIELDS if name not in values}


class LabelingParams(BaseModel):
    """How the new class is pseudo-labelled (docs/design.md §5). The labeler runs on ``training.device`` with
    ``training.seed``; the defaults are `LabelerConfig`'s (`models.labelers.options`)."""

    model_config = _PARAMS_CONFIG

    kind: LabelerKind = Field(default=LabelerConfig.kind, json_schema_extra=_cli("--labeler"))
    """Labeler; 'simulated' (degraded reference masks) is for experiments and the demo only."""
    sam_variant: SamVariant = Field(default=options.SAM_VARIANT, json_schema_extra=_cli("--sam"))
    """SAM image encoder."""
    sam_checkpoint: str | None = None
    """SAM weights (default: $ADDCLASS_SAM_CHECKPOINT, else ~/.cache/addclass/weights/)."""
    dino_config: DinoConfig = Field(default=options.DINO_CONFIG, json_schema_extra=_cli("--dino"))
    """GroundingDINO model."""
    dino_checkpoint: str | None = None
    """GroundingDINO weights (default: $ADDCLASS_DINO_CHECKPOINT, else ~/.cache/addclass/weights/)."""
    random_weights: bool = False
    """Random model weights: smoke tests only."""
    box_threshold: float = options.BOX_THRESHOLD
    """GroundingDINO box score threshold, in [0, 1)."""
    text_threshold: float = options.TEXT_THRESHOLD
    """GroundingDINO phrase score threshold, in [0, 1)."""
    max_boxes: int | None = options.MAX_BOXES
    """Boxes kept per image, best first (null: all)."""
    dtype: AutocastDtype | None = None
    """Autocast on a GPU (null: fp32)."""
    tile_size: int | None = None
    """Also detect on overlapping tiles of this many px (large images, small objects; null: whole image only)."""
    tile_overlap: int = options.TILE_OVERLAP
    """Minimum overlap of neighbouring detection tiles, px."""
    min_region_area: int = 0
    """Remove mask islands and fill holes smaller than this many px (0: masks as SAM gives them)."""
    negative_phrases: list[str] = Field(default=[], json_schema_extra={"metavar": "PHRASE"})
    """Phrases whose boxes remove the prompt's boxes they overlap (e.g. ["toy car"]); they label nothing."""
    negative_iou: float = options.NEGATIVE_IOU
    """IoU at which a negative phrase's box removes a prompt box."""
    refine: bool = False
    """Decode every box again on a crop around it: finer masks of small objects, one encoder pass per box."""
    refine_margin: float = options.REFINE_MARGIN
    """Context around a refined box, as a fraction of its side."""
    hq_token_only: bool = False
    """HQ-SAM variants only: the HQ token's mask alone (default: added to SAM's mask)."""
    batch_size: int = Field(default=8, json_schema_extra={"flow_cli": "--pseudo-batch-size"})
    """Images per labelling task (the unit of scale-out and retries)."""
    splits: list[str] = Field(default=["train", "val"], json_schema_extra={"flow_cli": "--pseudo-splits"})
    """Splits to pseudo-label (the others keep the parent version's labels)."""
    gpus: list[int] | None = None
    """GPUs to label on, one local Dask worker each (pinned with CUDA_VISIBLE_DEVICES; needs device 'cuda' and a
    Prefect server)."""


_CPU = RUN_SIZES["cpu"]


class TrainingParams(BaseModel):
    """How the model is trained (`tasks.training.train_config.TrainConfig`, docs/design.md §3); CPU-sized defaults
    (`RUN_SIZES`)."""

    model_config = _PARAMS_CONFIG

    variant: ModelVariant = "tiny"
    """Model variant: MaSSFormer or a baseline (Mask2Former, MaskFormer, SeMask FPN)."""
    iters: int = Field(default=300, ge=1)
    """Training steps."""
    batch_size: int = Field(default=_CPU.batch_size, ge=2, json_schema_extra={"flow_cli": "--train-batch-size"})
    """Images per step, >= 2."""
    crop_size: int = Field(default=_CPU.crop_size, ge=64)
    """Side of the square training crops, >= 64."""
    reweight: ReweightChoice = "inverse"
    """Point weights of the mask loss: 'inverse' trusts pseudo-label edges less."""
    inverse_weight_near_pseudo: bool = Field(default=True, json_schema_extra=_cli("--inverse-near-pseudo"))
    """Precise pixels next to the new class get the inverse weight too (reweight 'inverse' only)."""
    num_points: int = Field(default=_CPU.num_points, json_schema_extra=_cli("--points"))
    """Sampled points per mask, of the matcher and the mask losses."""
    num_workers: int = Field(default=2, json_schema_extra=_cli("--workers"))
    """Data-loader processes (0: load in the training process)."""
    recipe: RecipeChoice = "auto"
    """Optimiser recipe; 'auto': 'scratch' for a random start, 'paper' from init_model or ImageNet weights."""
    lr: float | None = Field(default=None, gt=0)
    """Base learning rate (null: the recipe's)."""
    scale_range: tuple[float, float] = Field(default=(0.5, 2.0), json_schema_extra={"metavar": ["LOW", "HIGH"]})
    """Random resize ratio of the training images (low, high)."""
    test_scale: float = 1.0
    """The trained model's inference scale (e.g. 2 with scale_range [0.75, 1.5] on small images)."""
    test_ratios: tuple[float, ...] = Field(default=(1.0,), json_schema_extra={"metavar": "R"})
    """Scales the model averages at inference, as ratios of test_scale (e.g. [1, 1.5])."""
    test_window: int | None = Field(default=None, json_schema_extra={"metavar": "N"})
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
    processes: int = Field(default=1, json_schema_extra=_cli("--nproc"))
    """Training processes per node (torchrun, one per GPU; >1: data-parallel, the batch split over them)."""
    nnodes: int = 1
    """Nodes training together (the flow runs on the first; start the same torchrun on the others)."""
    rdzv_endpoint: str | None = Field(default=None, json_schema_extra={"metavar": "HOST:PORT"})
    """host:port where several nodes meet (the first node)."""


# `addclass train`'s own defaults (the table above says why); its sized fields are `sized_defaults`.
TRAIN_COMMAND_DEFAULTS: dict[str, Any] = {"variant": "r50", "checkpoint_every": 1000, "device": "auto"}


class ReviewParams(BaseModel):
    """Stop add-class after the merge for a person's review of the new class (`tasks.labels.review`), and train on
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
    """How a trained model predicts new images (`tasks.prediction.predict.PredictConfig`)."""

    model_config = _PARAMS_CONFIG

    mode: PredictMode = "auto"
    """'auto': the model's own tiles (its training crop); 'whole': one pass per image; 'slide': window tiles."""
    window: int = 1024
    """Tile size of 'slide', in input pixels."""
    stride: int | None = None
    """Tile step of 'slide' (null: 3/4 of the window)."""
    tta: bool = False
    """Average over tta_scales and horizontal flips, in probability space."""
    tta_scales: list[float] = list(release.TTA_SCALES)
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
