"""The labeler table (`models.labelers.build.LABELERS`): every entry builds a `Labeler` that labels an image."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from addclass.models.labelers.base import Labeler
from addclass.models.labelers.build import LABELER_KINDS, LABELERS, LabelerConfig, LabelerEntry, LabelerKind
from addclass.models.labelers.label_record import LabelRecord
from addclass.tasks.labels.pseudo_label import validate_labeler

REPO = Path(__file__).resolve().parents[2]
H, W = 72, 96
# A cheap configuration per kind (a new kind fails test_every_kind_has_a_test_config until it gets one here).
TEST_CONFIGS = {
    "grounded-sam": LabelerConfig(kind="grounded-sam", sam_variant="tiny", dino_config="test", random_weights=True,
                                  dino_image_size=256, max_boxes=3, box_threshold=0.0),
    "simulated": LabelerConfig(kind="simulated", seed=1, simulated={"miss_prob": 0.0, "bleed_prob": 0.0}),
}


@pytest.fixture(scope="module")
def built() -> dict[str, Labeler]:
    """kind -> its labeler, built once for the module (Grounded-SAM's models take seconds)."""
    return {}


def _labeler(built: dict[str, Labeler], kind: str) -> Labeler:
    if kind not in built:
        built[kind] = LABELERS[kind].build(TEST_CONFIGS[kind])
    return built[kind]


def _reference() -> np.ndarray:
    ref = np.zeros((H, W), bool)
    ref[10:40, 20:60] = True
    ref[50:70, 70:90] = True
    return ref


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_every_kind_has_a_test_config() -> None:
    assert set(TEST_CONFIGS) == set(LABELERS)


def test_kinds_literal_and_tuple_match_the_table() -> None:
    assert LABELER_KINDS == tuple(LABELERS) == ("grounded-sam", "simulated")
    assert set(get_args(LabelerKind)) == set(LABELER_KINDS)
    with pytest.raises(ValueError, match=r"^Expected labeler 'grounded-sam' or 'simulated'\. Got 'sam9' instead\.$"):
        LabelerConfig(kind="sam9")  # type: ignore[arg-type]


def test_kinds_load_without_torch() -> None:
    """The CLI takes its --labeler choices from LABELER_KINDS before loading any model code."""
    code = ("import sys; from addclass.models.labelers.build import LABELER_KINDS; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules); "
            "print(','.join(LABELER_KINDS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "grounded-sam,simulated"


@pytest.mark.parametrize("kind", LABELER_KINDS)
def test_entry_builds_a_labeler(kind: str, built: dict[str, Labeler]) -> None:
    """timm-style: every table entry builds an object satisfying the `Labeler` protocol that labels an image."""
    config = TEST_CONFIGS[kind]
    entry = LABELERS[kind]
    assert isinstance(entry, LabelerEntry) and config.entry is entry
    validate_labeler(config)  # a buildable config passes its check
    labeler = _labeler(built, kind)
    assert isinstance(labeler, Labeler)
    settings = labeler.settings()
    assert isinstance(settings["labeler"], str) and settings["simulated"] is entry.reads_reference
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    reference = _reference() if entry.reads_reference else None
    record = labeler.label(image, "car", image_sha256="0" * 64, reference_mask=reference)
    assert isinstance(record, LabelRecord) and record.mask.shape == (H, W) and record.mask.dtype == bool
    assert len(record.phrases) == len(record.scores) == len(record.boxes) == record.num_instances
    assert set(entry.recorded_flags) <= set(config.to_dict())
    assert entry.config_fields is None or set(entry.config_fields) == set(config.to_dict())


@pytest.mark.parametrize("kind", LABELER_KINDS)
def test_reference_mask_only_where_the_entry_reads_one(kind: str, built: dict[str, Labeler]) -> None:
    """A labeler refuses a missing reference it needs, and a reference it does not read."""
    entry = LABELERS[kind]
    labeler = _labeler(built, kind)
    image = np.zeros((H, W, 3), np.uint8)
    wrong = None if entry.reads_reference else _reference()
    with pytest.raises(ValueError, match="reference"):
        labeler.label(image, "car", reference_mask=wrong)


def test_grounded_sam_needs_the_image(built: dict[str, Labeler]) -> None:
    labeler = _labeler(built, "grounded-sam")
    with pytest.raises(ValueError, match="image_rgb=None"):
        labeler.label(None, "car")


def test_simulated_config_keys_only_its_fields() -> None:
    """Detector settings never enter the simulated labeler's resume key (the key is pinned in stores)."""
    config = LabelerConfig(kind="simulated", seed=2, simulated={"low_res": 64}, box_threshold=0.9, device="cuda")
    assert config.to_dict() == {"kind": "simulated", "seed": 2, "simulated": {"low_res": 64}}
    assert config.resume_settings() == config.to_dict()
    gs = LabelerConfig(kind="grounded-sam", device="cuda")
    assert "device" in gs.to_dict() and "device" not in gs.resume_settings() and "simulated" in gs.to_dict()


def test_detection_tiles_and_mask_cleanup_key_the_run_only_when_on() -> None:
    """Runs labelled before these options existed keep their resume key; turning one on changes it."""
    plain = LabelerConfig(kind="grounded-sam")
    assert not {"tile_size", "tile_overlap", "min_region_area"} & set(plain.resume_settings())
    tiled = LabelerConfig(kind="grounded-sam", tile_size=512, tile_overlap=64)
    assert {k: tiled.resume_settings()[k] for k in ("tile_size", "tile_overlap")} == {"tile_size": 512,
                                                                                      "tile_overlap": 64}
    assert LabelerConfig(kind="grounded-sam", min_region_area=50).resume_settings()["min_region_area"] == 50
    assert "tile_size" not in LabelerConfig(kind="simulated", tile_size=512).resume_settings()
    with pytest.raises(ValueError, match="tile_overlap <= tile_size / 2"):
        LabelerConfig(kind="grounded-sam", tile_size=256, tile_overlap=200)
    with pytest.raises(ValueError, match="min_region_area >= 0"):
        LabelerConfig(kind="grounded-sam", min_region_area=-1)
