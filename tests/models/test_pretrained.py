"""The shipped 7-class base model of the demo (`addclass.models.pretrained.DEMO_BASE`): intact, loadable, scoring
on the demo's val images what docs/quickstart.md states, and ready to have car added as a user's model is."""

from __future__ import annotations

from pathlib import Path

import torch

from addclass.models.hashing import file_sha256
from addclass.models.pretrained import DEMO_BASE, DEMO_BASE_SHA256, DEMO_BASE_VAL_MIOU
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.demo import DemoConfig
from addclass.tasks.evaluation.evaluate import evaluate_model
from addclass.tasks.model_files.model_folder import build_model, init_from_model, read_model_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_file_is_the_one_the_docs_record() -> None:
    weights = DEMO_BASE / "model.safetensors"
    assert file_sha256(weights) == DEMO_BASE_SHA256
    assert weights.stat().st_size <= 12 * 2**20
    assert DEMO_BASE_SHA256 in (ROOT / "docs" / "quickstart.md").read_text()
    assert f"{DEMO_BASE_VAL_MIOU:.2f}" in (ROOT / "docs" / "quickstart.md").read_text()
    config = read_model_config(DEMO_BASE)
    assert config["class_names"] == ["others", "human", "building", "vegetation", "ground", "sky", "water"]
    assert config["store"] is None and "out_dir" not in config["train_config"]  # no path of the machine it came from


def test_it_scores_the_stated_miou_on_the_demos_val_images(tmp_path: Path) -> None:
    d = DemoConfig()
    assert d.base_model == str(DEMO_BASE)
    store = ingest_synthetic(tmp_path / "demo.zarr", images=d.images, size=d.size, seed=d.seed, progress=False)
    result = evaluate_model(store, DEMO_BASE, splits=("val",), progress=False)
    miou = 100 * result.split("val").precise.miou
    # the same weights on another CPU differ in the last digits of their arithmetic, not by a point
    assert abs(miou - DEMO_BASE_VAL_MIOU) < 1.0, miou


def test_car_is_added_as_a_new_row_and_every_other_weight_is_kept() -> None:
    config = read_model_config(DEMO_BASE)
    names = [*config["class_names"], "car"]
    model = build_model({**config, "num_classes": 8, "class_names": names})
    fresh = init_from_model(model, DEMO_BASE, expected={**config, "class_names": names, "num_classes": 8})
    assert fresh == ["car"]
    base = build_model(config)
    from addclass.tasks.model_files.model_folder import load_model_weights

    load_model_weights(base, DEMO_BASE)
    kept = dict(base.state_dict())
    for name, value in model.state_dict().items():
        if value.shape == kept[name].shape:  # everything but the class head's rows
            assert torch.equal(value, kept[name].to(value.dtype)), name
