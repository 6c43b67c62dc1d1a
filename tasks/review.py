"""Human review of a new class's labels: the images most worth a look out as COCO, the corrections back in as a
label version whose reviewed pixels have provenance 3 (`addclass review export|import`).

**Export.** The ``top`` images of a label version ranked ``by``:

- ``score``: the labeler's confidence, lowest first: the smallest detection score of the class's pseudo-label
  instances on the image (images without a pseudo label of the class come last).
- ``disagreement``: 1 - IoU between the class's mask in the version and a trained model's prediction of it,
  largest first (an image where neither has the class scores 0).

Written to ``OUT``: ``images/<file>`` (copies of the store's image files), ``annotations.json`` (COCO instances:
the class as the one category, one annotation per image with the version's mask as compressed RLE, ``iscrowd``
1; the format CVAT's "COCO 1.0" and most tools import as pre-annotations; written with pycocotools) and
``manifest.json`` (store, class, version, ranking, and per image: id, split, COCO id, file name, size, sha256).

**Import.** ``annotations.json`` (edited by a reviewer, or exported again by the tool) is checked against the
manifest and the store before anything is written: every annotation names an exported image, a category named
like the class, and decodes to the image's size; every exported image still has the file it had (sha256). Then
one new label version (policy ``reviewed``, parent the exported version) is published: on each exported image,
within the pixels v1 labels "others" (precise classes and ignore never change), the union of the reviewed masks
is the class (provenance 3, ``PROV_REVIEWED``) and the class's other pixels there become "others" (provenance
0: a person checked them); the other images keep the parent's labels. The spec goes to ``sections["review"]``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.errors import InputError
from models.hashing import file_sha256
from storage.derived import write_derived_version
from storage.pseudo import read_pseudo_record
from storage.registry import PROV_PRECISE, PROV_REVIEWED
from storage.store import LabelStore, open_label_store

SECTION = "review"
POLICY = "reviewed"
RANKINGS = ("score", "disagreement")
ANNOTATIONS = "annotations.json"
MANIFEST = "manifest.json"

__all__ = ["RANKINGS", "export_review", "import_review", "rank_images", "reviewed_labels"]


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


def rank_images(store: LabelStore, class_name: str, *, version: str, by: Literal["score", "disagreement"],
                splits: Sequence[str] = ("train", "val"),
                predict_mask: Callable[[np.ndarray], np.ndarray] | None = None) -> list[tuple[str, str, float]]:
    """``(split, image id, value)`` of every image of ``splits``, the one most worth reviewing first.

    Args:
        by: ``"score"`` (ascending labeler confidence) or ``"disagreement"`` (descending 1 - IoU between the
            version's mask and ``predict_mask(image RGB) -> H x W bool``, a model's mask of the class).
    """
    if by not in RANKINGS:
        raise InputError(f"Expected --by in {RANKINGS}. Got {by!r} instead.")
    if by == "disagreement" and predict_mask is None:
        raise InputError("--by disagreement needs a trained model (--model RUN, or 'champion').")
    if by == "score":
        predict_mask = None
    cid = _class_id(store, class_name, version)
    rows: list[tuple[str, str, float]] = []
    for split in (s for s in splits if s in store.splits()):
        for image_id in store.image_ids(split):
            if predict_mask is None:  # by score
                rows.append((split, image_id, _min_score(store, class_name, split, image_id)))
                continue
            labels = store.read_labels(split, image_id, version=version) == cid
            predicted = predict_mask(store.read_image(split, image_id))
            union = int((labels | predicted).sum())
            rows.append((split, image_id, 0.0 if union == 0 else 1.0 - int((labels & predicted).sum()) / union))
    return sorted(rows, key=lambda r: r[2], reverse=by == "disagreement")


def model_mask(model_dir: str | os.PathLike[str], class_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``image RGB -> H x W bool``: where a trained model predicts ``class_name`` (its own inference scales)."""
    from tasks.model_folder import load_trained_model, read_model_config, resolve_model_dir
    from tasks.predict import PredictConfig, image_scores

    folder = resolve_model_dir(model_dir)
    names = list(read_model_config(folder)["class_names"])
    if class_name not in names:
        raise InputError(f"Model {folder} does not predict {class_name!r} (its classes: {', '.join(names)}).")
    model, index = load_trained_model(folder), names.index(class_name)

    def predict(image: np.ndarray) -> np.ndarray:
        return np.asarray(image_scores(model, image, PredictConfig()).argmax(dim=0).numpy() == index)

    return predict


