"""Evaluate a trained checkpoint and the stored pseudo labels against hand masks (``addclass evaluate``).

A store whose label version has the precise classes 0..6 (``source == "precise"``) and new pseudo classes 7,
8, ... is scored with four ground-truth rules. All metrics are ``models.metrics`` (mIoU, BIoU, BF1:
per-image int64 counts summed over the split) at the ground-truth resolution, the image's own size
(docs/design.md §4.1): the model predicts at full resolution (it pads internally and crops back), so
nothing is resized.

1. **Precise-class score ("7 classes").** The prediction with every new class folded back to 0 ("others") is
   scored with K = 7 against the **v1** precise labels (255 ignored). This is the paper's 7-class
   comparison; it never uses pseudo labels as truth. A new class predicted on a precise-class pixel (a car
   on a building) is therefore "others" there and counts against that class.
2. **New-class score (per new class c, binary class-vs-rest).** ``prediction == c`` against the hand mask of
   c (1 = c, 0 = rest, 255 ignore): ``eval/<c>`` masks on the test split, ``reference/<c>`` masks on
   train/val. Only images with a hand mask count. Reported: the class's own IoU / BIoU / BF1
   (``models.metrics.class_vs_rest``), the paper's car tables.
3. **All-classes score (K classes).** Only on images where **every** new class has a hand mask (the split's
   score is absent when there is none, and ``num_images`` says how many images it covers): ground truth = v1
   labels with each hand mask carved in where v1 == 0 and mask == 1; a hand mask's 255 becomes 255 only
   where v1 == 0. New classes are carved in id order onto pixels still 0, so on overlapping hand masks the
   lower id wins and an earlier 255 stays 255.
4. **Pseudo-label row.** The stored pseudo masks of class c (made with the class's last pseudo-label run,
   where they exist for a split) against the same hand masks, binary as in 2. Evaluation masks never feed a
   labeler, so with the ``simulated`` labeler there are no test pseudo labels: the pseudo row is then
   reported on the splits that have both (typically val), and the report says so. Table rows therefore name
   their split: ``Pseudo Label (<split>)``, ``Model (<split>)``.

``evaluate_model`` loads the model once (`tasks.model_folder.load_trained_model`; or takes an injected
object with a ``predict(images) -> B x H x W`` method), predicts images of one size in batches under
``torch.inference_mode`` (the model chunks its upsampling, so memory stays bounded; only one batch is held
at a time) and keeps per-image scores. With ``pred_dir`` it also writes the predicted label PNGs
(``pred_dir/<split>/<id>.png``, K-class ids) so they can be rescored with ``addclass evaluate-masks``.
`tasks.evaluation_report.write_evaluation_report` writes the results as ``metrics.json``, ``report.md`` and
overlay PNGs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from models.metrics import (
    COUNT_KEYS,
    binary_counts,
    class_vs_rest,
    image_counts,
    metrics_from_counts,
    metrics_summary,
)
from storage.names import parse_split
from storage.pseudo import missing_pseudo, pseudo_runs, read_pseudo_mask
from storage.registry import IGNORE_INDEX
from storage.staging import check_overwrite, record_written, refuse_store_overlap
from storage.store import LabelStore, open_label_store
from tasks.model_folder import load_trained_model, read_model_config, resolve_model_dir

__all__ = [
    "SPLIT_ORDER",
    "all_classes_ground_truth",
    "evaluate_model",
    "evaluate_pseudo",
    "fold_new_classes",
    "hand_mask_kinds",
    "predict_labels",
    "read_hand_or_none",
    "score_prediction",
]

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")
Counts = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# The ground-truth rules on arrays (pure)
# ----------------------------------------------------------------------------------------------------------


def fold_new_classes(pred: np.ndarray, num_precise: int) -> np.ndarray:
    """Rule 1: every class id >= ``num_precise`` (a new class) becomes 0 ("others"); other values are kept.

    Args:
        pred: H x W integer predicted labels.
        num_precise: Number of precise classes (7).

    Returns:
        H x W uint8 labels.
    """
    pred = np.asarray(pred)
    out = pred.astype(np.uint8)
    out[(pred >= num_precise) & (pred != IGNORE_INDEX)] = 0
    return out


def all_classes_ground_truth(precise: np.ndarray, hand_masks: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """Rule 3: v1 labels with the hand masks carved in where the label is still 0.

    Args:
        precise: H x W uint8 v1 labels (0..6, 255).
        hand_masks: ``(class id, H x W mask)`` pairs in id order; masks are 0 rest, 1 the class, 255 ignore.

    Returns:
        H x W uint8 K-class ground truth.
    """
    gt = np.asarray(precise).astype(np.uint8, copy=True)
    for class_id, mask in hand_masks:
        mask = np.asarray(mask)
        if mask.shape != gt.shape:
            raise ValueError(f"Hand mask is {mask.shape}, labels are {gt.shape}.")
        free = gt == 0  # still "others": not a precise class, not an earlier new class, not ignore
        gt[free & (mask == 1)] = class_id
        gt[free & (mask == IGNORE_INDEX)] = IGNORE_INDEX
    return gt


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _means(counts: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    m = metrics_from_counts(counts)
    return {k: _json_float(m[k]) for k in ("miou", "mbiou", "mbf1", "aAcc")}


def _class_scores(counts: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    return {k: _json_float(v) for k, v in class_vs_rest(metrics_from_counts(counts)).items()}


def score_prediction(
    pred: np.ndarray,
    precise: np.ndarray,
    hand_masks: Mapping[int, np.ndarray | None],
    *,
    num_precise: int,
    num_classes: int,
) -> dict[str, Any]:
    """Rules 1-3 for one image: counts and the image's own scores.

    Args:
        pred: H x W K-class predicted labels.
        precise: H x W v1 labels.
        hand_masks: New class id -> hand mask (0/1/255), or None where the image has none.
        num_precise: Number of precise classes (7).
        num_classes: K, all classes of the label version.

    Returns:
        ``{"counts": {"precise": counts, "new_classes": {id: counts}, "all": counts | None},
        "scores": {"precise": means, "new_classes": {id: class scores}, "all": means | None}}``; classes
        without a hand mask are left out of ``new_classes``.
    """
    pred = np.asarray(pred)
    if pred.shape != precise.shape:
        raise ValueError(f"Prediction is {pred.shape}, ground truth is {precise.shape}.")
    counts: dict[str, Any] = {"new_classes": {}, "all": None}
    scores: dict[str, Any] = {"new_classes": {}, "all": None}
    counts["precise"] = image_counts(fold_new_classes(pred, num_precise), precise, num_classes=num_precise)
    scores["precise"] = _means(counts["precise"])
    for cid, mask in hand_masks.items():
        if mask is None:
            continue
        c = binary_counts(pred == cid, mask)
        counts["new_classes"][cid] = c
        scores["new_classes"][cid] = _class_scores(c)
    if hand_masks and all(m is not None for m in hand_masks.values()):
        present = [(cid, m) for cid, m in sorted(hand_masks.items()) if m is not None]
        gt = all_classes_ground_truth(precise, present)
        counts["all"] = image_counts(pred, gt, num_classes=num_classes)
        scores["all"] = _means(counts["all"])
    return {"counts": counts, "scores": scores}


# ----------------------------------------------------------------------------------------------------------
# Store helpers
# ----------------------------------------------------------------------------------------------------------


def hand_mask_kinds(store: LabelStore, class_name: str, split: str) -> dict[str, str]:
    """{image id: "eval" | "reference"} of the hand masks of a class on a split (eval first)."""
    out: dict[str, str] = {}
    for kind in ("eval", "reference"):
        for image_id in store.hand_mask_ids(kind, class_name, split):  # type: ignore[arg-type]
            out.setdefault(image_id, kind)
    return out


def _binary_summary(
    counts: Mapping[str, np.ndarray], *, num_images: int, name: str, **extra: Any
) -> dict[str, Any]:
    """A class-vs-rest summary: ``metrics_summary`` over {rest, name} with the class's own ``iou``, ``biou``,
    ``bf1`` and the ``binary_m*`` means over {rest, class} (``class_vs_rest``) on top."""
    summary = metrics_summary(counts, num_images=num_images, class_names=["rest", name])
    return {**_class_scores(counts), **summary, "class": name, **extra}


def _zeros(c: int) -> Counts:
    return {k: np.zeros(c, dtype=np.int64) for k in COUNT_KEYS}


def _add(total: Counts, counts: Mapping[str, np.ndarray]) -> None:
    for k in COUNT_KEYS:
        total[k] += counts[k]


def _resolve_classes(
    store: LabelStore, version: str, *, model_classes: int | None, names_expected: Sequence[str] | None
) -> tuple[str, list[dict[str, Any]], int]:
    """(version, [{id, name, source}] in model class order, number of precise classes). Model class index
    k is the k-th entry; its store `id` may differ where the version's ids have gaps (0..6 and 8)."""
    version = store.resolve_version(version)
    ids = store.versions()[version].model_class_ids
    registry = {c.id: c for c in store.classes()}
    classes = [{"id": i, "name": registry[i].name, "source": registry[i].source} for i in ids]
    num_precise = sum(c["source"] == "precise" for c in classes)
    if [c["source"] for c in classes] != ["precise"] * num_precise + ["pseudo"] * (len(ids) - num_precise):
        raise ValueError(f"Expected precise classes 0..{num_precise - 1} before the new classes: {classes}.")
    if model_classes is not None and model_classes != len(ids):
        raise ValueError(
            f"The model predicts {model_classes} classes but label version {version!r} of {store.path} has "
            f"{len(ids)} ({[c['name'] for c in classes]}). Evaluate against the version it was trained on."
        )
    if names_expected is not None and list(names_expected) != [c["name"] for c in classes]:
        raise ValueError(
            f"The checkpoint's classes {list(names_expected)} differ from those of label version "
            f"{version!r}: {[c['name'] for c in classes]}."
        )
    return version, classes, num_precise


