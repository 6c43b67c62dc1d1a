"""Atomic training checkpoints: model weights (safetensors), model config (JSON) and the training state.

Layout of a run folder::

    RUN/latest.json                       {"step": 200, "path": "checkpoints/step_00000200"}, written last
    RUN/checkpoints/step_00000200/
        model.safetensors                 weights and buffers (``model.state_dict()``)
        config.json                       what rebuilds the model: variant, num_classes, class names, version
        training_state.pt                 optimizer, scheduler, RNG states (torch.save; read weights_only)
        manifest.json                     step, size and sha256 of every file above
    RUN/final/                            model.safetensors + config.json + manifest.json of the last step

A checkpoint folder is written under a temporary name, fsynced and renamed into place; ``latest.json`` is
replaced (temp file + ``os.replace``) only after that, so a kill at any moment leaves the previous checkpoint
intact and pointed to. Every load checks the manifest first, so a truncated or altered file is an error that
names the file rather than a deserializer message.
"""

from __future__ import annotations

import hashlib
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

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "addclass-massformer"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the run that tries to use it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """`atomic_write_bytes` of indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _state_dict_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": "pt"})


def _write_dir(final: Path, files: Mapping[str, bytes], *, step: int) -> Path:
    """Writes ``files`` and a manifest into a temp folder and renames it to ``final`` (replacing it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "files": {}
        }
        for name, data in files.items():
            _write_file(tmp / name, data)
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():  # e.g. a step re-run after a kill that came before latest.json moved on
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def save_model_dir(
    path: str | os.PathLike[str], *, model: nn.Module, config: Mapping[str, Any], step: int
) -> Path:
    """Atomically writes a model folder (weights + config.json + manifest), e.g. ``RUN/final``.

    Args:
        path: The folder to (re)place.
        model: The model; its full ``state_dict`` (parameters and buffers) is saved.
        config: JSON-serialisable model config (`tasks.train` writes variant, num_classes, class names, ...).
        step: Training step of the weights.

    Returns:
        The folder.
    """
    files = {
        MODEL_FILE: _state_dict_bytes(model),
        CONFIG_FILE: (json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode(),
    }
    return _write_dir(Path(path), files, step=step)


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
        config: JSON-serialisable model config (as for `save_model_dir`).
        training_state: ``torch.save``-able dict of tensors and plain containers (optimizer, scheduler, RNG),
            loadable with ``weights_only=True``.
        keep: Number of checkpoints up to this step to keep (older ones are deleted after ``latest.json``
            moved on); 0 keeps all. Folders of later steps (left by a kill between the rename of a checkpoint
            and the move of ``latest.json``, then resumed from the step before) are deleted too: they are not
            part of this run's history any more.

    Returns:
        The checkpoint folder.
    """
    import io

    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save(dict(training_state), buffer)
    files = {
        MODEL_FILE: _state_dict_bytes(model),
        CONFIG_FILE: (json.dumps(dict(config), indent=2, sort_keys=True) + "\n").encode(),
        STATE_FILE: buffer.getvalue(),
    }
    folder = _write_dir(run_dir / CHECKPOINTS_DIR / f"step_{step:08d}", files, step=step)
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


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint folder ``RUN/latest.json`` points to, or None when the run has no checkpoint yet.

    Raises:
        CheckpointError: ``latest.json`` is unreadable or points to a missing folder.
    """
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        info = json.loads(pointer.read_text())
        folder = Path(run_dir) / str(info["path"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Corrupt checkpoint pointer {pointer}: {e}.") from e
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint pointer {pointer} names {folder}, which does not exist.")
    return folder


def verify_dir(
    folder: str | os.PathLike[str], *, files: tuple[str, ...] = (MODEL_FILE, CONFIG_FILE)
) -> dict[str, Any]:
    """Checks the size and sha256 of ``files`` against the folder's manifest.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the first missing, truncated or altered file.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except FileNotFoundError as e:
        raise CheckpointError(
            f"Checkpoint manifest {manifest_path} is missing: not an addclass model folder."
        ) from e
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Corrupt checkpoint manifest {manifest_path}: {e}.") from e
    for name in files:
        path = folder / name
        if name not in entries:
            raise CheckpointError(f"Checkpoint file {path} is not listed in {manifest_path}.")
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} is missing.")
        size = path.stat().st_size
        if size != entries[name]["bytes"]:
            raise CheckpointError(
                f"Checkpoint file {path} is corrupt (truncated?): {size} bytes, "
                f"expected {entries[name]['bytes']}."
            )
        if _sha256(path) != entries[name]["sha256"]:
            raise CheckpointError(
                f"Checkpoint file {path} is corrupt: its sha256 differs from {manifest_path}."
            )
    return dict(manifest)


def read_model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a model or checkpoint folder (checked against the manifest)."""
    folder = Path(folder)
    verify_dir(folder, files=(CONFIG_FILE,))
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"Corrupt checkpoint config {path}: {e}.") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} config (format {config.get('format')!r}).")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {config['format_version']}, newer than this addclass reads "
            f"({FORMAT_VERSION}). Upgrade addclass."
        )
    return dict(config)


def load_model_weights(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Loads ``model.safetensors`` of a verified folder into ``model`` (strict; shapes checked).

    Raises:
        CheckpointError: the file is corrupt or does not fit the model (the message names the file).
    """
    from models.massformer.weights import load_checkpoint

    folder = Path(folder)
    verify_dir(folder, files=(MODEL_FILE,))
    path = folder / MODEL_FILE
    try:
        load_checkpoint(model, path, strict=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"Cannot load model weights {path}: {e}") from e


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
