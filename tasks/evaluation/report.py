"""Report building blocks: markdown tables of scores and overlay PNGs of the best and worst images.

Store-independent: inputs are summary dicts (``MetricAccumulator.summary`` / ``evaluate_mask_folders``),
arrays and paths. `tasks.evaluation.evaluation_report` builds the evaluation report (``metrics.json``, ``report.md`` and
the overlays) from them.

Number formats follow the paper: IoU and BIoU in percent with 2 decimals (MaSS13K prints ``round(100 x, 2)``),
BF1 as a fraction with 4 decimals. Missing values (class absent) print as ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from addclass.common.errors import InputError
from addclass.models.metrics import boundary_errors
from addclass.models.palette import RGB, colorize

__all__ = [
    "FALSE_BOUNDARY_COLOR",
    "MISSED_BOUNDARY_COLOR",
    "format_fraction",
    "format_percent",
    "overlay_image",
    "per_class_table",
    "select_images",
    "summary_table",
    "write_overlays",
]

FALSE_BOUNDARY_COLOR: RGB = (255, 0, 0)  # predicted boundary with no gt boundary of its class within 2 px
MISSED_BOUNDARY_COLOR: RGB = (255, 255, 0)  # gt boundary with no predicted boundary of its class within 2 px

OverlayInputs = tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def format_percent(x: float | None) -> str:
    """A fraction as a percentage with 2 decimals (``0.88214`` -> ``"88.21"``); ``n/a`` when missing."""
    return "n/a" if _missing(x) else f"{100 * float(x):.2f}"  # type: ignore[arg-type]


def format_fraction(x: float | None) -> str:
    """A fraction with 4 decimals (``0.55931`` -> ``"0.5593"``); ``n/a`` when missing."""
    return "n/a" if _missing(x) else f"{float(x):.4f}"  # type: ignore[arg-type]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per named result: mean scores over classes.

    Args:
        rows: Name (e.g. ``"Pseudo Label"``, ``"Model"``) -> summary dict with ``means``.

    Returns:
        Markdown ``| Method | mIoU (%) | mBIoU (%) | mBF1 | aAcc (%) | Images |``.
    """
    body = []
    for name, res in rows.items():
        means = res["means"]
        body.append(
            [
                name,
                format_percent(means.get("miou")),
                format_percent(means.get("mbiou")),
                format_fraction(means.get("mbf1")),
                format_percent(means.get("aAcc")),
                str(res.get("num_images", "")),
            ]
        )
    return _table(["Method", "mIoU (%)", "mBIoU (%)", "mBF1", "aAcc (%)", "Images"], body)


def per_class_table(
    rows: Mapping[str, Mapping[str, Any]], *, classes: Sequence[int | str] | None = None
) -> str:
    """Per-class scores of several named results, grouped by class.

    Args:
        rows: Name -> summary dict with ``per_class`` (list of ``{id, name, iou, biou, bf1}``).
        classes: Class ids or names to show (default: every class of every row, in id order). For
            class-vs-rest results pass the new class's name to show its own IoU/BIoU/BF1.

    Returns:
        Markdown ``| Class | Method | IoU (%) | BIoU (%) | BF1 |``.
    """
    order: list[str] = []
    by_row: dict[str, dict[str, Mapping[str, Any]]] = {}
    for method, res in rows.items():
        by_row[method] = {}
        for entry in res["per_class"]:
            name = str(entry["name"])
            by_row[method][name] = entry
            by_row[method][str(entry["id"])] = entry
            if name not in order:
                order.append(name)
    wanted = [str(c) for c in classes] if classes is not None else order
    body = []
    for cls in wanted:
        for method in rows:
            entry = by_row[method].get(cls)
            if entry is None:
                continue
            body.append(
                [
                    str(entry["name"]),
                    method,
                    format_percent(entry.get("iou")),
                    format_percent(entry.get("biou")),
                    format_fraction(entry.get("bf1")),
                ]
            )
    return _table(["Class", "Method", "IoU (%)", "BIoU (%)", "BF1"], body)


# ----------------------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------------------


