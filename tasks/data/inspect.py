"""Summaries of a label store for people (`addclass inspect STORE`) and machines (`--json`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from addclass.common.errors import InputError, UnknownNameError
from addclass.models.palette import colorize
from addclass.storage.registry import IGNORE_INDEX, PROV_PREDICTED, PROV_PSEUDO, PROV_REVIEWED
from addclass.storage.store import LabelStore, open_label_store


def _even_sample(ids: list[str], limit: int | None) -> list[str]:
    if limit is None or len(ids) <= limit:
        return ids
    step = len(ids) / limit
    return [ids[int(i * step)] for i in range(limit)]


def _models(store: LabelStore) -> dict[str, Any]:
    """The model registry without its bulky parts: champion, and per model path, label version, score, created."""
    reg = store.section("models")
    keep = ("path", "label_version", "score", "score_split", "created")
    return {"champion": reg.get("champion"),
            "models": {m: {k: e.get(k) for k in keep} for m, e in reg.get("models", {}).items()}}


def summarize_store(path: str | os.PathLike[str], *, max_images: int | None = 200) -> dict[str, Any]:
    """Classes, versions (with lineage), images per split, per-class pixel and provenance shares, hand masks.

    Pixel shares read at most `max_images` images per split (evenly spaced; None reads all).
    """
    store = open_label_store(path, mode="r")
    classes = store.classes()
    versions = store.versions()
    out: dict[str, Any] = {
        "store": str(Path(path)),
        **store.info,
        "classes": [c.to_dict() for c in classes],
        "splits": {s: len(store.image_ids(s)) for s in store.splits()},
        "versions": {},
        "drafts": sorted(store.drafts()),
        "hand_masks": {kind: {c: {s: len(ids) for s, ids in v.items()} for c, v in store.hand_mask_sets(kind).items()}
                       for kind in ("eval", "reference")},
        "pseudo": {name: {k: v for k, v in sec.items() if k != "images"} for name, sec in store.section("pseudo").items()},
        "models": _models(store),
    }
    for name, v in versions.items():
        lineage, p = [name], v.parent
        while p is not None:
            lineage.append(p)
            p = versions[p].parent if p in versions else None
        pix = np.zeros(256, np.int64)
        prov = np.zeros(256, np.int64)
        pseudo_pix = np.zeros(256, np.int64)  # per class: pixels with pseudo or predicted provenance (>= v2)
        reviewed_pix = np.zeros(256, np.int64)  # per class: pixels a person reviewed
        sampled = 0
        for split in store.splits():
            for image_id in _even_sample(store.image_ids(split), max_images):
                labels, provenance = store.read_labels_and_provenance(split, image_id, version=name)
                pix += np.bincount(labels.ravel(), minlength=256)
                prov += np.bincount(provenance.ravel(), minlength=256)
                if name != "v1":
                    not_precise = (provenance == PROV_PSEUDO) | (provenance == PROV_PREDICTED)
                    pseudo_pix += np.bincount(labels[not_precise], minlength=256)
                    reviewed_pix += np.bincount(labels[provenance == PROV_REVIEWED], minlength=256)
                sampled += 1
        total = max(int(pix.sum()), 1)
        names = {c.id: c.name for c in classes}
        out["versions"][name] = {
            **v.to_dict(),
            "lineage": lineage,
            "images_read": sampled,
            "pixel_share": {names.get(i, str(i)): round(float(pix[i]) / total, 6) for i in v.class_ids},
            "ignore_share": round(float(pix[IGNORE_INDEX]) / total, 6),
            "provenance_share": {"precise": round(float(prov[0]) / total, 6), "pseudo": round(float(prov[1]) / total, 6),
                                 "predicted": round(float(prov[PROV_PREDICTED]) / total, 6),
                                 "reviewed": round(float(prov[PROV_REVIEWED]) / total, 6),
                                 "ignore": round(float(prov[IGNORE_INDEX]) / total, 6)},
        }
        if name != "v1":  # shares of each class's pixels that are pseudo or predicted, and reviewed
            out["versions"][name]["class_provenance"] = {
                names.get(i, str(i)): {"pixels": int(pix[i]),
                                       "pseudo_share": round(float(pseudo_pix[i]) / max(int(pix[i]), 1), 6),
                                       "reviewed_share": round(float(reviewed_pix[i]) / max(int(pix[i]), 1), 6)}
                for i in v.class_ids
            }
    return out


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text for `summarize_store`'s result."""
    lines = [f"store   {s['store']}  ({s['source']}, schema {s['schema_version']}, created {s['created']})",
             "images  " + ", ".join(f"{k} {v}" for k, v in s["splits"].items())]
    lines.append("classes " + ", ".join(
        f"{c['id']} {c['name']}" + (f" [pseudo: {c.get('prompt')!r}]" if c["source"] == "pseudo" else "")
        for c in s["classes"]))
    for name, v in s["versions"].items():
        lines.append(f"version {name}  lineage {' <- '.join(v['lineage'])}  policy {v['policy']}  "
                     f"created {v['created']}")
        share = ", ".join(f"{k} {100 * x:.1f}%" for k, x in v["pixel_share"].items())
        lines.append(f"  pixels  {share}, ignore {100 * v['ignore_share']:.1f}%  ({v['images_read']} images read)")
        ps = v["provenance_share"]
        lines.append(f"  provenance precise {100 * ps['precise']:.1f}%, pseudo {100 * ps['pseudo']:.1f}%, "
                     + (f"predicted {100 * ps['predicted']:.1f}%, " if ps.get("predicted") else "")
                     + (f"reviewed {100 * ps['reviewed']:.1f}%, " if ps.get("reviewed") else "")
                     + f"ignore {100 * ps['ignore']:.1f}%")
        if v.get("class_provenance"):
            lines.append("  pseudo share per class " + ", ".join(
                f"{k} {100 * c['pseudo_share']:.1f}%" + (f" (reviewed {100 * c['reviewed_share']:.1f}%)"
                                                          if c.get("reviewed_share") else "")
                for k, c in v["class_provenance"].items() if c["pixels"]))
    if s["drafts"]:
        lines.append(f"drafts  {', '.join(s['drafts'])} (unpublished; a rerun of merge finishes them, "
                     "`addclass discard-draft` deletes one)")
    for kind in ("eval", "reference"):
        for cls, per in s["hand_masks"][kind].items():
            lines.append(f"{kind:<7} {cls}: " + ", ".join(f"{sp} {n}" for sp, n in per.items()) + " hand masks")
    for cls, sec in s["pseudo"].items():
        lines.append(f"pseudo  {cls}: " + ", ".join(f"{k}={v}" for k, v in sec.items() if k != "labeler"))
    for model_id, m in s["models"]["models"].items():
        star = " (champion)" if model_id == s["models"]["champion"] else ""
        score = "unscored" if m["score"] is None else f"{m['score_split']} score {m['score']:.4f}"
        lines.append(f"model   {model_id}{star}: {m['label_version']}, {score}, {m['path']}")
    return "\n".join(lines)


