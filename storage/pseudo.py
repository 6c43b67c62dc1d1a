"""Pseudo-label results in a label store: `pseudo/<class>/<split>/<image id>`.

Each image's union mask is a uint8 0/1 array; its attributes hold the labeler's record (instance masks as
RLE, boxes, scores, phrases), the `settings_key` of the labeler settings that produced it, and `done` (written
last). A rerun skips images whose `done` record has the same settings key, so an interrupted run resumes, and
a run with other settings relabels. Workers write only their own images; the run summary in the store
document (`sections["pseudo"][class]`) is written by the lock holder. The keys are made by the caller
(`tasks.labels.pseudo_label.settings_key`); this module stores and compares them as given.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from addclass.common.errors import InputError, UnknownNameError
from addclass.storage.names import parse_class_name, parse_image_id, parse_split
from addclass.storage.store import LabelStore

SECTION = "pseudo"


def _key(class_name: str, split: str, image_id: str) -> str:
    return f"{SECTION}/{parse_class_name(class_name)}/{parse_split(split)}/{parse_image_id(image_id)}"


def write_pseudo_result(store: LabelStore, class_name: str, split: str, image_id: str, *, mask: np.ndarray,
                        record: dict[str, Any], key: str) -> None:
    """Write one image's pseudo label (union mask + record); replaces an earlier or unfinished result."""
    store._require_writable()
    rec = store.image_record(split, image_id)
    if mask.shape != (rec.height, rec.width):
        raise InputError(f"Pseudo mask for {image_id!r} is {mask.shape}, but the image is {(rec.height, rec.width)}.")
    store._write_array(_key(class_name, split, image_id), mask.astype(np.uint8),
                       attrs={"record": record, "settings_key": key}, overwrite=True)


def pseudo_done(store: LabelStore, class_name: str, split: str, image_id: str, *, key: str) -> bool:
    """True if this image has a finished result made with the settings `key`."""
    try:
        attrs = store.root[_key(class_name, split, image_id)].attrs
    except KeyError:
        return False
    return bool(attrs.get("done")) and attrs.get("settings_key") == key


def read_pseudo_mask(store: LabelStore, class_name: str, split: str, image_id: str) -> np.ndarray:
    """The union mask (H x W bool) of a finished pseudo label."""
    try:
        arr = store.array(_key(class_name, split, image_id))
    except KeyError:
        raise UnknownNameError(f"No pseudo label for class {class_name!r}, image {image_id!r} ({split}) in {store.path}; "
                       f"run `addclass pseudo-label` first.") from None
    if not arr.attrs.get("done"):
        raise UnknownNameError(f"Pseudo label of {image_id!r} for {class_name!r} is unfinished; rerun pseudo-label.")
    return np.asarray(arr[...]).astype(bool)


def read_pseudo_record(store: LabelStore, class_name: str, split: str, image_id: str) -> dict[str, Any]:
    """The stored labeler record (boxes, scores, phrases, RLE instances, extra) of one image."""
    return dict(cast(dict[str, Any], store.root[_key(class_name, split, image_id)].attrs["record"]))


def missing_pseudo(store: LabelStore, class_name: str, split: str, *, key: str | None = None) -> list[str]:
    """Image ids of `split` without a finished pseudo label (with settings `key`, if given)."""
    out = []
    for image_id in store.image_ids(split):
        try:
            attrs = store.root[_key(class_name, split, image_id)].attrs
        except KeyError:
            out.append(image_id)
            continue
        if not attrs.get("done") or (key is not None and attrs.get("settings_key") != key):
            out.append(image_id)
    return out


def record_pseudo_run(store: LabelStore, class_name: str, *, prompt: str, labeler: dict[str, Any], key: str,
                      split: str, images: int, detections: int) -> None:
    """Note a finished run in the store document (lock holder only)."""
    runs = store.section(SECTION)
    entry = runs.get(class_name, {})
    if entry.get("settings_key") != key:
        entry = {"prompt": prompt, "labeler": labeler, "settings_key": key, "splits": {}}
    entry["splits"][split] = {"images": images, "detections": detections}
    runs[class_name] = entry
    store.set_section(SECTION, runs)


def pseudo_runs(store: LabelStore) -> dict[str, dict[str, Any]]:
    """{class: {prompt, labeler, settings_key, splits: {split: {images, detections}}}}."""
    return store.section(SECTION)