def export_review(store_path: str | os.PathLike[str], class_name: str, out: str | os.PathLike[str], *,
                  version: str = "latest", top: int = 20, by: Literal["score", "disagreement"] = "score",
                  model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Writes the ``top`` images ranked ``by`` with the version's masks of the class (module docstring) into the
    new folder ``out`` (refused if it exists). Returns the manifest."""
    from pycocotools import mask as mask_utils

    store = open_label_store(store_path)
    version = store.resolve_version(version)
    cid = _class_id(store, class_name, version)
    if top < 1:
        raise InputError(f"Expected --top >= 1. Got {top} instead.")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; pick a new folder for the review export.")
    predict_mask = model_mask(model, class_name) if by == "disagreement" and model is not None else None
    chosen = rank_images(store, class_name, version=version, by=by, predict_mask=predict_mask)[:top]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export of ours
    (tmp / "images").mkdir(parents=True)
    images, annotations, entries = [], [], []
    for coco_id, (split, image_id, value) in enumerate(chosen, start=1):
        rec = store.image_record(split, image_id)
        src = store.image_path(rec)
        file_name = f"{image_id}{src.suffix.lower()}"
        shutil.copyfile(src, tmp / "images" / file_name)
        mask = store.read_labels(split, image_id, version=version) == cid
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        images.append({"id": coco_id, "file_name": file_name, "height": rec.height, "width": rec.width})
        annotations.append({"id": coco_id, "image_id": coco_id, "category_id": 1, "iscrowd": 1,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        entries.append({"image_id": image_id, "split": split, "coco_id": coco_id, "file_name": file_name,
                        "height": rec.height, "width": rec.width, "sha256": rec.sha256, by: value})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": class_name}]}
    manifest = {"store": str(store.path.resolve()), "class": class_name, "class_id": cid, "version": version,
                "by": by, "model": None if model is None else str(model), "images": entries}
    (tmp / ANNOTATIONS).write_text(json.dumps(coco) + "\n")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out)
    return manifest


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
    """{image id: reviewed mask} from ``annotations.json``, every problem named before anything is written."""
    from pycocotools import mask as mask_utils

    path = folder / ANNOTATIONS
    try:
        coco = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot read the reviewed annotations {path}: {e}") from e
    by_file = {e["file_name"]: e for e in manifest["images"]}
    # tools renumber images on export: an annotation finds its image by file name, or by the exported id when
    # the file lists no images
    entry_of = {e["coco_id"]: e for e in manifest["images"]}
    if coco.get("images"):
        entry_of = {}
        for im in coco["images"]:
            entry = by_file.get(Path(str(im.get("file_name"))).name)
            if entry is None:
                raise InputError(f"{path}: image {im.get('file_name')!r} was not in this review export.")
            if (im.get("height"), im.get("width")) != (entry["height"], entry["width"]):
                raise InputError(f"{path}: image {im.get('file_name')!r} is {im.get('width')}x{im.get('height')}, "
                                 f"exported as {entry['width']}x{entry['height']}.")
            entry_of[im.get("id")] = entry
    categories = {c["id"]: c.get("name") for c in coco.get("categories", [])}
    masks = {e["image_id"]: np.zeros((e["height"], e["width"]), bool) for e in manifest["images"]}
    for ann in coco.get("annotations", []):
        entry = entry_of.get(ann.get("image_id"))
        if entry is None:
            raise InputError(f"{path}: annotation {ann.get('id')} is on image {ann.get('image_id')}, which was not "
                             "in this review export.")
        name = categories.get(ann.get("category_id"))
        if name != manifest["class"]:
            raise InputError(f"{path}: annotation {ann.get('id')} has label {name!r}; this review is of "
                             f"{manifest['class']!r}.")
        seg = ann.get("segmentation")
        h, w = entry["height"], entry["width"]
        if isinstance(seg, dict) and list(seg.get("size", [])) != [h, w]:
            raise InputError(f"{path}: annotation {ann.get('id')} on {entry['file_name']} is a mask of size "
                             f"{seg.get('size')} (height, width); the image is {h}x{w}.")
        if isinstance(seg, dict):
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))  # polygons
        m = mask_utils.decode(rle)
        if m.shape[:2] != (h, w):
            raise InputError(f"{path}: annotation {ann.get('id')} on {entry['file_name']} is "
                             f"{m.shape[1]}x{m.shape[0]}, the image is {w}x{h}.")
        masks[entry["image_id"]] |= (m.reshape(h, w, -1).max(axis=2) > 0)
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
            "annotations_sha256": file_sha256(folder / ANNOTATIONS), "images": sorted(masks)}
    where = {e["image_id"]: e["split"] for e in manifest["images"]}

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
