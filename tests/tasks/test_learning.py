"""A learning regression fails CI: the tiny model must learn the new class from its pseudo labels.

A fixed synthetic store (`tasks.data.synthetic_scenes`, small scenes) gets simulated Grounded-SAM pseudo labels of
car on train and val, merged with carve-others, exactly as the demo does. The tiny MaSSFormer trains from
scratch with the default (scratch) recipe for `ITERS` steps and must reach `CAR_IOU_FLOOR` car IoU on val
against the exact masks. Measured on the 2-core machines (docs/recipes.md): the scratch recipe reaches
52.5 % in 200 steps on one, 46.5 % in 200 and in 120 steps (48.5 % in 150) on another, whose steps are 2.3x
slower (46.3 % in 120 with a weight average, `ema_decay` 0.99); the paper recipe (meant for pretrained backbones)
0.05 % in 200. At 120 steps from random weights the score depends on the CPU's rounding: the same code and
seed reached 41.0 % on one 2-core AMD EPYC machine and 19.8 % on another (ef020de and its successor, both
checked). The floor (10 %) sits 200x above the paper recipe's 0.05 % and at half the lowest learning run seen,
so a recipe or model change that stops learning fails here on any of them. 120 steps: 109 s of
training and evaluation on the slower machine (~50 s on the faster one).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.evaluation.evaluate import evaluate_model
from addclass.tasks.labels.merge import merge
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
from addclass.tasks.training.train import TrainConfig, train

ITERS = 120
CAR_IOU_FLOOR = 0.10
SECONDS_BUDGET = 240  # the test's own training and evaluation; generous for a loaded CI machine


@pytest.fixture(scope="module")
def car_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("learning") / "scenes.zarr"
    ingest_synthetic(path, images=30, size=(256, 384), seed=11, progress=False)
    labeler = LabelerConfig(kind="simulated", seed=0)
    for split in ("train", "val"):
        pseudo_label(path, prompt="car", split=split, labeler=labeler, progress=False)
    merge(path, classes="car", parent="v1", policy="carve-others", allow_partial=True, progress=False)
    return path


def config(store: Path, out: Path, **overrides: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        store=str(store), out_dir=str(out), version="v2", variant="tiny", iters=ITERS, batch_size=2,
        crop_size=(256, 256), scale_range=(0.75, 1.5), num_points=2048,
        checkpoint_every=ITERS, keep_checkpoints=1, seed=0, device="cpu", num_workers=0, val_every=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)  # type: ignore[arg-type]


def car_iou(store: Path, final: Path) -> float:
    result = evaluate_model(store, final, splits=("val",), progress=False)
    return float(result.split("val").new_classes["car"].iou or 0.0)


def test_the_tiny_model_learns_the_new_class_from_pseudo_labels(car_store: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    final = train(config(car_store, tmp_path / "run"), progress=False)
    seconds = time.perf_counter() - t0
    iou = car_iou(car_store, final)
    print(f"scratch recipe: car IoU {100 * iou:.1f} % on val after {ITERS} steps ({seconds:.0f} s)")
    assert iou >= CAR_IOU_FLOOR, f"car IoU {iou:.3f} < {CAR_IOU_FLOOR} after {ITERS} steps: the model stopped learning"
    assert seconds < SECONDS_BUDGET
