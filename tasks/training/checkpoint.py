"""Training checkpoints: a model folder plus the training state, the run's ``latest.json``, and atomic writes.

Layout of a run folder::

    RUN/latest.json                       {"step": 200, "path": "checkpoints/step_00000200"}, written last
    RUN/checkpoints/step_00000200/
        model.safetensors                 weights and buffers (``model.state_dict()``)
        config.json                       what rebuilds the model: variant, num_classes, class names, version
        training_state.pt                 optimizer, scheduler, RNG states (torch.save; read weights_only)
        manifest.json                     step, size and sha256 of every file above
    RUN/final/                            model.safetensors + config.json + manifest.json of the last step

A checkpoint folder is a model folder (`tasks.model_files.model_folder`, which writes it atomically, verifies, finds
and loads it) with ``training_state.pt`` added; ``latest.json`` is replaced (temp file + ``os.replace``) only
after the folder is in place, so a kill at any moment leaves the previous checkpoint intact and pointed to.
The training state is checked against the folder's manifest before it is read, as the weights are.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from addclass.tasks.model_files.model_folder import (
    CHECKPOINTS_DIR,
    LATEST_FILE,
    CheckpointError,
    fsync_dir,
    save_model_dir,
    verify_dir,
)

STATE_FILE = "training_state.pt"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to a temp file next to ``path``, fsyncs it and renames it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """`atomic_write_bytes` of indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    config: Mapping[str, Any],
    training_state: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Writes ``RUN/checkpoints/step_XXXXXXXX`` atomically, then points ``RUN/latest.json`` at it.

    Args:
        run_dir: The run folder.
        step: Completed training steps.
        model: The model.
        config: JSON-serialisable model config (as for `tasks.model_files.model_folder.save_model_dir`).
        training_state: ``torch.save``-able dict of tensors and plain containers (optimizer, scheduler, RNG),
            loadable with ``weights_only=True``.
        keep: Number of checkpoints up to this step to keep (older ones are deleted after ``latest.json``
            moved on); 0 keeps all. Folders of later steps (left by a kill between the rename of a checkpoint
            and the move of ``latest.json``, then resumed from the step before) are deleted too: they are not
            part of this run's history any more.

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save(dict(training_state), buffer)
    folder = save_model_dir(run_dir / CHECKPOINTS_DIR / f"step_{step:08d}", model=model, config=config,
                            step=step, extra_files={STATE_FILE: buffer.getvalue()})
    atomic_write_json(run_dir / LATEST_FILE, {"step": step, "path": str(folder.relative_to(run_dir))})
    steps = sorted((int(p.name[len("step_"):]), p) for p in (run_dir / CHECKPOINTS_DIR).glob("step_*")
                   if p.name[len("step_"):].isdigit())
    stale = [p for s, p in steps if s > step]
    history = [p for s, p in steps if s <= step]  # ends with `folder`, which is never deleted
    for old in stale + (history[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    return folder


def remove_partial_writes(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary and trash folders a kill during a checkpoint or model write leaves behind
    (``.NAME.tmp-*``, ``.NAME.trash-*``: never a complete checkpoint). Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for parent in (run_dir, run_dir / CHECKPOINTS_DIR):
        for p in sorted(parent.glob(".*.tmp-*")) + sorted(parent.glob(".*.trash-*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def load_training_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``training_state.pt`` of a verified checkpoint folder, read with ``weights_only=True``."""
    folder = Path(folder)
    verify_dir(folder, files=(STATE_FILE,))
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types; all mean the same here
        raise CheckpointError(f"Cannot read training state {path}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"Training state {path} holds a {type(state).__name__}, expected a dict.")
    return state


def get_rng_state(*, generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, numpy, python ``random``) and named generators, weights_only-safe.

    Args:
        generators: Extra generators (e.g. the criterion's point sampler), saved by name.
    """
    np_state = cast(tuple[Any, ...], np.random.get_state())  # the legacy tuple (name, keys, pos, ...)
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    state: Mapping[str, Any], *, generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restores what `get_rng_state` saved (CUDA states only when CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"The checkpoint has no state for the RNG {name!r}.")
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():  # as many GPUs as both runs see (CUDA_VISIBLE_DEVICES)
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)
