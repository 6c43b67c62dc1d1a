"""`addclass demo`: a synthetic store, the add-class flow on it, and the comparison it ends with."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, cast

from addclass.flows.add_class import add_class
from addclass.flows.choices import RecipeChoice
from addclass.flows.params import LabelingParams, TrainingParams
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.demo import DemoConfig, comparison_lines, pseudo_label_scores
from addclass.tasks.evaluation.evaluation_results import ModelEvaluation
from addclass.tasks.labels.pseudo_label import LabelerConfig


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Ingest, add "car" to the base model (`DemoConfig.base_model`), compare; returns the add-class result plus
    ``comparison`` and ``seconds``."""
    t0 = time.time()
    out = Path(config.out)
    store = out / "store.zarr"
    runs = Path(f"{store}.runs")
    if runs.exists() and not (store / "zarr.json").is_file():
        raise FileExistsError(f"{runs} exists without the demo's store next to it; remove it or pick another --out.")
    ingest_synthetic(store, images=config.images, size=config.size, seed=config.seed, overwrite=True,
                     progress=config.progress)
    shutil.rmtree(runs, ignore_errors=True)  # the runs of the store just replaced
    training = TrainingParams(variant="tiny", iters=config.iters, batch_size=2, crop_size=config.crop,
                              num_points=config.points, num_workers=0, seed=config.seed,
                              scale_range=config.scale_range, test_scale=config.test_scale,
                              test_ratios=config.test_ratios, recipe=cast(RecipeChoice, config.recipe), lr=config.training_lr,
                              val_every=config.val_every)
    result = add_class(prompt="car", store=str(store), labeling=LabelingParams(kind="simulated"),
                       training=training, init_model=config.base_model, eval_splits=["val", "test"])
    evaluation = ModelEvaluation.from_dict(json.loads(Path(result["report"]["metrics.json"]).read_text())["model"])
    model_test = evaluation.split("test").new_classes["car"]
    labeler = LabelerConfig(kind="simulated", seed=config.seed)
    pseudo_test = pseudo_label_scores(store, class_name="car", split="test", labeler=labeler)
    model_name = "model (7-class base + car, fine-tuned)" if config.base_model else "model (tiny, trained from scratch)"
    lines = comparison_lines(model=model_test, pseudo=pseudo_test, split="test", class_name="car",
                             model_name=model_name)
    return {**result, "store": str(store), "comparison": {"model": model_test, "pseudo": pseudo_test,
                                                          "lines": lines}, "seconds": time.time() - t0}
