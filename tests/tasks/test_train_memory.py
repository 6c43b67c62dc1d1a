"""The memory preflight of training (tasks/training/train_memory.py): the estimate bounds a measured peak, and a run that
cannot fit is refused in one line, before anything is built."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from addclass.cli.main import main
from addclass.tasks.training.train_memory import ENV_SWITCH, check_train_memory, estimate_train_bytes

REPO = Path(__file__).resolve().parents[2]


def test_estimate_grows_with_the_pixels_of_a_step() -> None:
    small = estimate_train_bytes(variant="tiny", batch_size=2, crop_size=(256, 256))
    assert estimate_train_bytes(variant="tiny", batch_size=4, crop_size=(256, 256)) > small
    assert estimate_train_bytes(variant="tiny", batch_size=2, crop_size=(512, 256)) > small
    assert estimate_train_bytes(variant="r50", batch_size=2, crop_size=(256, 256)) > small
    with pytest.raises(ValueError, match="variant"):
        estimate_train_bytes(variant="vit", batch_size=2, crop_size=(256, 256))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status (Linux)")
def test_estimate_bounds_the_measured_peak_of_two_steps() -> None:
    code = textwrap.dedent("""
        import json, torch
        from addclass.models.build import MODEL_BUILDERS
        from addclass.models.training.criterion import build_criterion
        from addclass.models.training.targets import build_targets
        torch.manual_seed(0)
        model = MODEL_BUILDERS["tiny"](num_classes=8).train()
        crit = build_criterion(num_classes=8, num_points=2048)
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(2):
            labels = torch.randint(0, 8, (2, 256, 256))
            losses = crit(model(torch.randn(2, 3, 256, 256)), [build_targets(x, pseudo_classes={7}) for x in labels])
            opt.zero_grad(); sum(losses.values()).backward(); opt.step()
        # VmHWM: this process's own peak (ru_maxrss would include the forking parent's pages, e.g. pytest's)
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps(int(hwm.split()[1]) * 1024))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    peak = json.loads(p.stdout.strip().splitlines()[-1])
    estimate = estimate_train_bytes(variant="tiny", batch_size=2, crop_size=(256, 256))
    assert peak <= estimate <= 2 * peak, (peak, estimate)  # an upper bound, and not a wild one


def test_a_run_that_cannot_fit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("addclass.tasks.training.train_memory.available_bytes", lambda device: 4 * 2**30)
    with pytest.raises(MemoryError, match=r"needs about .* GB on cpu, and 4.0 GB is free.*--batch-size"):
        check_train_memory(variant="tiny", batch_size=16, crop_size=(1024, 1024), device=torch.device("cpu"))
    check_train_memory(variant="tiny", batch_size=2, crop_size=(64, 64), device=torch.device("cpu"))  # fits
    monkeypatch.setenv(ENV_SWITCH, "0")
    check_train_memory(variant="tiny", batch_size=16, crop_size=(1024, 1024), device=torch.device("cpu"))


def test_cli_refuses_before_building_anything(tmp_path: Path, synthetic_store: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", str(synthetic_store), "--variant", "r50", "--batch-size", "64", "--crop-size", "4096",
               "--device", "cpu", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("addclass: error: A r50 run with batch_size 64") and "Traceback" not in err
    assert not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists()
