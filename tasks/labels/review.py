"""Human review of a new class's labels: the images most worth a look out as pre-annotations a labelling tool
imports (COCO or Label Studio tasks), the corrections back in as a label version whose reviewed pixels have
provenance 3 (`addclass review export|import`).

**Export.** The ``top`` images of a label version ranked ``by``:

- ``score``: the labeler's confidence, lowest first: the smallest detection score of the class's pseudo-label
  instances on the image (images without a pseudo label of the class come last).
- ``disagreement``: 1 - IoU between the class's mask in the version and a trained model's prediction of it,
  largest first (an image where neither has the class scores 0).
- ``uncertainty``: how unsure a trained model is along the version's boundary of the class: the mean of
  ``1 - |2p - 1|`` (1 where the model's probability ``p`` of the class is 0.5, 0 where it is 0 or 1) over the
  pixels within ``BAND`` px of that boundary, largest first (an image without the class scores 0). It points at
  labels whose edges the model cannot confirm, even where the regions agree.

Written to ``OUT``: ``images/<file>`` (copies of the store's image files), the masks in the chosen format
(`tasks.labels.review_formats`: ``annotations.json`` for COCO, ``tasks.json`` + ``labeling_config.xml`` for Label
Studio) and ``manifest.json`` (store, class, version, ranking, format, and per image: id, split, COCO id, file
name, size, sha256).

**Import.** The reviewed file (``annotations.json``, or Label Studio's JSON export saved as ``reviewed.json``)
is checked against the manifest and the store before anything is written: every annotation names an exported
image, a label named like the class, and decodes to the image's size; every exported image still has the file
it had (sha256). Then one new label version (policy ``reviewed``, parent the exported version) is published: on
each reviewed image (COCO: every exported image; Label Studio: the tasks with an annotation), within the pixels
v1 labels "others" (precise classes and ignore never change), the union of the reviewed masks is the class
(provenance 3, ``PROV_REVIEWED``) and the class's other pixels there become "others" (provenance 0: a person
checked them); the other images keep the parent's labels. The spec goes to ``sections["review"]``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from addclass.common.errors import InputError
from addclass.models.hashing import file_sha256
from addclass.storage.derived import write_derived_version
from addclass.storage.pseudo import read_pseudo_record
from addclass.storage.registry import PROV_PRECISE, PROV_REVIEWED
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.labels.review_formats import FORMATS, READERS, WRITERS, reviewed_file

SECTION = "review"
POLICY = "reviewed"
Ranking = Literal["score", "disagreement", "uncertainty"]
RANKINGS: tuple[str, ...] = get_args(Ranking)
BAND = 2  # px each side of the label's boundary that the uncertainty ranking looks at
# image RGB -> (H x W bool: the model's argmax is the class, H x W float: its probability of the class)
ModelView = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
MANIFEST = "manifest.json"
Format = Literal["coco", "labelstudio"]

__all__ = ["FORMATS", "RANKINGS", "boundary_uncertainty", "default_review_folder", "export_review", "import_review",
           "model_view", "rank_images", "review_state", "review_steps", "reviewed_labels"]


def _class_id(store: LabelStore, class_name: str, version: str) -> int:
    info = store.class_by_name(class_name)
    if info.id not in store.versions()[version].class_ids:
        raise InputError(f"Label version {version} of {store.path} has no class {class_name!r}.")
    return info.id


def _min_score(store: LabelStore, class_name: str, split: str, image_id: str) -> float:
    try:
        scores = read_pseudo_record(store, class_name, split, image_id).get("scores", [])
    except KeyError:
        return float("inf")  # no pseudo label: nothing the labeler was unsure of
    return float(min(scores)) if scores else float("inf")


def boundary_band(mask: np.ndarray, radius: int = BAND) -> np.ndarray:
    """H x W bool: the pixels within ``radius`` px (chessboard) of a boundary between ``mask`` and the rest."""
    from scipy.ndimage import binary_dilation

    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    return np.asarray(binary_dilation(mask, square) & binary_dilation(~mask, square))


def boundary_uncertainty(mask: np.ndarray, probability: np.ndarray, radius: int = BAND) -> float:
    """Mean ``1 - |2p - 1|`` of ``probability`` over `boundary_band` of ``mask``; 0 without a boundary."""
    band = boundary_band(mask, radius)
    if not band.any():
        return 0.0
    return float(np.mean(1.0 - np.abs(2.0 * probability[band].astype(np.float64) - 1.0)))


def rank_images(store: LabelStore, class_name: str, *, version: str, by: Ranking,
                splits: Sequence[str] = ("train", "val"),
                predict: ModelView | None = None) -> list[tuple[str, str, float]]:
    """``(split, image id, value)`` of every image of ``splits``, the one most worth reviewing first.

    Args:
        by: ``"score"`` (ascending labeler confidence), ``"disagreement"`` (descending 1 - IoU between the
            version's mask and the model's) or ``"uncertainty"`` (descending `boundary_uncertainty` of the
            version's mask under the model's probability); module docstring.
        predict: the model (`model_view`), for ``disagreement`` and ``uncertainty``.
    """
    if by not in RANKINGS:
        raise InputError(f"Expected --by in {RANKINGS}. Got {by!r} instead.")
    if by != "score" and predict is None:
        raise InputError(f"--by {by} needs a trained model (--model RUN, or 'champion').")
    cid = _class_id(store, class_name, version)
    rows: list[tuple[str, str, float]] = []
    for split in (s for s in splits if s in store.splits()):
        for image_id in store.image_ids(split):
            if by == "score" or predict is None:
                rows.append((split, image_id, _min_score(store, class_name, split, image_id)))
                continue
            labels = store.read_labels(split, image_id, version=version) == cid
            predicted, probability = predict(store.read_image(split, image_id))
            if by == "uncertainty":
                rows.append((split, image_id, boundary_uncertainty(labels, probability)))
                continue
            union = int((labels | predicted).sum())
            rows.append((split, image_id, 0.0 if union == 0 else 1.0 - int((labels & predicted).sum()) / union))
    return sorted(rows, key=lambda r: r[2], reverse=by != "score")


def model_view(model_dir: str | os.PathLike[str], class_name: str) -> ModelView:
    """``image RGB -> (mask, probability)`` of ``class_name`` by a trained model (its own inference scales):
    where its argmax is the class, and its probability of the class."""
    from addclass.tasks.model_files.model_folder import (
        load_trained_model,
        read_model_config,
        resolve_model_dir,
    )
    from addclass.tasks.prediction.predict import PredictConfig, image_scores

    folder = resolve_model_dir(model_dir)
    names = list(read_model_config(folder)["class_names"])
    if class_name not in names:
        raise InputError(f"Model {folder} does not predict {class_name!r} (its classes: {', '.join(names)}).")
    model, index = load_trained_model(folder), names.index(class_name)

    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = image_scores(model, image, PredictConfig()).cpu()  # K x H x W class probabilities
        return np.asarray(scores.argmax(dim=0).numpy() == index), np.asarray(scores[index].numpy())

    return predict


def export_review(store_path: str | os.PathLike[str], class_name: str, out: str | os.PathLike[str], *,
                  version: str = "latest", top: int = 20, by: Ranking = "score",
                  model: str | os.PathLike[str] | None = None, fmt: Format = "coco") -> dict[str, Any]:
    """Writes the ``top`` images ranked ``by`` with the version's masks of the class (module docstring) into the
    new folder ``out`` (refused if it exists) in the format ``fmt`` (`tasks.labels.review_formats`). Returns the
    manifest."""
    if fmt not in FORMATS:
        raise InputError(f"Expected --format in {FORMATS}. Got {fmt!r} instead.")
    store = open_label_store(store_path)
    version = store.resolve_version(version)
    cid = _class_id(store, class_name, version)
    if top < 1:
        raise InputError(f"Expected --top >= 1. Got {top} instead.")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; pick a new folder for the review export.")
    predict = model_view(model, class_name) if by != "score" and model is not None else None
    chosen = rank_images(store, class_name, version=version, by=by, predict=predict)[:top]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export of ours
    (tmp / "images").mkdir(parents=True)
    entries, masks = [], []
    for coco_id, (split, image_id, value) in enumerate(chosen, start=1):
        rec = store.image_record(split, image_id)
        src = store.image_path(rec)
        file_name = f"{image_id}{src.suffix.lower()}"
        shutil.copyfile(src, tmp / "images" / file_name)
        masks.append(store.read_labels(split, image_id, version=version) == cid)
        entries.append({"image_id": image_id, "split": split, "coco_id": coco_id, "file_name": file_name,
                        "height": rec.height, "width": rec.width, "sha256": rec.sha256, by: value})
    WRITERS[fmt](tmp, entries, masks, class_name, version=version)
    manifest = {"store": str(store.path.resolve()), "class": class_name, "class_id": cid, "version": version,
                "by": by, "model": None if model is None else str(model), "format": fmt, "images": entries}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out)
    return manifest


def default_review_folder(store_path: str | os.PathLike[str], class_name: str, version: str) -> Path:
    """Where add-class exports a review when not told: ``STORE.review/CLASS-VERSION``."""
    return Path(f"{os.fspath(store_path).rstrip('/')}.review") / f"{class_name}-{version}"


def review_state(store: LabelStore, folder: str | os.PathLike[str], *, class_name: str,
                 version: str) -> str:
    """Where the review of ``class_name`` in ``version`` exported to ``folder`` stands: ``"none"`` (no folder),
    ``"exported"`` (waiting for its import), or the name of the newest version imported from it.

    Raises:
        InputError: ``folder`` exists but is not an export of that class and version (it is left alone).
    """
    folder = Path(folder)
    imported = [v for v, spec in store.section(SECTION).items()
                if spec.get("export") == str(folder.resolve()) and v in store.versions()]
    if imported:
        return [v for v in store.versions() if v in imported][-1]
    if not folder.exists():
        return "none"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if (manifest.get("class"), manifest.get("version")) != (class_name, version):
        raise InputError(f"{folder} exists and is not the review export of {class_name!r} in {version} (its "
                         f"{MANIFEST}: {manifest.get('class')!r} in {manifest.get('version')}); choose another folder.")
    return "exported"


def review_steps(store: str, folder: str | Path, fmt: str) -> list[str]:
    """What a person does with a review export, in order (logged, and the review artifact)."""
    if fmt == "labelstudio":
        edit = (f"Create a Label Studio project with `{folder}/labeling_config.xml`, serve `{folder}` as local files "
                f"(LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={folder}), "
                f"import `{folder}/tasks.json`, correct the masks, export JSON as `{folder}/reviewed.json`.")
    else:
        edit = (f"Open `{folder}/annotations.json` with `{folder}/images/` in CVAT (COCO 1.0) or any COCO tool, "
                f"correct the masks, save the exported COCO over `{folder}/annotations.json`.")
    return [edit, f"Run `addclass review import {store} {folder}`.",
            "Run this add-class again (same parameters): it trains on the reviewed version."]


def reviewed_labels(precise: np.ndarray, parent_labels: np.ndarray, parent_provenance: np.ndarray,
                    reviewed: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule on arrays (pure): within v1's "others" pixels, the reviewed mask is the class (provenance 3)
    and the class's other pixels become "others" (provenance 0); every other pixel keeps the parent's."""
    others = precise == 0
    labels, provenance = parent_labels.copy(), parent_provenance.copy()
    dropped = others & ~reviewed & (parent_labels == class_id)
    labels[dropped], provenance[dropped] = 0, PROV_PRECISE
    kept = others & reviewed
    labels[kept], provenance[kept] = class_id, PROV_REVIEWED
    return labels, provenance


