"""Score two folders of PNG label maps (``addclass evaluate-masks``), independent of any store or model.

Both folders hold single-channel label PNGs (8 or 16 bit) with the same file names and sizes: class
ids 0..C-1, ``ignore_index`` (255) for void in the ground truth. Metrics are those of ``models.metrics``:
per-image counts summed over the folder, then mIoU, Boundary IoU and Boundary F1 per class and their
NaN-means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from addclass.common.errors import InputError
from addclass.models.metrics import MetricAccumulator, metrics_from_counts, metrics_summary

__all__ = ["evaluate_mask_folders", "folder_loader", "list_label_pngs", "read_label_png"]


def list_label_pngs(folder: str | Path) -> list[str]:
    """Sorted names of the ``.png`` files directly inside a folder.

    Args:
        folder: A directory.

    Returns:
        File names (not paths), sorted.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: It holds no PNG file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Label folder {str(folder)!r} does not exist or is not a directory.")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not names:
        raise InputError(f"Label folder {str(folder)!r} contains no .png files.")
    return names


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as stored: grey values unchanged (8 or 16 bit), a palette PNG's indices
    (as mmseg reads them; `addclass predict` writes palette PNGs of class ids).

    Args:
        path: PNG file.

    Returns:
        H x W uint8 or uint16 label map.

    Raises:
        ValueError: Unreadable, or not a single-channel integer image (the message names the file).
    """
    if _is_palette_png(path):
        with Image.open(path) as im:
            return np.ascontiguousarray(np.asarray(im), dtype=np.uint8)
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise InputError(f"Cannot read {str(path)!r} as an image.")
    if labels.ndim != 2:
        raise InputError(
            f"{str(path)!r} is not a single-channel label map: shape {labels.shape}. Save label maps as "
            "grey or palette PNGs of class ids, not colour images."
        )
    if labels.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{str(path)!r} has dtype {labels.dtype}; expected an 8- or 16-bit label PNG.")
    return labels


def _is_palette_png(path: str | Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.mode == "P"
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # cv2 names the unreadable file


def _check_names(pred_names: list[str], gt_names: list[str], pred_dir: Path, gt_dir: Path) -> None:
    only_pred = sorted(set(pred_names) - set(gt_names))
    only_gt = sorted(set(gt_names) - set(pred_names))
    if only_pred or only_gt:
        parts = []
        if only_pred:
            parts.append(f"{len(only_pred)} only in {str(pred_dir)!r} (first: {only_pred[:5]})")
        if only_gt:
            parts.append(f"{len(only_gt)} only in {str(gt_dir)!r} (first: {only_gt[:5]})")
        raise InputError("Prediction and ground-truth file names differ: " + "; ".join(parts) + ".")


def _check_values(labels: np.ndarray, path: Path, *, num_classes: int, ignore_index: int | None) -> None:
    """Raises ValueError naming ``path`` when it holds a value that is neither a class id (< ``num_classes``)
    nor ``ignore_index`` (None: predictions, which must hold class ids only)."""
    values = np.unique(labels)
    bad = values[(values >= num_classes) & (values != (-1 if ignore_index is None else ignore_index))]
    if bad.size:
        allowed = f"0..{num_classes - 1}" + ("" if ignore_index is None else f" or {ignore_index} (ignore)")
        raise InputError(
            f"{str(path)!r} holds values {bad[:10].tolist()} outside the classes: expected {allowed} "
            f"(--num-classes {num_classes})."
        )


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluate_mask_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU, BIoU and BF1 of the label PNGs in ``pred_dir`` against those in ``gt_dir``.

    Args:
        pred_dir: Folder of predicted label PNGs.
        gt_dir: Folder of ground-truth label PNGs with the same file names and sizes.
        num_classes: C; classes are 0..C-1.
        ignore_index: Void label of the ground truth.
        class_names: Names of classes 0..C-1 (default ``class_<i>``).
        progress: Show a tqdm progress bar.

    Returns:
        A JSON-serialisable dict (NaN written as ``None``, scores as fractions):
        ``num_images``, ``num_classes``, ``ignore_index``, ``pred_dir``, ``gt_dir``,
        ``per_class`` (list of ``{id, name, iou, biou, bf1, acc, bf_precision, bf_recall}``),
        ``means`` (``miou``, ``mbiou``, ``mbf1``, ``macc``, ``aAcc``), ``counts`` (the dataset-summed int
        counts, ``models.metrics.COUNT_KEYS``) and ``per_image`` (list of ``{name, height, width, miou,
        mbiou, mbf1, aAcc}`` from each image's own counts, in file-name order) for best/worst selection.

    Raises:
        FileNotFoundError: A folder is missing.
        ValueError: Empty folder, different file names, a size mismatch or a non-single-channel PNG (the
            message names the file).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pred_names = list_label_pngs(pred_dir)
    gt_names = list_label_pngs(gt_dir)
    _check_names(pred_names, gt_names, pred_dir, gt_dir)

    acc = MetricAccumulator(num_classes=num_classes, ignore_index=ignore_index)
    per_image: list[dict[str, Any]] = []
    names: Sequence[str] = gt_names
    if progress:
        from tqdm import tqdm  # type: ignore[import-untyped]

        names = tqdm(gt_names, desc="evaluate-masks", unit="img")
    for name in names:
        gt = read_label_png(gt_dir / name)
        pred = read_label_png(pred_dir / name)
        if pred.shape != gt.shape:
            raise InputError(
                f"{name!r}: prediction {str(pred_dir / name)!r} is {pred.shape[0]}x{pred.shape[1]} but "
                f"ground truth {str(gt_dir / name)!r} is {gt.shape[0]}x{gt.shape[1]} (H x W)."
            )
        _check_values(pred, pred_dir / name, num_classes=num_classes, ignore_index=None)
        _check_values(gt, gt_dir / name, num_classes=num_classes, ignore_index=ignore_index)
        counts = acc.update(pred, gt)
        scores = metrics_from_counts(counts)
        per_image.append(
            {
                "name": name,
                "height": int(gt.shape[0]),
                "width": int(gt.shape[1]),
                **{k: _json_float(scores[k]) for k in ("miou", "mbiou", "mbf1", "aAcc")},
            }
        )

    summary = metrics_summary(
        acc.counts, num_images=acc.num_images, class_names=class_names, ignore_index=ignore_index
    )
    return {**summary, "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "per_image": per_image}


def folder_loader(
    pred_dir: str | Path, gt_dir: str | Path, *, image_dir: str | Path | None = None
) -> Callable[[str], tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]]:
    """A ``load(name)`` for ``tasks.evaluation.report.write_overlays`` over label folders.

    Args:
        pred_dir: Folder of predicted label PNGs.
        gt_dir: Folder of ground-truth label PNGs.
        image_dir: Optional folder of the RGB images; an image is looked up by the label file's stem with
            any of the extensions .png, .jpg, .jpeg.

    Returns:
        ``load(name) -> (image_rgb or None, pred, gt, None)``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    image_root = Path(image_dir) if image_dir is not None else None

    def load(name: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]:
        image = None
        if image_root is not None:
            for ext in (".png", ".jpg", ".jpeg", ".JPG", ".PNG"):
                candidate = image_root / (Path(name).stem + ext)
                if candidate.is_file():
                    bgr = cv2.imread(str(candidate), cv2.IMREAD_COLOR)
                    if bgr is not None:
                        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                    break
        return image, read_label_png(pred_dir / name), read_label_png(gt_dir / name), None

    return load
