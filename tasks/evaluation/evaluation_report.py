"""The evaluation report of `tasks.evaluation.evaluate` results: ``metrics.json``, ``report.md`` and overlay PNGs of the
k worst and best images by new-class IoU (from saved prediction PNGs, or by re-running the checkpoint on just
those images). The tables and overlay drawing are `tasks.evaluation.report`; this module adds the store: hand masks,
pseudo masks and the images behind the overlays."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from addclass.storage.pseudo import read_pseudo_mask
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.evaluation.evaluate import SPLIT_ORDER, hand_mask_kinds, predict_labels, read_hand_or_none
from addclass.tasks.evaluation.evaluate_scoring import all_classes_ground_truth, new_class_indices
from addclass.tasks.evaluation.evaluation_results import (
    ModelEvaluation,
    PseudoEvaluation,
    PseudoSplitResult,
    SplitResult,
)
from addclass.tasks.evaluation.report import (
    format_percent,
    per_class_table,
    select_images,
    summary_table,
    write_overlays,
)
from addclass.tasks.model_files.model_folder import load_trained_model
from addclass.tasks.training.validation import CURVE_FILE, learning_curve_png

__all__ = ["write_evaluation_report"]


def _ordered(splits: Iterable[str]) -> list[str]:
    return sorted(splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))


def _predictions(
    model_results: ModelEvaluation,
    store: LabelStore,
    *,
    pred_dir: str | os.PathLike[str] | None,
    model: Any,
) -> Callable[[str, str], np.ndarray] | None:
    """``predict(split, id) -> H x W labels`` for overlays: saved PNGs, else the model run on that image."""
    root = pred_dir if pred_dir is not None else model_results.pred_dir
    if root is not None:
        folder = Path(root)

        def read(split: str, image_id: str) -> np.ndarray:
            pred = cv2.imread(str(folder / split / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
            if pred is None:
                raise FileNotFoundError(f"Missing prediction {folder / split / f'{image_id}.png'}.")
            return pred

        return read
    device = model_results.device
    if model is None and model_results.checkpoint:
        model = load_trained_model(model_results.checkpoint, device=device)
    if model is None:
        return None

    def run(split: str, image_id: str) -> np.ndarray:
        return predict_labels(model, [store.read_image(split, image_id)], device)[0]

    return run


def _overlay_loader(
    store: LabelStore, predict: Callable[[str, str], np.ndarray], class_id: int, class_name: str,
    new: Sequence[tuple[int, str]],
) -> Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """``load("split/id") -> (image, K-class prediction, ground truth, pseudo label or None)``."""

    def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        split, image_id = name.split("/", 1)
        precise = store.read_labels(split, image_id, version="v1")
        masks = [(cid, read_hand_or_none(store, hand_mask_kinds(store, n, split), n, image_id)) for cid, n in new]
        gt = all_classes_ground_truth(precise, [(cid, m) for cid, m in masks if m is not None])
        try:  # the raw pseudo mask drawn over the precise labels
            pseudo = np.where(read_pseudo_mask(store, class_name, split, image_id), class_id, precise)
        except KeyError:
            pseudo = None
        return store.read_image(split, image_id), predict(split, image_id), gt, pseudo

    return load


def _pseudo_note(name: str, pseudo_splits: Iterable[str], model_splits: Iterable[str],
                 skipped: Mapping[str, str]) -> str:
    scored = _ordered(pseudo_splits)
    missing = [s for s in _ordered(model_splits) if s not in scored]
    if not missing:
        return ""
    why = "; ".join(f"{s}: {skipped[s]}" for s in missing if s in skipped)
    return (
        f"\nPseudo labels of {name} are scored on the splits that have both pseudo labels and hand masks "
        f"({', '.join(scored) or 'none'}). No pseudo-label row for {', '.join(missing)}"
        + (f" ({why})" if why else "")
        + (". Evaluation masks never feed a labeler, so test images are not pseudo-labelled" if "test" in missing
           else "")
        + ".\n"
    )


def _learning_curve(model_results: ModelEvaluation | None, out: Path) -> Path | None:
    """The learning curve of the evaluated model's training run, drawn into ``out``; None without a run log."""
    checkpoint = None if model_results is None else model_results.checkpoint
    if not checkpoint:
        return None
    here = Path(checkpoint)
    for run_dir in (here, here.parent, here.parent.parent):  # RUN, RUN/final, RUN/checkpoints/step_N
        if (run_dir / "train_log.jsonl").is_file():
            return learning_curve_png(run_dir, out / CURVE_FILE)
    return None


