"""The product's path learns: the shipped 7-class base model, fine-tuned on a label version that adds car (the
demo's pseudo labels), predicts car on val after a short run, and keeps its 7 classes.

A trained claim, so it trains (CPU, ~1 min): 100 steps of the demo's fine-tuning (the scratch recipe at lr
1e-3, batch 2, 256 crops) on 12 synthetic scenes, scored at scale 2 alone. Measured here: val car IoU 0.74,
7-class mIoU 0.85; the bounds leave a wide margin below that and sit far above what a model that does not learn
car scores (0: the base model knows no car, and a new class head row starts untrained).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from addclass.models.pretrained import DEMO_BASE
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.demo import FINE_TUNE_LR, DemoConfig
from addclass.tasks.evaluation.evaluate import evaluate_model
from addclass.tasks.labels.merge import merge
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label
from addclass.tasks.training.train import TrainConfig, train


@pytest.mark.slow
def test_the_base_model_learns_car_in_a_short_fine_tune(tmp_path: Path) -> None:
    d = DemoConfig()
    store = ingest_synthetic(tmp_path / "s.zarr", images=12, size=d.size, seed=d.seed, progress=False)
    labeler = LabelerConfig(kind="simulated", seed=d.seed)
    for split in ("train", "val"):
        pseudo_label(store, prompt="car", split=split, labeler=labeler, batch_size=8, progress=False)
    version = merge(store, classes="car", parent="v1", policy="carve-others", allow_partial=True, progress=False)
    config = TrainConfig(store=str(store), out_dir=str(tmp_path / "run"), version=version, variant="tiny",
                         iters=100, batch_size=2, crop_size=(d.crop, d.crop), scale_range=d.scale_range,
                         num_points=d.points, checkpoint_every=100, seed=0, device="cpu", num_workers=0,
                         val_every=0, test_scale=d.test_scale, test_ratios=(1.0,), recipe=d.recipe,
                         lr=FINE_TUNE_LR, init_model=str(DEMO_BASE))
    final = train(config, progress=False)
    val = evaluate_model(store, final, splits=("val",), progress=False).split("val")
    car, miou7 = val.new_classes["car"], val.precise.miou
    print(f"fine-tune: val car IoU {car.iou}, 7-class mIoU {miou7}")
    assert car.iou is not None and car.iou >= 0.5, car.iou
    assert miou7 is not None and miou7 >= 0.6, miou7
