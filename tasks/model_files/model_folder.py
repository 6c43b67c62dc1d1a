"""Model folders: the one module that saves, verifies, finds and loads a trained model.

A model folder holds::

    model.safetensors     weights and buffers (``model.state_dict()``)
    config.json           what rebuilds the model: variant, pixel decoder, num_classes, class names, their
                          store ids, label version, test_scale, training config
    manifest.json         step, size and sha256 of every file of the folder

``RUN/final/`` of a training run is one, and so is each of its checkpoints ``RUN/checkpoints/step_XXXXXXXX/``
(which also holds ``training_state.pt``; `tasks.training.checkpoint` writes and reads that, and ``RUN/latest.json``,
which names the newest). A folder is written under a temporary name, fsynced and renamed into place, so a kill
at any moment leaves the previous one intact. Every load checks the manifest first, so a truncated or altered
file is an error that names the file rather than a deserializer message.

A path to a model is a model folder or a run folder (its ``final/``, else its latest checkpoint:
`resolve_model_dir`); `tasks.model_files.model_registry.resolve_init_model` turns the store's ``"champion"`` into its
folder. Two errors: FileNotFoundError when nothing trained is at a path, and `CheckpointError` for every other
reason a folder is not a usable model (no manifest, a corrupt file, a config that is not an addclass model's,
weights that do not fit it, a model that does not fit the run that uses it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from addclass.common.errors import InputError, UserError
from addclass.models.build import MODEL_BUILDERS, default_pixel_decoder, pixel_decoder_problem
from addclass.models.hashing import bytes_sha256, file_sha256
from addclass.models.massformer.model import MaSSFormer
from addclass.models.weights import load_checkpoint, load_with_new_classes

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
FINAL_DIR = "final"
LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "addclass-massformer"
FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError, ValueError):
    """A model or checkpoint folder is corrupt, is not an addclass model, or does not fit the run or model
    that tries to use it; the message names the file.

    Also a ValueError: a folder that cannot be used is a bad input, as the ValueErrors it replaces were (an
    unknown variant in ``config.json``, an ``init_model`` of another variant).
    """


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries to disk (fsync), so the renames in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


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
            manifest["files"][name] = {"bytes": len(data), "sha256": bytes_sha256(data)}
        _write_file(tmp / MANIFEST_FILE, _json_bytes(manifest))
        fsync_dir(tmp)
        if final.exists():  # e.g. a step re-run after a kill that came before latest.json moved on
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def save_model_dir(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    config: Mapping[str, Any],
    step: int,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Atomically writes a model folder (weights + config.json + manifest), e.g. ``RUN/final``.

    Args:
        path: The folder to (re)place.
        model: The model; its full ``state_dict`` (parameters and buffers) is saved.
        config: JSON-serialisable model config (`tasks.training.train_config.model_config`: variant, num_classes, class
            names, ...).
        step: Training step of the weights.
        extra_files: Further files of the folder by name, listed in the manifest too (a checkpoint's
            ``training_state.pt``, `tasks.training.checkpoint.save_checkpoint`).

    Returns:
        The folder.
    """
    files = {MODEL_FILE: _state_dict_bytes(model), CONFIG_FILE: _json_bytes(dict(config))}
    files.update(extra_files or {})
    return _write_dir(Path(path), files, step=step)