# ----------------------------------------------------------------------------------------------------------
# Model evaluation (rules 1-3)
# ----------------------------------------------------------------------------------------------------------


def _present_splits(store: LabelStore, splits: Sequence[str]) -> list[str]:
    """The requested splits the store has (names checked: a typo is an error, not a silently empty report)."""
    wanted = [parse_split(s) for s in splits]
    present = [s for s in wanted if s in store.splits()]
    if not present:
        raise ValueError(f"None of the splits {wanted} to evaluate is in {store.path} (it has {store.splits()}).")
    return present


def _size_batches(store: LabelStore, split: str, ids: Sequence[str], batch_size: int) -> list[list[str]]:
    """Ids grouped by image size (split order kept inside a group), cut into batches."""
    sizes = {r.id: (r.height, r.width) for r in store.image_records(split)}  # one metadata read
    groups: dict[tuple[int, int], list[str]] = {}
    for image_id in ids:
        groups.setdefault(sizes[image_id], []).append(image_id)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def predict_labels(model: Any, images: list[np.ndarray], device: str) -> np.ndarray:
    # B x 3 x H x W RGB 0..255; contiguous: a permuted uint8 tensor would otherwise stay channels-last
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device, torch.float32)
    with torch.inference_mode():
        labels = model.predict(batch)  # B x H x W
    out = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if out.shape != (len(images), *images[0].shape[:2]):
        raise ValueError(
            f"model.predict returned shape {out.shape} for {len(images)} images of {images[0].shape}."
        )
    if out.size and (out.min() < 0 or out.max() > 255):
        raise ValueError(f"model.predict returned labels outside 0..255 ({out.min()}..{out.max()}).")
    return out.astype(np.uint8)  # B x H x W