def write_evaluation_report(
    out_dir: str | os.PathLike[str],
    *,
    model_results: ModelEvaluation | None,
    pseudo_results: PseudoEvaluation | None,
    title: str = "addclass evaluation",
    k: int = 3,
    pred_dir: str | os.PathLike[str] | None = None,
    model: Any = None,
    max_width: int | None = 1024,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and overlays of the k worst and best images per new class.

    ``report.md``: per new class a table with rows ``Pseudo Label (<split>)`` and ``Model (<split>)`` (the
    class's own IoU / BIoU / BF1 against its hand masks), the 7-class table (summary and per class, one row
    per split) and, where available, the all-classes table. Overlays
    (``overlays/<class>/{worst,best}_NN_<id>.png``: image | prediction with BF1 boundary errors | ground truth
    (rule 3 with the hand masks the image has) | pseudo label over the v1 labels, when the image has one)
    rank the evaluated images of all splits by the class's per-image IoU. Their predictions come from
    ``pred_dir`` (default ``model_results.pred_dir``), else from ``model`` or the checkpoint re-run on just
    those images.

    Args:
        out_dir: Report folder (created).
        model_results: ``evaluate_model`` output, or None.
        pseudo_results: ``evaluate_pseudo`` output, or None.
        title: Report heading.
        k: Overlays per side and class.
        pred_dir: Folder of predicted PNGs (``<split>/<id>.png``).
        model: Model for the overlay predictions when there are no PNGs (default: load the checkpoint).
        max_width: Panel width limit of the overlays.

    Returns:
        Written files by path relative to ``out_dir``: ``metrics.json``, ``report.md``,
        ``overlays/<class>/<file>.png``, ...
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_splits: Mapping[str, SplitResult] = {} if model_results is None else model_results.splits
    pseudo_classes: Mapping[str, Mapping[str, PseudoSplitResult]] = {} if pseudo_results is None else pseudo_results.classes
    new_classes = [] if model_results is None else list(model_results.new_classes)
    new_classes += [c for c in pseudo_classes if c not in new_classes]
    paths: dict[str, Path] = {}

    md = [f"# {title}\n\n", *_intro(model_results)]
    for name in new_classes:
        md += _new_class_section(name, model_splits, pseudo_classes.get(name, {}), pseudo_results)
    if model_splits:
        md += _model_tables(model_splits)

    curve = _learning_curve(model_results, out)
    if curve is not None:
        paths[curve.name] = curve
        md.append(f"\n## Learning curve\n\nTraining loss and the validation scores during training.\n\n"
                  f"![learning curve]({curve.name})\n")

    overlays: dict[str, dict[str, list[str]]] = {}
    if model_results is not None and model_results.new_classes:
        sections, overlays, overlay_paths = _overlay_sections(
            out, model_results, pred_dir=pred_dir, model=model, k=k, max_width=max_width
        )
        md += sections
        paths.update(overlay_paths)

    doc = {"title": title, "model": None if model_results is None else model_results.to_dict(),
           "pseudo": None if pseudo_results is None else pseudo_results.to_dict(), "overlays": overlays}
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text("".join(md))
    return {"metrics.json": out / "metrics.json", "report.md": out / "report.md", **paths}


def _intro(model_results: ModelEvaluation | None) -> list[str]:
    """The lines under the title: what was evaluated (with model results) and how the ground truth is made."""
    md: list[str] = []
    if model_results is not None:
        md.append(
            f"Store `{model_results.store}`, checkpoint `{model_results.checkpoint}`, "
            f"label version `{model_results.label_version}` ({len(model_results.classes)} classes: "
            f"{', '.join(c['name'] for c in model_results.classes)}).\n\n"
        )
        if model_results.pred_dir:
            md.append(f"Predicted labels: `{model_results.pred_dir}` (`<split>/<id>.png`, class ids).\n\n")
    md.append(
        "Ground truth: a new class is scored class-vs-rest against its hand masks (`eval` on test, "
        "`reference` on train/val); the 7-class score folds every new class into *others* and compares with "
        "the precise v1 labels; the all-classes score carves the hand masks into v1 where v1 is *others*. "
        "IoU and BIoU in %, "
        "BF1 as a fraction (2 px tolerance); `n/a`: class absent.\n"
    )
    return md


def _new_class_section(
    name: str,
    model_splits: Mapping[str, SplitResult],
    pseudo_splits: Mapping[str, PseudoSplitResult],
    pseudo_results: PseudoEvaluation | None,
) -> list[str]:
    """A new class's table: rows ``Pseudo Label (<split>)`` then ``Model (<split>)``, and the pseudo note."""
    rows: dict[str, Mapping[str, Any]] = {
        f"Pseudo Label ({s})": pseudo_splits[s].scores.summary.to_dict() for s in _ordered(pseudo_splits)
    }
    for s in _ordered(model_splits):
        if name in model_splits[s].new_classes:
            rows[f"Model ({s})"] = model_splits[s].new_classes[name].summary.to_dict()
    md = [f"\n## {name} (class vs rest, against hand masks)\n\n"]
    md.append(per_class_table(rows, classes=[name]) if rows else "No split has hand masks for it.\n")
    if pseudo_results is not None:
        skipped = pseudo_results.skipped.get(name, {})
        md.append(_pseudo_note(name, pseudo_splits, model_splits, skipped))
    return md


def _model_tables(model_splits: Mapping[str, SplitResult]) -> list[str]:
    """The 7-class tables and, where some split has it, the all-classes tables (one row per split)."""
    precise = {f"Model ({s})": model_splits[s].precise.to_dict() for s in _ordered(model_splits)}
    md = ["\n## Precise classes (new classes folded into others, against v1)\n\n"]
    md.append(summary_table(precise) + "\n" + per_class_table(precise))
    full = {
        f"Model ({s})": all_.to_dict() for s in _ordered(model_splits) if (all_ := model_splits[s].all) is not None
    }
    if full:
        md.append("\n## All classes (hand masks carved into v1)\n\n")
        md.append(summary_table(full) + "\n" + per_class_table(full))
    return md


def _overlay_sections(
    out: Path,
    model_results: ModelEvaluation,
    *,
    pred_dir: str | os.PathLike[str] | None,
    model: Any,
    k: int,
    max_width: int | None,
) -> tuple[list[str], dict[str, dict[str, list[str]]], dict[str, Path]]:
    """Write the overlays of every new class.

    Without saved predictions or a model to rerun, nothing is drawn and the section says so.

    Returns:
        ``(report.md sections, {class: {side: [path relative to out]}}, {path relative to out: path})``.
    """
    store = open_label_store(model_results.store)
    predict = _predictions(model_results, store, pred_dir=pred_dir, model=model)
    if predict is None:
        return ["\nNo overlays: no saved predictions (`pred_dir`) and no checkpoint to rerun.\n"], {}, {}
    model_splits = model_results.splits
    new = new_class_indices(model_results.classes, model_results.num_precise)
    md: list[str] = []
    overlays: dict[str, dict[str, list[str]]] = {}
    paths: dict[str, Path] = {}
    for cid, name in new:
        entries = [
            {"name": f"{s}/{e['id']}", "iou": e["new_classes"].get(name, {}).get("iou")}
            for s in _ordered(model_splits)
            for e in model_splits[s].per_image
        ]
        chosen = select_images(entries, k=k, key="iou")
        written = write_overlays(
            out / "overlays" / name, entries, load=_overlay_loader(store, predict, cid, name, new),
            k=k, key="iou", num_classes=len(model_results.classes), max_width=max_width,
        )
        overlays[name] = {s: [p.relative_to(out).as_posix() for p in ps] for s, ps in written.items()}
        if not any(written.values()):
            continue
        md.append(
            f"\n## Overlays: {name}, the {k} worst and best images by IoU\n\nPanels: image | prediction "
            "| ground truth | pseudo label (where the image has one). Red: predicted boundary not within "
            "2 px of the ground truth; yellow: missed ground-truth boundary.\n"
        )
        for side, ps in written.items():
            for p, entry in zip(ps, chosen[side], strict=True):
                rel = p.relative_to(out).as_posix()
                paths[rel] = p
                score = format_percent(entry["iou"])
                md.append(f"\n{side} `{entry['name']}`, IoU {score} %\n\n![{p.stem}]({rel})\n")
    return md, overlays, paths
