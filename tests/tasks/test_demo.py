"""The demo: its pseudo labels stay as good as Grounded-SAM's, its test-split comparison writes nothing, and the
command ends with the comparison."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from addclass.storage.pseudo import pseudo_runs
from addclass.storage.store import open_label_store
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.demo import DemoConfig, comparison_lines, pseudo_label_scores
from addclass.tasks.labels.pseudo_label import LabelerConfig
from tests.evaluations import class_result

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_pseudo_labels_score_like_grounded_sam_and_are_never_stored(tmp_path: Path) -> None:
    d = DemoConfig()
    store = ingest_synthetic(tmp_path / "demo.zarr", images=d.images, size=d.size, seed=d.seed, progress=False)
    labeler = LabelerConfig(kind="simulated", seed=d.seed)
    scores = {split: pseudo_label_scores(store, class_name="car", split=split, labeler=labeler)
              for split in ("val", "test")}
    for split, s in scores.items():
        # Grounded-SAM scores car IoU 94.18 on MaSS13K: the demo's labeler must not win by being worse
        assert s.iou is not None and s.iou >= 0.85, (split, s.iou)
        assert s.biou is not None and 0 < s.biou < 1 and s.summary.num_images == 8
    assert pseudo_runs(open_label_store(store)) == {}  # scoring wrote no pseudo label
    with pytest.raises(ValueError, match="simulated"):
        pseudo_label_scores(store, class_name="car", split="test", labeler=LabelerConfig(kind="grounded-sam"))


def test_comparison_lines_say_which_edges_are_sharper() -> None:
    pseudo = class_result("car", 0.92, 0.62, 0.80, num_images=8)
    model = class_result("car", 0.97, 0.67, 0.99, num_images=8)
    lines = comparison_lines(model=model, pseudo=pseudo, split="test", class_name="car")
    assert lines[0] == "car on the 8 test images, against their exact masks:"
    assert lines[2].split()[-3:] == ["92.00", "62.00", "0.8000"] and lines[3].split()[-3:] == ["97.00", "67.00",
                                                                                              "0.9900"]
    assert "model BIoU > pseudo-label BIoU" in lines[4]
    worse = comparison_lines(model=replace(model, biou=0.5), pseudo=pseudo, split="test", class_name="car")
    assert "model BIoU <= pseudo-label BIoU" in worse[4] and "not sharper" in worse[4]


@pytest.mark.slow
def test_the_demo_command_ends_with_the_comparison(tmp_path: Path) -> None:
    # a subprocess, as users run it: the temporary Prefect server it starts is stopped at that process's exit
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "addclass.cli.main", "demo", "--out", str(out), "--images", "10",
                           "--iters", "4", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.rstrip().splitlines()
    assert printed[-6] == "car on the 2 test images, against their exact masks:"
    assert printed[-1] == "  * made on test for this comparison only; they trained nothing"
    assert (out / "store.zarr").is_dir()
    runs = list((out / "store.zarr.runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "learning_curve.png").is_file()
    assert (runs[0] / "report" / "learning_curve.png").is_file()
