"""A trained model's predictions as a new label version of a store (`addclass predict MODEL --into-store STORE`).

The version (policy ``predicted``) has the model's own label version as its parent, and its classes. On each image
of the predicted splits the labels are the precise labels (v1) with the model's new classes written where v1 says
"others" (0), the rule merge's carve-others applies to pseudo masks: precise classes and ignore are never changed;
the parent's pseudo pixels are replaced by what the model predicts there. Those pixels get provenance 2
(``PROV_PREDICTED``); every other pixel of a predicted image is precise (0) or ignore (255). Images of the splits
not predicted keep the parent's labels and provenance. So the model's view of the new classes can be inspected,
exported, reviewed and trained on like a merge of pseudo labels, and the store says which pixels came from which
model.

Like a merge (`storage.derived.write_derived_version`), the run holds the store lock, registers a draft with its
spec (the model folder, the sha256 of its weights, the prediction settings and the splits), writes one image at a
time and publishes in one metadata write. A crash leaves an unpublished draft that the same command resumes (images already written are kept); the
same command after publication returns the version it made. The spec is kept in ``sections["predict"]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from addclass.common.errors import InputError
from addclass.storage.derived import write_derived_version
from addclass.storage.registry import IGNORE_INDEX, PROV_PRECISE, PROV_PREDICTED
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.prediction.predict import PredictConfig, check_memory, image_scores

SECTION = "predict"
POLICY = "predicted"

__all__ = ["POLICY", "SECTION", "predict_into_store", "predicted_labels"]


def predicted_labels(precise: np.ndarray, prediction: np.ndarray, new_class_ids: list[int]) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """The rule on arrays (pure): (labels, provenance) of one predicted image.

    Args:
        precise: H x W uint8 v1 labels (0 others, 1..6 precise classes, 255 ignore).
        prediction: H x W uint8 store class ids predicted by the model.
        new_class_ids: The store ids of the model's new (pseudo) classes.

    Returns:
        H x W uint8 labels (v1, with each new class the model predicts on a v1 "others" pixel) and provenance
        (``PROV_PREDICTED`` there, ``PROV_PRECISE`` elsewhere, 255 where v1 is ignore).
    """
    if precise.shape != prediction.shape:
        raise InputError(f"Prediction {prediction.shape} and labels {precise.shape} differ in size.")
    take = (precise == 0) & np.isin(prediction, new_class_ids)
    labels = np.where(take, prediction, precise).astype(np.uint8)
    provenance = np.where(take, PROV_PREDICTED, PROV_PRECISE).astype(np.uint8)
    provenance[precise == IGNORE_INDEX] = IGNORE_INDEX
    return labels, provenance


def _model_classes(store: LabelStore, model_config: dict[str, Any], model_dir: Path) -> tuple[str, list[int], list[int]]:
    """(the model's label version, the store id of each model class, the ids of its new classes), checked
    against the store: the version exists and its classes are the model's, by name and order."""
    version = model_config.get("label_version")
    if not version or version not in store.versions():
        raise InputError(f"Model {model_dir} was trained on label version {version!r}, which {store.path} does "
                         f"not have (versions: {', '.join(store.versions())}); predict into the store it was "
                         "trained on.")
    ids = store.versions()[version].model_class_ids
    registry = {c.id: c for c in store.classes()}
    names = [registry[i].name for i in ids]
    if names != list(model_config.get("class_names", [])):
        raise InputError(f"Model {model_dir} predicts classes {model_config.get('class_names')}, but version "
                         f"{version} of {store.path} has {names}.")
    return version, ids, [i for i in ids if registry[i].source == "pseudo"]


def _weights_sha256(model_dir: Path) -> str | None:
    try:
        return str(json.loads((model_dir / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def predict_into_store(
    model_dir: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    *,
    splits: list[str] | None = None,
    config: PredictConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Predicts the images of ``splits`` (default: all) and publishes them as a new label version (module
    docstring), holding the store lock.

    Returns:
        ``{"version", "parent", "splits", "images": predicted images, "resumed": images a crashed run had written,
        "existing": True when an identical run had already published the version}``.

    Raises:
        FileNotFoundError, InputError: a bad model, split or store (named), before anything is written.
        MemoryError: the largest image would not fit in the device's free memory in this mode.
    """
    from addclass.tasks.model_files.model_folder import (
        load_trained_model,
        read_model_config,
        resolve_model_dir,
    )

    config = config or PredictConfig()
    folder = resolve_model_dir(model_dir)
    model_config = read_model_config(folder)
    store = open_label_store(store_path, mode="a")
    chosen = list(splits) if splits else store.splits()
    unknown = [s for s in chosen if s not in store.splits()]
    if unknown:
        raise InputError(f"Split {unknown[0]!r} is not in {store.path} (splits: {', '.join(store.splits())}).")
    parent, ids, new_ids = _model_classes(store, model_config, folder)
    if not new_ids:
        raise InputError(f"Model {folder} has no new class to predict (its classes are the precise ones).")
    check_memory([(f"{s}/{r.id}", r.height, r.width) for s in chosen for r in store.image_records(s)],
                 model_config, config)
    spec = {"model": str(folder.resolve()), "weights_sha256": _weights_sha256(folder), "parent": parent,
            "splits": sorted(chosen), "predict": {k: v for k, v in asdict(config).items()
                                                  if k not in ("device", "overlays", "scores", "overwrite")}}
    lut = np.array(ids, np.uint8)  # model class index -> store id
    model: list[Any] = []  # loaded at the first image to predict (not for a run that is already published)

    def image_labels(split: str, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        if split not in chosen:
            return None
        if not model:
            model.append(load_trained_model(folder, device=config.device))
        prediction = lut[image_scores(model[0], store.read_image(split, image_id), config).argmax(dim=0).cpu().numpy()]
        return predicted_labels(store.read_labels(split, image_id, version="v1"), prediction, new_ids)

    done = write_derived_version(store, section=SECTION, policy=POLICY, parent=parent, class_ids=ids, spec=spec,
                                 image_labels=image_labels, purpose=f"predict into {store.path.name}",
                                 progress=progress)
    return {"version": done.version, "parent": parent, "splits": sorted(chosen), "images": done.changed,
            "resumed": done.resumed, "existing": done.existing}