def _read_reviewed(folder: Path, manifest: dict[str, Any], store: LabelStore) -> dict[str, np.ndarray]:
    """{image id: reviewed mask} of the reviewed images, every problem named before anything is written."""
    fmt = manifest.get("format", "coco")
    if fmt not in READERS:
        raise InputError(f"{folder / MANIFEST}: unknown review format {fmt!r} (known: {', '.join(FORMATS)}).")
    masks = READERS[fmt](folder, manifest)
    if not masks:
        raise InputError(f"{reviewed_file(folder, fmt)} reviews no image of this export (no task has an annotation).")
    for exported in manifest["images"]:
        rec = store.image_record(exported["split"], exported["image_id"])
        if exported["sha256"] != rec.sha256 or file_sha256(store.image_path(rec)) != rec.sha256:
            raise InputError(f"Image {exported['image_id']!r} ({store.image_path(rec)}) changed since the review "
                             "export (sha256); export it again.")
    return masks


def import_review(store_path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Publishes the corrections in ``folder`` (an export's folder with the reviewed ``annotations.json``) as a
    new label version (module docstring). Returns ``{"version", "parent", "class", "images"}``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} is not a review export: cannot read its {MANIFEST} ({e}).") from e
    store = open_label_store(store_path, mode="a")
    parent, name = manifest["version"], manifest["class"]
    if parent not in store.versions():
        raise InputError(f"The review was exported from version {parent!r}, which {store.path} does not have.")
    cid = _class_id(store, name, parent)
    masks = _read_reviewed(folder, manifest, store)
    spec = {"class": name, "parent": parent, "export": str(folder.resolve()),
            "annotations_sha256": file_sha256(reviewed_file(folder, manifest.get("format", "coco"))),
            "images": sorted(masks)}
    where = {e["image_id"]: e["split"] for e in manifest["images"] if e["image_id"] in masks}

    def image_labels(split: str, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        if where.get(image_id) != split:
            return None
        labels, provenance = store.read_labels_and_provenance(split, image_id, version=parent)
        return reviewed_labels(store.read_labels(split, image_id, version="v1"), labels, provenance,
                               masks[image_id], cid)

    done = write_derived_version(store, section=SECTION, policy=POLICY, parent=parent,
                                 class_ids=list(store.versions()[parent].class_ids), spec=spec,
                                 image_labels=image_labels, purpose=f"review import {name}")
    return {"version": done.version, "parent": parent, "class": name, "images": len(masks),
            "existing": done.existing}