def verify_dir(
    folder: str | os.PathLike[str], *, files: tuple[str, ...] = (MODEL_FILE, CONFIG_FILE)
) -> dict[str, Any]:
    """Checks the size and sha256 of ``files`` against the folder's manifest.

    Args:
        folder: A model or checkpoint folder.
        files: The files to check.

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
        if file_sha256(path) != entries[name]["sha256"]:
            raise CheckpointError(
                f"Checkpoint file {path} is corrupt: its sha256 differs from {manifest_path}."
            )
    return dict(manifest)


def _config_problem(config: Mapping[str, Any]) -> str | None:
    """What keeps `build_model` and the class matching from using ``config``, or None."""
    variant, decoder = config.get("variant"), config.get("pixel_decoder")
    if not isinstance(variant, str) or variant not in MODEL_BUILDERS:
        return f"variant {variant!r}; this addclass builds {sorted(MODEL_BUILDERS)}"
    if decoder is not None and not isinstance(decoder, str):
        return f"pixel_decoder {decoder!r}, not a name"
    problem = pixel_decoder_problem(variant, decoder)
    if problem is not None:
        return problem
    k, names = config.get("num_classes"), config.get("class_names")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return f"num_classes {k!r}, not an integer >= 1"
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names):
        return f"class_names {names!r}, not a list of {k} names"
    scale = config.get("test_scale", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
        return f"test_scale {scale!r}, not a number > 0"
    ratios = config.get("test_ratios", [1.0])
    if not isinstance(ratios, list) or not ratios or not all(
            isinstance(r, int | float) and not isinstance(r, bool) and r > 0 for r in ratios):
        return f"test_ratios {ratios!r}, not a non-empty list of numbers > 0"
    window = config.get("test_window", 0)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        return f"test_window {window!r}, not an integer >= 0"
    return None


def read_model_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a model or checkpoint folder, checked against the manifest.

    Args:
        folder: A model or checkpoint folder (not a run folder: `resolve_model_dir` finds that one's).

    Returns:
        The config; `build_model` builds the model it describes.

    Raises:
        CheckpointError: the config is missing, corrupt, not an addclass model's, newer than this addclass
            reads, or describes a model this addclass does not build.
    """
    folder = Path(folder)
    verify_dir(folder, files=(CONFIG_FILE,))
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"Corrupt checkpoint config {path}: {e}.") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else config
        raise CheckpointError(f"{path} is not an {FORMAT} config (format {found!r}).")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {config['format_version']}, newer than this addclass reads "
            f"({FORMAT_VERSION}). Upgrade addclass."
        )
    problem = _config_problem(config)
    if problem is not None:
        raise CheckpointError(f"{path} does not describe a model this addclass builds: {problem}.")
    return dict(config)


def build_model(config: Mapping[str, Any]) -> MaSSFormer:
    """Builds the untrained model a model config describes, with its ``test_scale``, ``test_ratios`` and
    ``test_window``.

    Args:
        config: A model folder's config (`read_model_config`) or a run's (`tasks.training.train_config.model_config`).

    Returns:
        The model, randomly initialised.

    Raises:
        ValueError: an unknown variant (`read_model_config` rejects such a folder already).
    """
    variant = config["variant"]
    if variant not in MODEL_BUILDERS:
        raise InputError(f"Unknown model variant {variant!r}; this addclass knows {sorted(MODEL_BUILDERS)}.")
    # Folders from before the key are MaSSFormer's ("hr"), which is also the default of those variants.
    pixel_decoder = config.get("pixel_decoder") or default_pixel_decoder(variant)
    model = MODEL_BUILDERS[variant](int(config["num_classes"]), pixel_decoder=pixel_decoder)
    model.test_scale = float(config.get("test_scale", 1.0))  # folders from before test_scale: 1
    model.test_ratios = tuple(float(r) for r in config.get("test_ratios", [1.0]))  # from before: one scale
    model.test_window = int(config.get("test_window", 0))  # folders from before test_window: whole images
    return model


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint folder ``RUN/latest.json`` points to.

    Args:
        run_dir: A run folder.

    Returns:
        The folder, or None when the run has no checkpoint yet.

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


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """The model folder of a path: the path itself, or a run folder's ``final/``, else its latest checkpoint.

    Args:
        path: A model or checkpoint folder, or a run folder.

    Returns:
        The model folder (not verified yet: the loads check it).

    Raises:
        FileNotFoundError: nothing trained at ``path``.
        CheckpointError: the run's ``final/`` lacks its weights, or its ``latest.json`` is unreadable or points
            to a missing folder.
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return path
    if (path / FINAL_DIR / MODEL_FILE).is_file():
        return path / FINAL_DIR
    if (path / FINAL_DIR).is_dir():  # a damaged final model: never fall back to an older checkpoint silently
        raise CheckpointError(
            f"{path / FINAL_DIR / MODEL_FILE} is missing: the run's final model is incomplete or damaged. "
            f"Pass one of its checkpoints ({path / 'checkpoints'}) explicitly, or retrain."
        )
    checkpoint = latest_checkpoint(path) if path.is_dir() else None
    if checkpoint is None:
        raise FileNotFoundError(
            f"No trained model at {path}: expected {MODEL_FILE} + {CONFIG_FILE}, a final/ folder or "
            f"{LATEST_FILE}. Train one with `addclass train`."
        )
    return checkpoint


def resolve_init_dir(init_model: str | os.PathLike[str]) -> Path:
    """`resolve_model_dir` of a run's ``init_model``, with an error that names the parameter.

    Args:
        init_model: A model or checkpoint folder, or a run folder.

    Returns:
        The model folder.

    Raises:
        FileNotFoundError: nothing trained there (the message names the path).
    """
    try:
        return resolve_model_dir(init_model)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_model {init_model} is not a trained model folder: {e}") from e


def _verified_weights(folder: Path) -> Path:
    """``folder/model.safetensors``, checked against the manifest."""
    verify_dir(folder, files=(MODEL_FILE,))
    return folder / MODEL_FILE


def load_model_weights(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Loads ``model.safetensors`` of a verified folder into ``model`` (strict; shapes checked).

    Args:
        model: A model built for the folder's config (`build_model`).
        folder: A model or checkpoint folder.

    Raises:
        CheckpointError: the file is corrupt or does not fit the model (the message names the file).
    """
    path = _verified_weights(Path(folder))
    try:
        load_checkpoint(model, path, strict=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"Cannot load model weights {path}: {e}") from e


