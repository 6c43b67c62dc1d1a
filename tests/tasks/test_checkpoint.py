"""Checkpoint folders: pruning never removes the current history, and a kill's leftovers are cleaned up."""

from __future__ import annotations

from pathlib import Path

import torch

from addclass.tasks.model_files.model_folder import CHECKPOINTS_DIR, LATEST_FILE, latest_checkpoint
from addclass.tasks.training.checkpoint import atomic_write_json, remove_partial_writes, save_checkpoint


def _save(run: Path, step: int, keep: int) -> Path:
    return save_checkpoint(run, step=step, model=torch.nn.Linear(2, 2), config={"variant": "test"},
                           training_state={"step": step}, keep=keep)


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir())


def test_a_resume_behind_a_stale_later_checkpoint_keeps_its_own_history(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _save(run, 1000, keep=1)
    _save(run, 2000, keep=2)
    # a kill between the rename of step 2000 and the move of latest.json (so before any pruning): latest still
    # names step 1000
    atomic_write_json(run / LATEST_FILE, {"step": 1000, "path": str(first.relative_to(run))})
    assert latest_checkpoint(run) == first
    # the resumed run checkpoints more often (checkpoint_every may change on resume)
    current = _save(run, 1500, keep=1)
    assert latest_checkpoint(run) == current and _steps(run) == ["step_00001500"]  # the stale 2000 is gone
    _save(run, 2000, keep=2)
    assert _steps(run) == ["step_00001500", "step_00002000"]


def test_partial_writes_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept = _save(run, 3, keep=0)
    leftovers = [run / CHECKPOINTS_DIR / ".step_00000004.tmp-1a2b3c4d", run / ".final.tmp-99887766",
                 run / CHECKPOINTS_DIR / ".step_00000003.trash-0f0f0f0f"]
    for p in leftovers:
        p.mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"partial")
    assert sorted(remove_partial_writes(run)) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and kept.is_dir() and latest_checkpoint(run) == kept