def _resize_labels(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return x if x.shape[1::-1] == size else cv2.resize(x, size, interpolation=cv2.INTER_NEAREST)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Max-pool style downscale: a pixel is set if any source pixel it covers is (1-px lines survive)."""
    if mask.shape[1::-1] == size:
        return mask
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0


def _panel(
    labels: np.ndarray,
    image: np.ndarray | None,
    size: tuple[int, int],
    alpha: float,
    ignore_index: int,
    palette: Mapping[int, RGB] | None,
) -> np.ndarray:
    color = colorize(_resize_labels(labels, size), palette, ignore_index=ignore_index)
    if image is None:
        return color
    return cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)


def _title(panel: np.ndarray, text: str) -> None:
    scale = max(0.4, panel.shape[1] / 900)
    thick = max(1, round(scale * 2))
    org = (8, int(24 * scale) + 4)
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def overlay_image(
    image_rgb: np.ndarray | None,
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    pseudo: np.ndarray | None = None,
    pseudo_class: int | None = None,
    palette: Mapping[int, RGB] | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    alpha: float = 0.5,
    max_width: int | None = None,
    titles: bool = True,
) -> np.ndarray:
    """Panels side by side: image | prediction | ground truth | (pseudo label).

    The prediction panel highlights BF1 boundary errors: predicted boundary points with no gt boundary of the
    same class within 2 px in ``FALSE_BOUNDARY_COLOR`` (red), missed gt boundary points in
    ``MISSED_BOUNDARY_COLOR`` (yellow).

    Args:
        image_rgb: H x W x 3 uint8 RGB image, or None to draw label colours only (no image panel).
        pred: H x W predicted labels at the gt size.
        gt: H x W ground truth labels.
        pseudo: Optional H x W pseudo label map, or bool mask, for a fourth panel.
        pseudo_class: Class id drawn for a bool ``pseudo`` mask (default: the last class,
            ``num_classes - 1``).
        palette: Colour overrides (``models.palette``).
        num_classes: C for the boundary errors (default: largest non-ignore label + 1).
        ignore_index: Void label.
        alpha: Label colour opacity over the image.
        max_width: Downscale each panel to at most this width (errors are max-pooled so they stay visible).
        titles: Write panel names.

    Returns:
        H' x (n_panels * W') x 3 uint8 RGB image.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise InputError(f"Expected H x W pred and gt of one shape. Got {pred.shape} and {gt.shape} instead.")
    h, w = gt.shape
    if image_rgb is not None and image_rgb.shape[:2] != (h, w):
        image_rgb = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_AREA)
    if num_classes is None:
        values = np.concatenate([np.unique(pred), np.unique(gt)])
        values = values[(values != ignore_index) & (values >= 0)]
        num_classes = int(values.max()) + 1 if values.size else 1
    false_b, missed_b = boundary_errors(pred, gt, num_classes=num_classes, ignore_index=ignore_index)

    scale = min(1.0, max_width / w) if max_width else 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 (width, height)
    image: np.ndarray | None = None
    if image_rgb is not None:
        image = np.ascontiguousarray(image_rgb[..., :3], dtype=np.uint8)
        if scale < 1.0:
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)

    panels: list[tuple[str, np.ndarray]] = []
    if image is not None:
        panels.append(("image", image.copy()))
    pred_panel = _panel(pred, image, size, alpha, ignore_index, palette)
    pred_panel[_resize_mask(missed_b, size)] = MISSED_BOUNDARY_COLOR
    pred_panel[_resize_mask(false_b, size)] = FALSE_BOUNDARY_COLOR
    panels.append(("prediction", pred_panel))
    panels.append(("ground truth", _panel(gt, image, size, alpha, ignore_index, palette)))
    if pseudo is not None:
        pseudo_labels = np.asarray(pseudo)
        if pseudo_labels.dtype == np.bool_:
            fg = pseudo_class if pseudo_class is not None else max(1, num_classes - 1)
            pseudo_labels = np.where(pseudo_labels, fg, 0).astype(np.uint8)
        panels.append(("pseudo label", _panel(pseudo_labels, image, size, alpha, ignore_index, palette)))
    if titles:
        for name, panel in panels:
            _title(panel, name)
    return np.concatenate([p for _, p in panels], axis=1)  # H' x (n * W') x 3


def select_images(
    per_image: Sequence[Mapping[str, Any]], *, k: int, key: str = "miou"
) -> dict[str, list[Mapping[str, Any]]]:
    """The k worst and k best images by a per-image score (images without a score are skipped).

    Args:
        per_image: Entries with ``name`` and ``key`` (e.g. ``evaluate_mask_folders(...)["per_image"]``).
        k: How many of each.
        key: Score to rank by.

    Returns:
        ``{"worst": [...ascending], "best": [...descending]}``, disjoint; ties keep the input order.
    """
    scored = [e for e in per_image if not _missing(e.get(key))]
    ranked = sorted(scored, key=lambda e: float(e[key]))
    worst = ranked[:k]
    rest = ranked[len(worst) :]
    best = list(reversed(rest))[:k]
    return {"worst": worst, "best": best}


def write_overlays(
    out_dir: str | Path,
    per_image: Sequence[Mapping[str, Any]],
    *,
    load: Callable[[str], OverlayInputs],
    k: int = 3,
    key: str = "miou",
    num_classes: int | None = None,
    palette: Mapping[int, RGB] | None = None,
    ignore_index: int = 255,
    max_width: int | None = 1024,
) -> dict[str, list[Path]]:
    """Overlay PNGs for the k worst and best images by per-image score.

    Args:
        out_dir: Folder to write ``worst_01_<stem>.png``, ``best_01_<stem>.png``, ... into (created).
        per_image: Entries with ``name`` and ``key``.
        load: ``load(name) -> (image_rgb or None, pred, gt, pseudo or None)``.
        k: Images per side.
        key: Score to rank by.
        num_classes: C for boundary errors.
        palette: Colour overrides.
        ignore_index: Void label.
        max_width: Panel width limit.

    Returns:
        ``{"worst": [paths], "best": [paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"worst": [], "best": []}
    for side, entries in select_images(per_image, k=k, key=key).items():
        for rank, entry in enumerate(entries, start=1):
            name = str(entry["name"])
            image, pred, gt, pseudo = load(name)
            rgb = overlay_image(
                image,
                pred,
                gt,
                pseudo=pseudo,
                palette=palette,
                num_classes=num_classes,
                ignore_index=ignore_index,
                max_width=max_width,
            )
            path = out / f"{side}_{rank:02d}_{Path(name).stem}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise OSError(f"Cannot write overlay {str(path)!r}.")
            written[side].append(path)
    return written