def find_split(store: LabelStore, image_id: str) -> str:
    for split in store.splits():
        if image_id in store.image_ids(split):
            return split
    raise UnknownNameError(f"Unknown image id {image_id!r} in {store.path}.")


def render_overlay(path: str | os.PathLike[str], image_id: str, *, version: str = "latest") -> np.ndarray:
    """image | labels blended over the image | provenance (green precise, orange pseudo, blue predicted, purple
    reviewed, grey ignore)."""
    store = open_label_store(path, mode="r")
    split = find_split(store, image_id)
    image = store.read_image(split, image_id)
    labels, prov = store.read_labels_and_provenance(split, image_id, version=version)
    blend = (0.45 * image + 0.55 * colorize(labels)).astype(np.uint8)
    prov_rgb = np.zeros_like(image)
    prov_rgb[prov == 0] = (40, 160, 60)
    prov_rgb[prov == 1] = (255, 140, 0)
    prov_rgb[prov == PROV_PREDICTED] = (40, 110, 230)
    prov_rgb[prov == PROV_REVIEWED] = (170, 60, 200)
    prov_rgb[prov == IGNORE_INDEX] = (128, 128, 128)
    return np.concatenate([image, blend, prov_rgb], axis=1)  # H x 3W x 3


def write_overlay_png(path: str | os.PathLike[str], image_id: str, out: str | os.PathLike[str], *,
                      version: str = "latest", overwrite: bool = False) -> Path:
    """Writes the overlay of `image_id` to the PNG file `out` (refused if it exists, unless `overwrite`)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"Expected a .png file to write the overlay to. Got {out} instead.")
    if out.is_dir() or (out.exists() and not overwrite):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it." if not out.is_dir()
                              else f"{out} is a folder; name the .png file to write.")
    rgb = render_overlay(path, image_id, version=version)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Cannot write {out}.")
    return out