def load_trained_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> MaSSFormer:
    """Rebuilds a trained model from ``config.json`` + ``model.safetensors`` (in eval mode).

    Args:
        path: A model folder (``RUN/final``), a checkpoint folder, or a run folder (`resolve_model_dir`).
        device: Where to put the model.

    Returns:
        The model; its class names and label version are in `read_model_config` of the same folder.

    Raises:
        FileNotFoundError: nothing trained at ``path``.
        CheckpointError: a file is corrupt or does not fit the config (the message names it).
    """
    folder = resolve_model_dir(path)
    model = build_model(read_model_config(folder))
    load_model_weights(model, folder)
    return model.to(device).eval()


def init_from_model(
    model: MaSSFormer, folder: str | os.PathLike[str], *, expected: Mapping[str, Any]
) -> list[str]:
    """Starts a run from a trained model folder: its weights, with the class head matched by class name.

    Args:
        model: the freshly built model of this run.
        folder: ``final/`` of an earlier run, one of its ``checkpoints/``, or the run folder itself.
        expected: this run's `tasks.training.train_config.model_config` (variant, pixel decoder, class names).

    Returns:
        The names of this run's classes that the trained model did not know (they start untrained).

    Raises:
        FileNotFoundError: ``folder`` is not a model folder.
        CheckpointError: the folder is corrupt (the message names the file), or holds another variant or
            pixel decoder than this run builds.
    """
    folder = resolve_init_dir(folder)
    found = read_model_config(folder)
    for key in ("variant", "pixel_decoder"):
        if found.get(key, "hr") != expected[key]:
            raise CheckpointError(
                f"init_model {folder} is a {key} {found.get(key)!r} model; this run builds "
                f"{expected[key]!r}. Train with {key}={found.get(key)!r} or start from another model."
            )
    old, new = list(found["class_names"]), list(expected["class_names"])
    rows = {i: old.index(name) for i, name in enumerate(new) if name in old}
    path = _verified_weights(folder)
    try:
        fresh = load_with_new_classes(model, path, class_rows=rows)
    except ValueError as e:
        raise CheckpointError(f"Cannot fine-tune from {path}: {e}") from e
    dropped = [name for name in old if name not in new]
    untrained = [new[i] for i in fresh]
    log.info("fine-tuning from %s: new classes %s, dropped classes %s", folder, untrained, dropped)
    return untrained
