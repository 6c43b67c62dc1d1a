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

``evaluate_model`` loads the model once (`tasks.model_files.model_folder.load_trained_model`; or takes an injected
object with a ``predict(images) -> B x H x W`` method), predicts images of one size in batches under
``torch.inference_mode`` (the model chunks its upsampling, so memory stays bounded; only one batch is held
at a time) and keeps per-image scores. With ``pred_dir`` it also writes the predicted label PNGs
(``pred_dir/<split>/<id>.png``, K-class ids) so they can be rescored with ``addclass evaluate-masks``.
`tasks.evaluation.evaluation_report.write_evaluation_report` writes the results as ``metrics.json``, ``report.md`` and
overlay PNGs. The rules on arrays and the sums over a split are `tasks.evaluation.evaluate_scoring`; this module adds the
store and the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from addclass.common.errors import InputError
from addclass.models.metrics import binary_counts
from addclass.storage.names import parse_split
from addclass.storage.pseudo import missing_pseudo, pseudo_runs, read_pseudo_mask
from addclass.storage.staging import check_overwrite, record_written, refuse_store_overlap
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.evaluation.evaluate_scoring import (
    SplitScores,
    add_counts,
    all_classes_ground_truth,
    binary_summary,
    class_scores,
    fold_new_classes,
    new_class_indices,
    score_prediction,
    zero_counts,
)
from addclass.tasks.evaluation.evaluation_results import (
    ModelEvaluation,
    PseudoEvaluation,
    PseudoSplitResult,
    SplitResult,
)
from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config, resolve_model_dir

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
        raise InputError(f"Expected precise classes 0..{num_precise - 1} before the new classes: {classes}.")
    if model_classes is not None and model_classes != len(ids):
        raise InputError(
            f"The model predicts {model_classes} classes but label version {version!r} of {store.path} has "
            f"{len(ids)} ({[c['name'] for c in classes]}). Evaluate against the version it was trained on."
        )
    if names_expected is not None and list(names_expected) != [c["name"] for c in classes]:
        raise InputError(
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
        raise InputError(f"None of the splits {wanted} to evaluate is in {store.path} (it has {store.splits()}).")
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
        raise InputError(
            f"model.predict returned shape {out.shape} for {len(images)} images of {images[0].shape}."
        )
    if out.size and (out.min() < 0 or out.max() > 255):
        raise InputError(f"model.predict returned labels outside 0..255 ({out.min()}..{out.max()}).")
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
) -> ModelEvaluation:
    """Score a model on store splits with rules 1-3 (module docstring).

    Args:
        store_path: The label store.
        checkpoint: A model, checkpoint or run folder (``model.safetensors`` + ``config.json``), loaded once
            with `tasks.model_files.model_folder.load_trained_model`; its config's label version and class names are
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
        A `tasks.evaluation.evaluation_results.ModelEvaluation`: a ``SplitResult`` per split (``precise``: the 7-class
        summary; ``new_classes``: {name: ``ClassResult``}, only classes with hand masks on the split; ``all``:
        the K-class summary or None; ``per_image``); ``to_dict()`` is the ``metrics.json`` document.
    """
    if batch_size < 1:
        raise InputError(f"Expected batch_size >= 1. Got {batch_size} instead.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    store = open_label_store(store_path)
    if pred_dir is not None:  # before any work: a clash is found now, not after predicting
        _check_pred_dir(store, Path(pred_dir), splits=splits, max_images=max_images, overwrite=overwrite)
    model, cfg = _prepare_model(model, checkpoint, device=device)
    model_k = getattr(model, "num_classes", None)
    version, classes, num_precise = _resolve_classes(
        store,
        label_version or cfg.get("label_version") or "latest",
        model_classes=int(model_k) if isinstance(model_k, int) else None,
        names_expected=cfg.get("class_names"),
    )
    out_root = Path(pred_dir) if pred_dir is not None else None
    return ModelEvaluation(
        store=str(store.path),
        checkpoint=None if checkpoint is None else str(checkpoint),
        device=str(device),
        label_version=version,
        classes=classes,
        num_precise=num_precise,
        new_classes=[n for _, n in new_class_indices(classes, num_precise)],
        pred_dir=None if out_root is None else str(out_root),
        splits={
            split: _evaluate_split(
                store, model, split, classes=classes, num_precise=num_precise, device=device,
                batch_size=batch_size, max_images=max_images, progress=progress, out_root=out_root,
            )
            for split in _present_splits(store, splits)
        },
    )


def _prepare_model(
    model: Any, checkpoint: str | os.PathLike[str] | None, *, device: str
) -> tuple[Any, dict[str, Any]]:
    """(model, training config): the injected model put in eval mode with an empty config, else the model and
    config loaded from ``checkpoint``."""
    cfg: dict[str, Any] = {}
    if model is None:
        if checkpoint is None:
            raise InputError("Pass a checkpoint (a training output folder) or a model.")
        folder = resolve_model_dir(checkpoint)
        model, cfg = load_trained_model(folder, device=device), read_model_config(folder)
    elif hasattr(model, "eval"):
        model.eval()
    return model, cfg


def _evaluate_split(
    store: LabelStore,
    model: Any,
    split: str,
    *,
    classes: list[dict[str, Any]],
    num_precise: int,
    device: str,
    batch_size: int,
    max_images: int | None,
    progress: bool,
    out_root: Path | None,
) -> SplitResult:
    """Rules 1-3 on one split: predict in same-size batches, score each image, sum (``evaluate_model``)."""
    ids = store.image_ids(split)[:max_images]
    new = new_class_indices(classes, num_precise)
    kinds = {name: hand_mask_kinds(store, name, split) for _, name in new}
    scores = SplitScores(split, classes=classes, num_precise=num_precise)
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
            res = score_prediction(pred, precise, masks, num_precise=num_precise, num_classes=len(classes))
            scores.add(image_id, pred, res)
        bar.update(len(batch))
    bar.close()
    return scores.summary(ids, hand_mask_kinds=kinds)


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
) -> PseudoEvaluation:
    """Rule 4: stored pseudo masks against the hand masks, binary class-vs-rest, per class and split.

    Only images with both a finished pseudo label (made with the class's last recorded pseudo-label run, when
    there is one) and a hand mask count; a split with none is listed under ``skipped`` with the reason.

    Args:
        store_path: The label store.
        classes: Class names; default every class with stored pseudo labels.
        splits: Splits to look at.

    Returns:
        A `tasks.evaluation.evaluation_results.PseudoEvaluation`: ``classes`` {name: {split: ``PseudoSplitResult``}},
        ``skipped`` {name: {split: reason}}, ``settings_keys`` {name: key | None}.
    """
    store = open_label_store(store_path)
    names = list(classes) if classes is not None else _pseudo_class_names(store)
    runs = pseudo_runs(store)
    out = PseudoEvaluation(store=str(store.path))
    for name in names:
        key = runs.get(name, {}).get("settings_key")
        scored: dict[str, PseudoSplitResult] = {}
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
            total = zero_counts(2)
            per_image = []
            for image_id in both:
                pseudo = read_pseudo_mask(store, name, split, image_id)
                hand = read_hand_or_none(store, kinds, name, image_id)
                assert hand is not None  # `both` holds only images with a hand mask
                c = binary_counts(pseudo, hand)
                add_counts(total, c)
                s = class_scores(c)
                per_image.append({"id": image_id, "iou": s["iou"], "biou": s["biou"], "bf1": s["bf1"]})
            scored[split] = PseudoSplitResult(
                scores=binary_summary(total, num_images=len(both), name=name,
                                      hand_mask_kind=sorted({kinds[i] for i in both})),
                num_hand_masks=len(kinds), num_pseudo=len(with_pseudo), per_image=per_image,
            )
        out.classes[name] = scored
        out.skipped[name] = skipped
        out.settings_keys[name] = key
    return out
