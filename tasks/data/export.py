"""Export a label version or pseudo instance masks for other toolkits (`addclass export`).

- `export_mmseg`: PNG label maps in the MaSS13K / mmsegmentation layout::

      DIR/annotations/{split}/{id}.png   uint8 single-channel label map (255 = ignore)
      DIR/images/{split}/{id}{ext}       symlink to the store's image file (a copy with `copy_images=True`)
      DIR/classes.json                   ids, names, sources and palette of the version's classes

  mmseg wants labels 0..K-1. A version whose class ids have a gap (e.g. a branch `v1 -> v3` that reuses the
  store-wide id 8 of a class first added elsewhere) is remapped to contiguous ids; `classes.json` then lists
  each class's `store_id` and the `label_map` used.
- `export_coco_rle`: the pseudo instance masks as COCO-style JSON, one file per split
  (`DIR/instances_{split}.json`): `images`, `categories` (the pseudo classes), and `annotations` with
  `segmentation` in COCO *uncompressed* RLE (`{"size": [H, W], "counts": [...]}`, column-major), `area`,
  `bbox` (x, y, w, h: the labeler's detection box), `score`, `phrase`, `iscrowd: 0`. In each split, the
  classes pseudo-labelled on it are listed in `info.pseudo_labelled`; an image is listed only if each of those
  classes has a finished pseudo label for it (made with the class's recorded run settings), so a listed image
  without annotations of a class is a true negative for it. Splits without pseudo labels get no file.

Both refuse a non-empty DIR unless `overwrite=True`, and build the export in a temporary folder next to DIR
that replaces DIR only when complete. Each export lists every path it wrote in `DIR/export_manifest.json`;
`overwrite=True` replaces only a folder whose whole content that manifest lists (an earlier export, nothing
added to it since), so it never deletes a label store, a data folder or a file someone put there. DIR may never
be the store, lie inside it, or hold it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from addclass.common.errors import InputError
from addclass.models.palette import class_color
from addclass.storage.pseudo import missing_pseudo, pseudo_runs, read_pseudo_record
from addclass.storage.registry import IGNORE_INDEX
from addclass.storage.staging import OWNER_FILE, refuse_store_overlap, staged_dir
from addclass.storage.store import LabelStore, open_label_store

MANIFEST = "export_manifest.json"


def _written(folder: Path) -> list[str]:
    """Every file, link and folder below `folder`, as sorted POSIX paths relative to it (links not followed)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != OWNER_FILE)


