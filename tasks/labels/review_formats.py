"""The exchange formats of a review (`tasks.labels.review`): each writes the exported masks as pre-annotations a
labelling tool imports, and reads the reviewed masks back, naming every problem before anything is written.

- ``coco``: ``annotations.json``, COCO instances (the class as the one category, one annotation per image with
  the mask as compressed RLE, ``iscrowd`` 1; written and decoded with pycocotools). CVAT's "COCO 1.0", FiftyOne
  and most tools import it and export it again. Every exported image counts as reviewed: an image the file has
  no annotation for is reviewed as "no such object here".
- ``labelstudio``: ``tasks.json`` (one Label Studio task per image, ``data.image`` its URL and
  ``data.addclass_image_id`` its id, the mask as a brush pre-annotation in Label Studio's RLE, encoded and
  decoded with label-studio-converter) and ``labeling_config.xml`` (an image with one BrushLabels tag naming
  the class). Reviewers' work comes back as Label Studio's JSON export saved as ``reviewed.json``; a task counts
  as reviewed when it has an annotation that was not cancelled (the newest one), so tasks nobody opened keep
  their labels. Brush and polygon results of the class are read (a reviewer may use either tool).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from addclass.common.errors import InputError

COCO_FILE = "annotations.json"
LS_TASKS = "tasks.json"
LS_CONFIG = "labeling_config.xml"
LS_REVIEWED = "reviewed.json"
# Label Studio's local-files URL; its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the export folder serves them
LS_IMAGE_URL = "/data/local-files/?d=images/"
LS_BRUSH, LS_IMAGE = "label", "image"  # the tag names in labeling_config.xml

__all__ = ["FORMATS", "READERS", "WRITERS", "reviewed_file"]


def write_coco(folder: Path, entries: Sequence[dict[str, Any]], masks: Sequence[np.ndarray], class_name: str,
               *, version: str) -> None:
    """``folder/annotations.json`` for the exported ``entries`` (manifest rows) and their ``masks``."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for entry, mask in zip(entries, masks, strict=True):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        images.append({"id": entry["coco_id"], "file_name": entry["file_name"], "height": entry["height"],
                       "width": entry["width"]})
        annotations.append({"id": entry["coco_id"], "image_id": entry["coco_id"], "category_id": 1, "iscrowd": 1,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": class_name}]}
    (folder / COCO_FILE).write_text(json.dumps(coco) + "\n")


def read_coco(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """{image id: reviewed mask} of every exported image, from ``folder/annotations.json``."""
    from pycocotools import mask as mask_utils

    path = folder / COCO_FILE
    coco = _read_json(path)
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
        _check_label(path, f"annotation {ann.get('id')}", categories.get(ann.get("category_id")), manifest)
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
    return masks


def write_labelstudio(folder: Path, entries: Sequence[dict[str, Any]], masks: Sequence[np.ndarray],
                      class_name: str, *, version: str) -> None:
    """``folder/tasks.json`` (brush pre-annotations) and ``folder/labeling_config.xml``."""
    from label_studio_converter.brush import mask2rle

    tasks = []
    for entry, mask in zip(entries, masks, strict=True):
        result = []
        if mask.any():
            result.append({"id": f"addclass-{entry['coco_id']}", "from_name": LS_BRUSH, "to_name": LS_IMAGE,
                           "type": "brushlabels", "original_width": entry["width"],
                           "original_height": entry["height"], "image_rotation": 0,
                           "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)],
                                     "brushlabels": [class_name]}})
        tasks.append({"data": {LS_IMAGE: LS_IMAGE_URL + entry["file_name"], "addclass_image_id": entry["image_id"]},
                      "predictions": [{"model_version": f"addclass {version}", "result": result}]})
    (folder / LS_TASKS).write_text(json.dumps(tasks) + "\n")
    (folder / LS_CONFIG).write_text(
        "<View>\n"
        f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}" zoom="true"/>\n'
        f'  <BrushLabels name="{LS_BRUSH}" toName="{LS_IMAGE}">\n'
        f'    <Label value={quoteattr(class_name)} background="#ff0000"/>\n'
        "  </BrushLabels>\n"
        "</View>\n")


def read_labelstudio(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """{image id: reviewed mask} of the tasks with a (not cancelled) annotation, from Label Studio's JSON
    export saved as ``folder/reviewed.json``."""
    path = folder / LS_REVIEWED
    tasks = _read_json(path)
    if not isinstance(tasks, list):
        raise InputError(f"{path}: expected Label Studio's JSON export (a list of tasks). Got {type(tasks).__name__}.")
    by_id = {e["image_id"]: e for e in manifest["images"]}
    by_file = {e["file_name"]: e for e in manifest["images"]}
    masks: dict[str, np.ndarray] = {}
    for task in tasks:
        data = task.get("data", {})
        entry = by_id.get(data.get("addclass_image_id")) or by_file.get(str(data.get(LS_IMAGE, "")).rsplit("/", 1)[-1])
        what = f"task {task.get('id')} ({data.get('addclass_image_id') or data.get(LS_IMAGE)})"
        if entry is None:
            raise InputError(f"{path}: {what} is not an image of this review export.")
        done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not done:
            continue  # nobody reviewed it: its labels stay
        newest = max(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        h, w = entry["height"], entry["width"]
        mask = np.zeros((h, w), bool)
        for region in newest.get("result", []):
            kind, value = region.get("type"), region.get("value", {})
            if kind not in ("brushlabels", "polygonlabels"):
                continue  # e.g. a relation or a text note: not a mask
            _check_label(path, f"{what}, region {region.get('id')}", (value.get(kind) or [None])[0], manifest)
            size = (region.get("original_height"), region.get("original_width"))
            if size != (h, w):
                raise InputError(f"{path}: {what}, region {region.get('id')} is a mask of {size[1]}x{size[0]}; "
                                 f"the image is {w}x{h}.")
            if kind == "brushlabels":
                mask |= _brush_mask(value, h, w, where=f"{path}: {what}, region {region.get('id')}")
            else:
                mask |= _polygon_mask(value, h, w)
        masks[entry["image_id"]] = mask
    return masks


def _brush_mask(value: dict[str, Any], h: int, w: int, *, where: str) -> np.ndarray:
    from label_studio_converter.brush import decode_rle

    flat = decode_rle(value.get("rle") or [0] * 5)  # H * W * 4 RGBA bytes
    if flat.size != h * w * 4:
        raise InputError(f"{where} is a brush mask of {flat.size // 4} pixels; the image is {w}x{h} ({w * h}).")
    return np.asarray(flat.reshape(h, w, 4)[:, :, 3] > 0)


def _polygon_mask(value: dict[str, Any], h: int, w: int) -> np.ndarray:
    import cv2

    points = np.asarray(value.get("points", []), np.float64).reshape(-1, 2)  # x, y in % of the image
    canvas = np.zeros((h, w), np.uint8)
    if len(points) >= 3:
        xy = np.round(points / 100.0 * [w, h]).astype(np.int32)
        cv2.fillPoly(canvas, [xy], 1)
    return canvas > 0


def _check_label(path: Path, what: str, name: str | None, manifest: dict[str, Any]) -> None:
    if name != manifest["class"]:
        raise InputError(f"{path}: {what} has label {name!r}; this review is of {manifest['class']!r}.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot read the reviewed annotations {path}: {e}") from e


Writer = Callable[..., None]
Reader = Callable[[Path, dict[str, Any]], dict[str, np.ndarray]]
WRITERS: dict[str, Writer] = {"coco": write_coco, "labelstudio": write_labelstudio}
READERS: dict[str, Reader] = {"coco": read_coco, "labelstudio": read_labelstudio}
FORMATS = tuple(WRITERS)
REVIEWED_FILES = {"coco": COCO_FILE, "labelstudio": LS_REVIEWED}


def reviewed_file(folder: Path, fmt: str) -> Path:
    """The file an import of a ``fmt`` review reads."""
    return folder / REVIEWED_FILES[fmt]
