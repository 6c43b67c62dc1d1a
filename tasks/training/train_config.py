"""A training run's configuration: `TrainConfig`, resolved against the store and the recipe, the model config its
checkpoints carry, the check that a checkpoint belongs to the run, and the run-folder name the flows use.

`tasks.training.train` runs the loop; this module decides what the run is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addclass.common.errors import InputError
from addclass.models import release
from addclass.models.build import MODEL_BUILDERS, default_pixel_decoder, pixel_decoder_problem
from addclass.models.hashing import json_hash
from addclass.models.training.loss_weights import parse_reweight_mode
from addclass.models.training.optim import RECIPE_CHOICES, choose_recipe
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.model_files.model_folder import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    read_model_config,
)

# TrainConfig fields that may change between a run and its resume (they do not change the result on CPU).
RESUME_FREE_FIELDS = frozenset(
    {"out_dir", "store", "device", "num_workers", "checkpoint_every", "keep_checkpoints", "val_every",
     "val_max_images", "test_window", "test_ratios", "accumulate"}
)
# TrainConfig fields added after runs were first written, with the value a run without them had: an older
# checkpoint resumes, and an older run keeps its folder name (`run_name`), while the field keeps that value.
LATER_FIELDS = {"ema_decay": 0.0}
VALIDATIONS_PER_RUN = 10  # val_every=None: this many validations over a run


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written to ``out_dir/train_config.json``.

    Attributes:
        store: Label store path.
        out_dir: Run folder (checkpoints, log, ``final/``).
        version: Label version to train on (``"latest"`` is resolved by `resolve_train_config`).
        variant: A ``models.build.MODEL_BUILDERS`` key: MaSSFormer or a baseline (the CLI's and the
            flows' choices are `flows.choices.ModelVariant`, checked against it by a test).
        num_classes: K; derived from the version (None until resolved; a different value is an error).
        pixel_decoder: ``"hr"`` (MaSSFormer) or ``"fpn"`` (the mask-classification baseline) for the MaSSFormer
            variants; the baselines have their own (``"msdeform"``, ``"fpn"``, ``"semantic_fpn"``) and take no
            other. None (the
            default) is resolved to the variant's own.
        iters: Training steps (MaSSFormer's release: `models.release.ITERS`).
        batch_size: Images per step, >= 2 (the pixel decoder has BatchNorm after global pooling): the global
            batch, whatever the number of processes (`tasks.training.distributed`) and ``accumulate``; both must divide
            it. The step count ``iters`` is counted in these batches too.
        accumulate: Forward/backward passes per step in each process (gradient accumulation), so that fewer
            devices reach the recipe's batch; each pass sees ``batch_size / (processes * accumulate)`` images.
            The gradients equal those of the whole batch, except that batch norm statistics come from each
            pass (over all processes), so the pass must hold >= 2 images over the processes.
        crop_size: (height, width) of training crops; the model pads to multiples of 256, so multiples of
            256 waste nothing.
        scale_range: Random resize ratio range (of the native size).
        cat_max_ratio: ``RandomCrop`` largest single-class fraction.
        recipe: ``"auto"`` (``paper`` when the run starts from ``backbone_checkpoint`` or ``init_model``,
            else ``scratch``), ``"paper"`` or ``"scratch"``; resolved to the name by `resolve_train_config`.
        lr: Base learning rate (None: the recipe's).
        backbone_lr_mult: Backbone learning-rate multiplier (None: the recipe's; paper 0.1).
        warmup_iters: Linear warm-up iterations (None: the recipe's share of ``iters``).
        grad_clip: Global L2 gradient-norm clip, 0 for none (None: the recipe's; paper 0.01).
        ema_decay: Decay of the exponential moving average of the weights (`models.training.ema`), 0 for
            none (None: the recipe's). With it, validation, checkpoints and ``final/`` hold the average.
        weight_decay: AdamW weight decay.
        reweight: BCE point weights, ``"none"``, ``"edge"`` or ``"inverse"``.
        inverse_weight_near_pseudo: Precise pixels next to pseudo regions get the inverse weight.
        num_points: Sampled points per mask (matcher and losses; MaSSFormer's release: `models.release.NUM_POINTS`).
        checkpoint_every: Steps between checkpoints (the last step is always saved).
        keep_checkpoints: Newest checkpoints kept (0: all).
        seed: Seed of the initialisation, the data order, the augmentations and the loss points.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        amp: bf16 autocast of the forward pass on CUDA (ignored on the CPU); off by default, as MaSSFormer's
            fp32 recipe. It changes GPU results, so a resume must keep it.
        num_workers: DataLoader worker processes (0: load in the training process).
        backbone_checkpoint: Optional torchvision ImageNet ResNet weights for a fresh run.
        init_model: Optional trained model folder (``final/`` of an earlier run, or one of its
            ``checkpoints/``) to fine-tune from, e.g. a 7-class model taught a new class: same variant and
            pixel decoder; classes are matched by name and new classes start untrained
            (`tasks.model_files.model_folder.init_from_model`).
        split: Store split to train on.
        val_every: Steps between validations on the ``val`` split (`tasks.training.validation`; scores in
            ``train_log.jsonl``, the curve in ``learning_curve.png``); None: 10 per run when the store has a
            ``val`` split; 0: none.
        val_max_images: Validate on at most this many ``val`` images (None: all).
        test_scale: Inference scale of the trained model (`MaSSFormer.test_scale`, in its ``config.json``):
            images are resized by it for prediction. 2 puts the half-resolution masks on the image's own pixel
            grid (small images; the demo trains with ``scale_range`` 0.75-1.5 and predicts at 2, and at 3 with
            ``test_ratios``).
        test_ratios: Scales the trained model averages at inference, as ratios of ``test_scale``
            (`MaSSFormer.test_ratios`, in its ``config.json``; validation uses them too): its class
            probabilities at each are averaged. ``(1.0,)``: ``test_scale`` alone. The demo predicts at
            scales 2 and 3 (``test_scale`` 2, ratios 1 and 1.5). An inference setting, like ``test_window``.
        test_window: Side of the square tiles, in the network's pixels (after ``test_scale``), in which the
            trained model predicts images larger than that (`MaSSFormer.test_window`, in its ``config.json``;
            validation uses it too). None: the larger side of ``crop_size``, the size it trained on; 0: whole
            images. An inference setting: not part of the run's identity, so a resume may change it.
    """

    store: str
    out_dir: str
    version: str = "latest"
    variant: str = "r50"
    num_classes: int | None = None
    pixel_decoder: str | None = None
    iters: int = release.ITERS
    batch_size: int = 16
    accumulate: int = 1
    crop_size: tuple[int, int] = (release.CROP_SIZE, release.CROP_SIZE)
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    recipe: str = "auto"
    lr: float | None = None
    backbone_lr_mult: float | None = None
    warmup_iters: int | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    weight_decay: float = 0.05
    reweight: str = "inverse"
    inverse_weight_near_pseudo: bool = True
    num_points: int = release.NUM_POINTS
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    num_workers: int = 2
    backbone_checkpoint: str | None = None
    init_model: str | None = None
    split: str = "train"
    val_every: int | None = None
    val_max_images: int | None = 64
    test_scale: float = 1.0
    test_ratios: tuple[float, ...] = (1.0,)
    test_window: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise types (paths to str, lists from JSON to tuples)
        set_(self, "store", str(self.store))
        set_(self, "out_dir", str(self.out_dir))
        for name in ("backbone_checkpoint", "init_model"):
            if getattr(self, name) is not None:
                set_(self, name, str(getattr(self, name)))
        if self.backbone_checkpoint is not None and self.init_model is not None:
            raise InputError(
                f"Expected backbone_checkpoint or init_model, not both: init_model {self.init_model} already "
                f"holds a trained backbone. Got backbone_checkpoint {self.backbone_checkpoint} too."
            )
        set_(self, "crop_size", tuple(int(v) for v in self.crop_size))
        set_(self, "scale_range", tuple(float(v) for v in self.scale_range))
        set_(self, "test_ratios", tuple(float(v) for v in self.test_ratios))
        if self.variant not in MODEL_BUILDERS:
            raise InputError(f"Expected variant in {sorted(MODEL_BUILDERS)}. Got {self.variant!r} instead.")
        problem = pixel_decoder_problem(self.variant, self.pixel_decoder)
        if problem is not None:
            raise InputError(problem)
        if self.pixel_decoder is None:
            set_(self, "pixel_decoder", default_pixel_decoder(self.variant))
        if self.batch_size < 2:
            raise InputError(
                f"Expected batch_size >= 2 (the pixel decoder's BatchNorm after global pooling needs more "
                f"than one value per channel in training). Got {self.batch_size} instead."
            )
        if self.accumulate < 1 or self.batch_size % self.accumulate or self.batch_size // self.accumulate < 2:
            raise InputError(
                f"Expected accumulate >= 1 dividing batch_size {self.batch_size} into passes of >= 2 images (batch "
                f"norm needs more than one value per channel). Got accumulate {self.accumulate} instead."
            )
        for name in ("iters", "checkpoint_every", "num_points"):
            if getattr(self, name) < 1:
                raise InputError(f"Expected {name} >= 1. Got {getattr(self, name)} instead.")
        if (self.val_every is not None and self.val_every < 0) or (
            self.val_max_images is not None and self.val_max_images < 1
        ):
            raise InputError(f"Expected val_every >= 0 and val_max_images >= 1. "
                             f"Got {self.val_every}, {self.val_max_images} instead.")
        if self.num_workers < 0 or self.keep_checkpoints < 0 or self.seed < 0:
            raise InputError(
                f"Expected num_workers, keep_checkpoints, seed >= 0. "
                f"Got {self.num_workers}, {self.keep_checkpoints}, {self.seed} instead."
            )
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise InputError(f"Expected crop_size (height, width) >= 1. Got {self.crop_size!r} instead.")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise InputError(f"Expected scale_range (low, high), 0 < low <= high. Got {self.scale_range!r}.")
        if self.test_scale <= 0:
            raise InputError(f"Expected test_scale > 0. Got {self.test_scale} instead.")
        if not self.test_ratios or min(self.test_ratios) <= 0:
            raise InputError(f"Expected test_ratios: one or more numbers > 0. Got {self.test_ratios!r} instead.")
        if self.test_window is not None and self.test_window < 0:
            raise InputError(f"Expected test_window >= 0 (0: whole images). Got {self.test_window} instead.")
        if self.recipe not in RECIPE_CHOICES:
            raise InputError(f"Expected recipe in {RECIPE_CHOICES}. Got {self.recipe!r} instead.")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0:
            raise InputError(f"Expected lr > 0 and weight_decay >= 0. Got {self.lr}, {self.weight_decay}.")
        if (self.backbone_lr_mult is not None and self.backbone_lr_mult < 0) or (
            self.grad_clip is not None and self.grad_clip < 0
        ):
            raise InputError(
                f"Expected backbone_lr_mult >= 0 and grad_clip >= 0. Got {self.backbone_lr_mult}, {self.grad_clip}."
            )
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise InputError(f"Expected 0 <= ema_decay < 1. Got {self.ema_decay} instead.")
        if self.warmup_iters is not None and not 0 <= self.warmup_iters < self.iters:
            raise InputError(f"Expected 0 <= warmup_iters < iters. Got {self.warmup_iters}, {self.iters} instead.")
        parse_reweight_mode(self.reweight)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields."""
        d = dataclasses.asdict(self)
        d["crop_size"], d["scale_range"] = list(self.crop_size), list(self.scale_range)
        d["test_ratios"] = list(self.test_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"Unknown TrainConfig fields {unknown}.")
        return cls(**d)


def version_classes(store: LabelStore, version: str) -> tuple[list[str], set[int]]:
    """Class names and pseudo classes of a published version, both by model class index
    (`VersionInfo.model_class_ids`: store ids with gaps, e.g. 0..6 and 8, become 0..7).

    Raises:
        ValueError: the version uses ids missing from the class registry.
    """
    info = store.versions()[store.resolve_version(version)]
    ids = info.model_class_ids
    by_id = {c.id: c for c in store.classes()}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InputError(
            f"Version {info.name} of {store.path} uses class ids {missing} missing from the registry."
        )
    return [by_id[i].name for i in ids], {k for k, i in enumerate(ids) if by_id[i].source == "pseudo"}


def resolve_recipe(config: TrainConfig) -> TrainConfig:
    """Names the recipe (``"auto"`` -> ``paper`` / ``scratch`` by the start) and fills the optimisation fields
    left None from it; fields set explicitly are kept."""
    recipe = choose_recipe(config.recipe, pretrained=config.backbone_checkpoint is not None
                           or config.init_model is not None)
    return dataclasses.replace(
        config,
        recipe=recipe.name,
        lr=recipe.lr if config.lr is None else config.lr,
        backbone_lr_mult=recipe.backbone_lr_mult if config.backbone_lr_mult is None else config.backbone_lr_mult,
        warmup_iters=recipe.warmup_iters(config.iters) if config.warmup_iters is None else config.warmup_iters,
        grad_clip=recipe.grad_clip if config.grad_clip is None else config.grad_clip,
        ema_decay=recipe.ema_decay if config.ema_decay is None else config.ema_decay,
    )


def resolve_train_config(config: TrainConfig) -> TrainConfig:
    """Resolves ``version="latest"``, derives ``num_classes`` from the store and the recipe's settings
    (`resolve_recipe`).

    Raises:
        ValueError: ``config.num_classes`` is set and differs from the version's.
    """
    store = open_label_store(config.store)
    version = store.resolve_version(config.version)
    names, _ = version_classes(store, version)
    if config.num_classes is not None and config.num_classes != len(names):
        raise InputError(
            f"Expected num_classes {len(names)} (the classes of {version} in {config.store}: {names}). "
            f"Got {config.num_classes} instead."
        )
    val_every = config.val_every
    if val_every is None:
        has_val = "val" in store.splits() and bool(store.image_ids("val"))
        val_every = max(1, config.iters // VALIDATIONS_PER_RUN) if has_val else 0
    return resolve_recipe(dataclasses.replace(config, version=version, num_classes=len(names), val_every=val_every))


def model_config(config: TrainConfig) -> dict[str, Any]:
    """The ``config.json`` of checkpoints: what rebuilds the model and identifies its training data."""
    store = open_label_store(config.store)
    names, pseudo = version_classes(store, config.version)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": config.variant,
        "pixel_decoder": config.pixel_decoder,
        "num_classes": len(names),
        "class_names": names,
        "store_class_ids": store.versions()[config.version].model_class_ids,
        "pseudo_classes": sorted(pseudo),
        "test_scale": config.test_scale,
        "test_ratios": list(config.test_ratios),
        "test_window": max(config.crop_size) if config.test_window is None else config.test_window,
        "store": str(Path(config.store).resolve()),
        "store_name": store.info.get("name"),
        "label_version": config.version,
        "label_version_created": store.versions()[config.version].created,
        "train_config": config.to_dict(),
    }


def check_resumable(checkpoint: Path, expected: dict[str, Any]) -> None:
    """Raises `CheckpointError` (naming the checkpoint's config.json) when it belongs to another run."""
    found = read_model_config(checkpoint)
    path = checkpoint / CONFIG_FILE
    problems = [
        f"{key}: checkpoint {found.get(key)!r}, this run {expected[key]!r}"
        for key in ("variant", "pixel_decoder", "num_classes", "class_names", "label_version",
                    "label_version_created")
        if found.get(key) != expected[key]
    ]
    old, new = found.get("train_config", {}), expected["train_config"]
    problems += [
        f"train_config.{key}: checkpoint {old.get(key, LATER_FIELDS.get(key))!r}, this run {new[key]!r}"
        for key in sorted(new)
        if key not in RESUME_FREE_FIELDS and old.get(key, LATER_FIELDS.get(key)) != new[key]
    ]
    if problems:
        raise CheckpointError(
            f"Cannot resume from {path}: it belongs to another run:\n  " + "\n  ".join(problems)
        )


def run_name(config: TrainConfig) -> str:
    """The run-folder name the flows give a training run: version, variant, reweight, seed and iterations for
    people to read, then 8 hex digits (sha1 of the JSON, `models.hashing.json_hash`) of every field that makes
    the run what it is (all but `RESUME_FREE_FIELDS`; ``init_model`` as an absolute path; `LATER_FIELDS` by
    the value the recipe gives them, and only when it is not the one runs had before them). Two different runs
    never share a folder (one would refuse to resume the other's checkpoint), and a rerun of the same one
    resumes it; the digest must never change, or existing runs would not resume (tests/models/test_hashing.py
    pins it)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_FIELDS | set(LATER_FIELDS)}
    resolved = resolve_recipe(config)  # the recipe decides these fields' values when they are left None
    identity |= {k: getattr(resolved, k) for k, v in LATER_FIELDS.items() if getattr(resolved, k) != v}
    if config.init_model is not None:
        identity["init_model"] = str(Path(config.init_model).resolve())
    digest = json_hash(identity, algorithm="sha1", length=8)
    return f"{config.version}-{config.variant}-{config.reweight}-s{config.seed}-i{config.iters}-{digest}"