def _foreign_paths(folder: Path) -> list[str]:
    """What in `folder` its export manifest does not list (everything, without a readable manifest)."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError):
        return _written(folder)
    return [p for p in _written(folder) if p not in listed and p != MANIFEST]


@contextmanager
def _staged_dir(out_dir: str | os.PathLike[str], *, overwrite: bool, store: LabelStore) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out_dir` on success; a failure leaves `out_dir` as it was."""
    final = Path(out_dir)
    refuse_store_overlap(final, store.path, what="Export folder")
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder.")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{final} is not empty; pass overwrite=True (--overwrite) to replace it.")
        foreign = _foreign_paths(final)
        if foreign:
            raise FileExistsError(
                f"{final} holds what no addclass export wrote there ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}; its {MANIFEST} does not list it); overwrite=True "
                f"(--overwrite) only replaces an earlier export. Move those files or pick another folder.")
    with staged_dir(final) as tmp:
        yield tmp
        _write_json(tmp / MANIFEST, {"store": str(store.path.resolve()), "paths": _written(tmp)})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def export_mmseg(store_path: str | os.PathLike[str], *, version: str, out_dir: str | os.PathLike[str],
                 copy_images: bool = False, overwrite: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Write a label version as PNG label maps in the MaSS13K / mmseg layout.

    Args:
        store_path: the label store.
        version: a published version ('latest' = newest).
        out_dir: the export folder (must be empty or absent unless `overwrite`).
        copy_images: copy the image files instead of symlinking them.
        overwrite: replace a non-empty `out_dir`.
        progress: show a progress bar.

    Returns:
        {out_dir, version, images: {split: count}, num_classes, remapped}.
    """
    store = open_label_store(store_path)
    version = store.resolve_version(version)
    info = store.versions()[version]
    registry = {c.id: c for c in store.classes()}
    ids = info.model_class_ids  # the same contiguous ids a model trained on this version predicts
    store_lut = info.label_lut()
    remapped = store_lut is not None
    lut = np.asarray(store_lut or range(256), np.uint8)
    classes = []
    for new_id, store_id in enumerate(ids):
        c = registry[store_id]
        entry: dict[str, Any] = {"id": new_id, "name": c.name, "source": c.source,
                                 "color": list(class_color(store_id))}
        if remapped:
            entry["store_id"] = store_id
        if c.source == "pseudo":
            entry["prompt"] = c.prompt
        classes.append(entry)
    doc: dict[str, Any] = {
        "store": str(store.path), "dataset": store.info.get("name"), "version": version,
        "parent": info.parent, "policy": info.policy, "ignore_index": IGNORE_INDEX, "num_classes": len(ids),
        "names": [c["name"] for c in classes], "palette": [c["color"] for c in classes], "classes": classes,
    }
    if remapped:
        doc["label_map"] = {str(s): n for n, s in enumerate(ids)}
    counts: dict[str, int] = {}
    with _staged_dir(out_dir, overwrite=overwrite, store=store) as tmp:
        for split in store.splits():
            ann_dir, img_dir = tmp / "annotations" / split, tmp / "images" / split
            ann_dir.mkdir(parents=True)
            img_dir.mkdir(parents=True)
            recs = store.image_records(split)
            for rec in tqdm(recs, desc=f"export {split}", unit="img", disable=not progress):
                labels = store.read_labels(split, rec.id, version=version)
                present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
                bad = np.setdiff1d(present, [*ids, IGNORE_INDEX])
                if bad.size:
                    raise InputError(f"Labels of {rec.id!r} ({split}, {version}) hold ids {bad.tolist()} "
                                     f"outside the version's classes {ids}.")
                png = ann_dir / f"{rec.id}.png"
                if not cv2.imwrite(str(png), lut[labels] if remapped else labels):
                    raise OSError(f"Cannot write {png}.")
                src = store.image_path(rec).resolve()
                if not src.is_file():
                    raise FileNotFoundError(f"Image file {src} of {rec.id!r} ({split}) is missing.")
                dst = img_dir / f"{rec.id}{src.suffix.lower()}"
                if copy_images:
                    shutil.copyfile(src, dst)
                else:
                    os.symlink(src, dst)
            counts[split] = len(recs)
        doc["images"] = counts
        _write_json(tmp / "classes.json", doc)
    return {"out_dir": str(Path(out_dir)), "version": version, "images": counts, "num_classes": len(ids),
            "remapped": remapped}


def _xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]


def _rle_area(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def export_coco_rle(store_path: str | os.PathLike[str], *, classes: str | Sequence[str] | None = None,
                    out_dir: str | os.PathLike[str], overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Write the pseudo instance masks as COCO-style JSON (one `instances_{split}.json` per split).

    Args:
        store_path: the label store.
        classes: pseudo classes to export ('car,bicycle' or a list); None = every class with a finished
            pseudo-label run.
        out_dir: the export folder (must be empty or absent unless `overwrite`).
        overwrite: replace a non-empty `out_dir`.
        progress: show a progress bar.

    Returns:
        {out_dir, classes, splits: {split: {images, annotations, skipped}}}.

    Raises:
        ValueError: no pseudo-labelled class, or an unknown / not pseudo-labelled class.
    """
    store = open_label_store(store_path)
    runs = pseudo_runs(store)
    if classes is None:
        names = sorted(runs)
        if not names:
            raise InputError(f"No pseudo-labelled class in {store.path}; run `addclass pseudo-label` first.")
    else:
        names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
        unknown = [n for n in names if n not in runs]
        if unknown or not names:
            raise InputError(f"Not pseudo-labelled in {store.path}: {unknown or names}; "
                             f"pseudo-labelled classes: "
                             f"{', '.join(sorted(runs)) or 'none'}.")
    registry = {c.name: c for c in store.classes()}
    categories = []
    for k, n in enumerate(names, start=1):
        cat: dict[str, Any] = {"id": k, "name": n, "supercategory": "pseudo", "prompt": runs[n].get("prompt"),
                               "settings_key": runs[n].get("settings_key")}
        if n in registry:
            cat["store_id"] = registry[n].id
        categories.append(cat)
    summary: dict[str, Any] = {}
    with _staged_dir(out_dir, overwrite=overwrite, store=store) as tmp:
        for split in store.splits():
            n_ids = len(store.image_ids(split))
            gaps = {n: missing_pseudo(store, n, split, key=runs[n].get("settings_key")) for n in names}
            active = [n for n in names if split in runs[n].get("splits", {}) or len(gaps[n]) < n_ids]
            missing = set().union(*(gaps[n] for n in active))
            recs = [r for r in store.image_records(split) if r.id not in missing]
            if not active or not recs:
                continue
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for image_num, rec in enumerate(tqdm(recs, desc=f"coco {split}", disable=not progress), start=1):
                images.append({"id": image_num, "file_name": str(store.image_path(rec).resolve()),
                               "height": rec.height, "width": rec.width, "addclass_id": rec.id})
                for cat in (c for c in categories if c["name"] in active):
                    annotations.extend(_annotations(store, cat, split, rec.id, image_num,
                                                    (rec.height, rec.width), start=len(annotations) + 1))
            _write_json(tmp / f"instances_{split}.json", {
                "info": {"description": f"addclass pseudo labels of {store.info.get('name')}",
                         "store": str(store.path), "split": split, "pseudo_labelled": active,
                         "segmentation": "COCO uncompressed RLE (column-major counts)"},
                "licenses": [], "images": images, "categories": categories, "annotations": annotations,
            })
            summary[split] = {"images": len(images), "annotations": len(annotations), "skipped": len(missing)}
    return {"out_dir": str(Path(out_dir)), "classes": names, "splits": summary}


def _annotations(store: LabelStore, cat: dict[str, Any], split: str, image_id: str, image_num: int,
                 shape: tuple[int, int], *, start: int) -> list[dict[str, Any]]:
    record = read_pseudo_record(store, cat["name"], split, image_id)
    out = []
    instances, boxes, scores = record.get("instances", []), record.get("boxes", []), record.get("scores", [])
    phrases = record.get("phrases", [""] * len(instances))
    if not (len(instances) == len(boxes) == len(scores)):
        raise InputError(f"Pseudo record of {image_id!r} ({cat['name']}) has {len(instances)} masks, "
                         f"{len(boxes)} boxes and {len(scores)} scores.")
    for k, (rle, box, score) in enumerate(zip(instances, boxes, scores, strict=True)):
        if [int(v) for v in rle["size"]] != list(shape) or isinstance(rle["counts"], (str, bytes)):
            raise InputError(f"Pseudo instance {k} of {image_id!r} ({cat['name']}) is not uncompressed RLE "
                             f"of size {list(shape)}.")
        out.append({"id": start + k, "image_id": image_num, "category_id": cat["id"],
                    "segmentation": {"size": list(shape), "counts": [int(c) for c in rle["counts"]]},
                    "area": _rle_area(rle), "bbox": _xyxy_to_xywh(box), "iscrowd": 0, "score": float(score),
                    "phrase": phrases[k] if k < len(phrases) else ""})
    return out