def evaluate_model(
    store_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    splits: Sequence[str] = ("val", "test"),
    label_version: str | None = None,
    device: str = "cpu",
    batch_size: int = 1,
    progress: bool = True,
    max_images: int | None = None,
    pred_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score a model on store splits with rules 1-3 (module docstring).

    Args:
        store_path: The label store.
        checkpoint: A model, checkpoint or run folder (``model.safetensors`` + ``config.json``), loaded once
            with `tasks.model_folder.load_trained_model`; its config's label version and class names are
            checked against the store. May be None when ``model`` is given.
        model: An already built model (anything with ``predict(B x 3 x H x W float RGB 0..255) -> B x H x W``
            labels); when None it is loaded from ``checkpoint``.
        splits: Splits to score (those missing from the store are skipped).
        label_version: Label version whose classes the model predicts; default the checkpoint's, else latest.
        device: Torch device for inference (``"auto"``: CUDA when available).
        batch_size: Images per forward pass (only images of one size are batched together).
        progress: Show a progress bar per split.
        max_images: Score at most this many images per split (the first ones, in split order).
        pred_dir: If given, write each prediction as ``pred_dir/<split>/<id>.png`` (uint8 class ids), to
            rescore with ``addclass evaluate-masks``; the report then draws its overlays from these files.
            Never inside the store; existing files are refused unless ``overwrite`` and written by addclass.
        overwrite: Replace prediction PNGs an earlier evaluation wrote into ``pred_dir``.

    Returns:
        JSON-serialisable: ``store``, ``checkpoint``, ``device``, ``label_version``, ``classes`` ([{id,
        name, source}]), ``num_precise``, ``new_classes`` (names), ``pred_dir``, ``splits``: {split:
        {``num_images``, ``precise`` (7-class ``metrics_summary``), ``new_classes`` ({name: class-vs-rest
        summary: ``iou``, ``biou``, ``bf1`` of the class, ``binary_m*``, ``metrics_summary`` keys,
        ``class_id``, ``hand_mask_kind``}; only classes with hand masks on the split), ``all`` (K-class
        summary or None), ``per_image`` ([{id, split, height, width, precise: means, new_classes: {name:
        class scores}, all: means | None}], split order)}}.
    """
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Got {batch_size} instead.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    store = open_label_store(store_path)
    if pred_dir is not None:  # before any work: a clash is found now, not after predicting
        _check_pred_dir(store, Path(pred_dir), splits=splits, max_images=max_images, overwrite=overwrite)
    cfg: dict[str, Any] = {}
    if model is None:
        if checkpoint is None:
            raise ValueError("Pass a checkpoint (a training output folder) or a model.")
        folder = resolve_model_dir(checkpoint)
        model, cfg = load_trained_model(folder, device=device), read_model_config(folder)
    elif hasattr(model, "eval"):
        model.eval()
    model_k = getattr(model, "num_classes", None)
    version, classes, num_precise = _resolve_classes(
        store,
        label_version or cfg.get("label_version") or "latest",
        model_classes=int(model_k) if isinstance(model_k, int) else None,
        names_expected=cfg.get("class_names"),
    )
    k = len(classes)
    new = [(num_precise + j, c["name"]) for j, c in enumerate(classes[num_precise:])]  # (model index, name)
    out_root = Path(pred_dir) if pred_dir is not None else None
    results: dict[str, Any] = {
        "store": str(store.path),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "device": str(device),
        "label_version": version,
        "classes": classes,
        "num_precise": num_precise,
        "new_classes": [n for _, n in new],
        "pred_dir": None if out_root is None else str(out_root),
        "splits": {},
    }
    for split in _present_splits(store, splits):
        ids = store.image_ids(split)[:max_images]
        kinds = {name: hand_mask_kinds(store, name, split) for _, name in new}
        precise_total, all_total = _zeros(num_precise), _zeros(k)
        new_total = {cid: _zeros(2) for cid, _ in new}
        n_new = dict.fromkeys(new_total, 0)
        n_all = 0
        per_image: dict[str, dict[str, Any]] = {}
        if out_root is not None:
            (out_root / split).mkdir(parents=True, exist_ok=True)
            # listed once, before any is written: a kill midway leaves no PNG of ours unlisted
            record_written(out_root, [f"{split}/{i}.png" for i in ids])
        bar = tqdm(total=len(ids), desc=f"evaluate {split}", unit="img", disable=not progress)
        for batch in _size_batches(store, split, ids, batch_size):
            preds = predict_labels(model, [store.read_image(split, i) for i in batch], device)  # B x H x W
            for image_id, pred in zip(batch, preds, strict=True):
                if out_root is not None:
                    _write_png(out_root / split / f"{image_id}.png", pred)
                masks = {cid: read_hand_or_none(store, kinds[name], name, image_id) for cid, name in new}
                precise = store.read_labels(split, image_id, version="v1")
                res = score_prediction(pred, precise, masks, num_precise=num_precise, num_classes=k)
                _add(precise_total, res["counts"]["precise"])
                for cid, c in res["counts"]["new_classes"].items():
                    _add(new_total[cid], c)
                    n_new[cid] += 1
                if res["counts"]["all"] is not None:
                    _add(all_total, res["counts"]["all"])
                    n_all += 1
                per_image[image_id] = {
                    "id": image_id,
                    "split": split,
                    "height": int(pred.shape[0]),
                    "width": int(pred.shape[1]),
                    "precise": res["scores"]["precise"],
                    "new_classes": {dict(new)[cid]: v for cid, v in res["scores"]["new_classes"].items()},
                    "all": res["scores"]["all"],
                }
            bar.update(len(batch))
        bar.close()
        results["splits"][split] = {
            "num_images": len(ids),
            "precise": metrics_summary(
                precise_total, num_images=len(ids), class_names=[c["name"] for c in classes[:num_precise]]
            ),
            "new_classes": {
                name: _binary_summary(
                    new_total[cid], num_images=n_new[cid], name=name, class_id=cid,
                    hand_mask_kind=sorted(set(kinds[name].values())),
                )
                for cid, name in new
                if n_new[cid]
            },
            "all": metrics_summary(all_total, num_images=n_all, class_names=[c["name"] for c in classes])
            if n_all
            else None,
            "per_image": [per_image[i] for i in ids],
        }
    return results


def _check_pred_dir(store: LabelStore, pred_dir: Path, *, splits: Sequence[str], max_images: int | None,
                    overwrite: bool) -> None:
    refuse_store_overlap(pred_dir, store.path, what="pred_dir")
    targets = [f"{s}/{i}.png" for s in _present_splits(store, splits) for i in store.image_ids(s)[:max_images]]
    check_overwrite(pred_dir, targets, overwrite=overwrite, what="prediction PNGs")


def _write_png(path: Path, labels: np.ndarray) -> None:
    if not cv2.imwrite(str(path), labels.astype(np.uint8)):
        raise OSError(f"Cannot write {path}.")


def read_hand_or_none(store: LabelStore, kinds: Mapping[str, str], name: str, image_id: str) -> np.ndarray | None:
    if image_id not in kinds:
        return None
    return store.read_hand_mask(kinds[image_id], name, image_id)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Pseudo-label evaluation (rule 4)
# ----------------------------------------------------------------------------------------------------------


def _pseudo_class_names(store: LabelStore) -> list[str]:
    names = list(pseudo_runs(store))
    names += [c.name for c in store.classes() if c.source == "pseudo" and c.name not in names]
    return [n for n in names if f"pseudo/{n}" in store.root]


def evaluate_pseudo(
    store_path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    splits: Sequence[str] = SPLIT_ORDER,
) -> dict[str, Any]:
    """Rule 4: stored pseudo masks against the hand masks, binary class-vs-rest, per class and split.

    Only images with both a finished pseudo label (made with the class's last recorded pseudo-label run, when
    there is one) and a hand mask count; a split with none is listed under ``skipped`` with the reason.

    Args:
        store_path: The label store.
        classes: Class names; default every class with stored pseudo labels.
        splits: Splits to look at.

    Returns:
        JSON-serialisable ``{"store", "classes": {name: {split: class-vs-rest summary (as in
        ``evaluate_model``) + num_hand_masks, num_pseudo, per_image: [{id, iou, biou, bf1}]}},
        "skipped": {name: {split: reason}}, "settings_keys": {name: key | None}}``.
    """
    store = open_label_store(store_path)
    names = list(classes) if classes is not None else _pseudo_class_names(store)
    runs = pseudo_runs(store)
    out: dict[str, Any] = {"store": str(store.path), "classes": {}, "skipped": {}, "settings_keys": {}}
    for name in names:
        key = runs.get(name, {}).get("settings_key")
        scored: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for split in splits:
            if split not in store.splits():
                skipped[split] = "split not in the store"
                continue
            kinds = hand_mask_kinds(store, name, split)
            missing = set(missing_pseudo(store, name, split, key=key))
            with_pseudo = [i for i in store.image_ids(split) if i not in missing]
            both = [i for i in with_pseudo if i in kinds]
            if not both:
                skipped[split] = (
                    f"no pseudo labels ({len(kinds)} hand masks)" if not with_pseudo
                    else f"no hand masks ({len(with_pseudo)} pseudo labels)" if not kinds
                    else "no image has both a pseudo label and a hand mask"
                )
                continue
            total = _zeros(2)
            per_image = []
            for image_id in both:
                pseudo = read_pseudo_mask(store, name, split, image_id)
                hand = read_hand_or_none(store, kinds, name, image_id)
                assert hand is not None  # `both` holds only images with a hand mask
                c = binary_counts(pseudo, hand)
                _add(total, c)
                s = _class_scores(c)
                per_image.append({"id": image_id, "iou": s["iou"], "biou": s["biou"], "bf1": s["bf1"]})
            scored[split] = {
                **_binary_summary(total, num_images=len(both), name=name,
                                  hand_mask_kind=sorted({kinds[i] for i in both})),
                "num_hand_masks": len(kinds),
                "num_pseudo": len(with_pseudo),
                "per_image": per_image,
            }
        out["classes"][name] = scored
        out["skipped"][name] = skipped
        out["settings_keys"][name] = key
    return out
