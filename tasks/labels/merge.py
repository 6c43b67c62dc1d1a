"""Merge pseudo classes into a new, immutable label version (`addclass merge`).

A merge takes a published parent version (precise labels `v1`, or an earlier merge) and the finished pseudo
labels of one or more new classes, and writes a new version `vN`: the parent's labels with the new class ids
written in, plus a per-pixel provenance map (0 precise, 1 pseudo, 255 ignore) that training uses to pick loss
weights. Parent versions are never touched.

Merge rule (docs/design.md §6.3):

- `carve-others` (default): a pixel becomes the new class only where its pseudo mask is set **and** the parent
  label is 0 ("others"). Pseudo masks never overwrite a precise class (1..6), never overwrite a class that an
  earlier merge added (its pixels are no longer 0), and never touch ignore (255): where a pseudo mask spills
  over a precise boundary, the precise boundary wins.
- `overwrite` (ablation only): a pixel becomes the new class wherever its pseudo mask is set, except where the
  parent label is ignore (255).
- Overlapping pseudo classes: the class with the highest per-pixel score wins. A pixel's score for a class is
  the maximum detection score of that class's instances covering it (from the stored labeler record; a mask
  pixel that no instance covers scores 0). Ties go to the class named first in `classes`.
- Splits a class was not pseudo-labelled on at all (e.g. `test`) keep the parent's labels and provenance. In a
  split that was pseudo-labelled, every image needs a finished pseudo label made with the run's settings,
  unless `allow_partial=True`: images without one keep the parent's labels and provenance, and the version's
  spec records `partial: true` with the count and the ids.

Work is split the way the flow maps it (docs/design.md §7.2, §7.4): `plan_merge` validates and registers a
draft version (metadata, lock holder), `merge_image` writes one image (labels + provenance; one writer per
image array, any number of workers in parallel, e.g. one Prefect/Dask task per image), and `finish_merge`
publishes the version and registers the new classes in one metadata write once every image is written. A
crash (even kill -9) leaves the parent bit-identical and the draft unpublished; rerunning reuses the draft
(same spec), skips images already written and finishes. Same inputs give the same output bytes.

Class ids: a new class gets the next free id (7, 8, ... in `classes` order); a name keeps one id store-wide,
so merging a class that another version already added (e.g. an ablation from v1) reuses its id, and ids named
by unpublished drafts are reserved. A version's ids can therefore have gaps (`tasks.data.export` remaps them for
mmseg). Rerunning a merge whose result is already published (`latest` is that very merge) returns that
version.

Locking: `plan_merge` and `finish_merge` take the store lock for their metadata writes by default. In
production the caller (the flow) holds the store lock across the whole run and passes `take_lock=False`; the
local `merge()` holds it for the whole run the same way. Workers (`merge_image`) never take the lock.

The version spec (what was merged from what, with which settings) is kept in the store document under
`sections["merge"][version]` (readable with `merge_spec`), since published versions keep only
parent/class ids/policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import numpy as np
from tqdm import tqdm

from addclass.common.errors import InputError, StateError, UnknownNameError
from addclass.models.labelers.label_record import rle_decode
from addclass.storage.pseudo import pseudo_done, read_pseudo_mask, read_pseudo_record
from addclass.storage.registry import IGNORE_INDEX, PROV_PSEUDO, VersionInfo
from addclass.storage.store import LabelStore, open_label_store
from addclass.tasks.labels.merge_plan import (
    OVERLAP_RULE,
    POLICIES,
    SECTION,
    SPEC_FORMAT,
    MergeError,
    MergePlan,
    parse_classes,
    parse_policy,
    plan_merge,
)

# planning (validation, class ids, the draft) lives in tasks.merge_plan; its names are re-exported from here
__all__ = [
    "DELAY_ENV", "OVERLAP_RULE", "POLICIES", "SECTION", "SPEC_FORMAT", "MergeError", "MergePlan",
    "discard_draft", "finish_merge", "merge", "merge_image", "merge_labels", "merge_spec", "parse_classes",
    "parse_policy", "pending_images", "plan_merge",
]

# Test hook: seconds to sleep after each written image, so a test can kill -9 a merge midway.
DELAY_ENV = "ADDCLASS_MERGE_TEST_DELAY_S"


def merge_spec(store: str | os.PathLike[str] | LabelStore, version: str) -> dict[str, Any]:
    """The spec a merged version was made with (`sections["merge"][version]`)."""
    st = store if isinstance(store, LabelStore) else open_label_store(store)
    specs = st.section(SECTION)
    if version not in specs:
        raise UnknownNameError(f"No merge spec for version {version!r} in {st.path} (v1 is the precise labels).")
    return dict(specs[version])


def _pseudo_ready(store: LabelStore, name: str, split: str, image_id: str, *, key: str | None) -> bool:
    if key is not None:
        return pseudo_done(store, name, split, image_id, key=key)
    try:
        return bool(store.root[f"pseudo/{name}/{split}/{image_id}"].attrs.get("done"))
    except KeyError:
        return False


def _score_map(record: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """H x W float32: max detection score of the instances covering each pixel (0 where none does)."""
    score = np.zeros(shape, np.float32)
    for rle, s in zip(record.get("instances", []), record.get("scores", []), strict=False):
        m = rle_decode(rle)
        if m.shape != shape:
            raise InputError(f"Pseudo instance mask is {m.shape}, expected {shape}.")
        np.maximum(score, np.float32(s), out=score, where=m)
    return score


def merge_labels(parent_labels: np.ndarray, parent_provenance: np.ndarray, masks: Sequence[np.ndarray],
                 class_ids: Sequence[int], *, policy: str,
                 scores: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The merge rule on arrays (pure; see the module docstring).

    Args:
        parent_labels: H x W uint8 labels of the parent version.
        parent_provenance: H x W uint8 provenance of the parent version.
        masks: one H x W bool pseudo mask per class, in priority order.
        class_ids: the label value of each class.
        policy: 'carve-others' or 'overwrite'.
        scores: one H x W float32 score map per class; needed only where masks overlap.

    Returns:
        (labels, provenance), both H x W uint8, new arrays.
    """
    policy = parse_policy(policy)
    labels = parent_labels.copy()
    prov = parent_provenance.copy()
    if not masks:
        return labels, prov
    eligible = parent_labels == 0 if policy == "carve-others" else parent_labels != IGNORE_INDEX
    if len(masks) == 1:
        take = masks[0] & eligible
        np.copyto(labels, np.uint8(class_ids[0]), where=take)
        np.copyto(prov, np.uint8(PROV_PSEUDO), where=take)
        return labels, prov
    overlap = np.add.reduce([m.astype(np.uint8) for m in masks]) > 1
    if scores is None and overlap.any():
        raise InputError("Overlapping pseudo masks need per-class score maps.")
    best = np.full(parent_labels.shape, -np.inf, np.float32)
    winner = np.full(parent_labels.shape, -1, np.int16)
    for k, m in enumerate(masks):
        s = scores[k] if scores is not None else np.zeros(parent_labels.shape, np.float32)
        better = m & (s > best)  # strict: on a tie the earlier class keeps the pixel
        winner[better] = k
        best[better] = s[better]
    for k, cid in enumerate(class_ids):
        take = (winner == k) & eligible
        np.copyto(labels, np.uint8(cid), where=take)
        np.copyto(prov, np.uint8(PROV_PSEUDO), where=take)
    return labels, prov


def merge_image(store_path: str | os.PathLike[str], version: str, split: str, image_id: str, *,
                spec: dict[str, Any]) -> dict[str, Any]:
    """Write one image of a draft version (one writer per image; safe to run in parallel and to rerun).

    Args:
        store_path: the label store.
        version: the draft version (`MergePlan.version`).
        split: the image's split.
        image_id: the image.
        spec: the draft's spec (`MergePlan.spec`).

    Returns:
        {split, id, skipped, pseudo_pixels: {class: pixels written}, kept_parent: [classes without a label]}.
    """
    store = open_label_store(store_path, mode="a")
    out: dict[str, Any] = {"split": split, "id": image_id, "skipped": False, "pseudo_pixels": {},
                           "kept_parent": []}
    if store.version_image_done(version, split, image_id):
        out["skipped"] = True
        return out
    parent = spec["parent"]
    labels, prov = store.read_labels_and_provenance(split, image_id, version=parent)
    masks, ids, names = [], [], []
    for name in spec["classes"]:
        info = spec["pseudo"][name]
        if split not in info["splits"]:
            continue
        if image_id in spec["missing"].get(name, {}).get(split, ()):
            out["kept_parent"].append(name)
            continue
        key = info["settings_key"]
        if not _pseudo_ready(store, name, split, image_id, key=key):
            raise StateError(f"The pseudo label of {image_id!r} ({split}) for {name!r} changed or "
                               f"disappeared after merge {version!r} was planned; rerun `addclass merge`.")
        masks.append(read_pseudo_mask(store, name, split, image_id))
        ids.append(int(spec["class_ids"][name]))
        names.append(name)
    scores = None
    if len(masks) > 1 and (np.add.reduce([m.astype(np.uint8) for m in masks]) > 1).any():
        scores = [_score_map(read_pseudo_record(store, n, split, image_id), labels.shape) for n in names]
    new_labels, new_prov = merge_labels(labels, prov, masks, ids, policy=spec["policy"], scores=scores)
    store.write_version_labels(version, split, image_id, new_labels, new_prov)
    out["pseudo_pixels"] = {n: int(np.count_nonzero(new_labels == c) - np.count_nonzero(labels == c))
                            for n, c in zip(names, ids, strict=True)}
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return out


def pending_images(plan: MergePlan) -> list[tuple[str, str]]:
    """The (split, id) pairs of `plan` whose image is not written yet."""
    if plan.published:
        return []
    store = open_label_store(plan.store_path)
    return [(s, i) for s, i in plan.items if not store.version_image_done(plan.version, s, i)]


def finish_merge(store_path: str | os.PathLike[str], plan: MergePlan, *,
                 take_lock: bool = True) -> VersionInfo:
    """Publish the draft of `plan` (all images must be written) and register its new classes.

    Args:
        store_path: the label store.
        plan: from `plan_merge`.
        take_lock: take the store lock for the metadata write; pass False when the caller holds it.

    Raises:
        RuntimeError: some images are not written yet (the draft stays; rerun the merge).
    """
    store = open_label_store(store_path, mode="a")
    if take_lock:
        with store.lock(purpose=f"merge {plan.version} (publish)"):
            return _finish_locked(store, plan)
    return _finish_locked(store, plan)


def _finish_locked(store: LabelStore, plan: MergePlan) -> VersionInfo:
    store.refresh()
    if plan.version in store.versions():
        if store.section(SECTION).get(plan.version) != plan.spec:
            raise StateError(f"Version {plan.version!r} of {store.path} was published by another merge.")
        return store.versions()[plan.version]
    draft = store.drafts().get(plan.version)
    if draft is None or draft.get("spec") != plan.spec:
        raise StateError(f"Draft {plan.version!r} of {store.path} is gone or differs from the plan; "
                           "rerun `addclass merge`.")
    registry = {c.name: c.id for c in store.classes()}
    for c in plan.new_classes:
        if registry.get(c.name, c.id) != c.id:
            raise StateError(f"Class {c.name!r} was registered with id {registry[c.name]} by another "
                               f"merge while this one planned id {c.id}; rerun `addclass merge`.")
    new_classes = [c for c in plan.new_classes if c.name not in registry]  # another merge may have added it
    specs = store.section(SECTION)
    specs[plan.version] = plan.spec  # harmless if the publish below never happens: it names a draft
    store.set_section(SECTION, specs)
    return store.publish_version(plan.version, new_classes=new_classes)


def merge(store_path: str | os.PathLike[str], *, classes: str | Sequence[str], parent: str = "latest",
          policy: str = "carve-others", allow_partial: bool = False, workers: int = 1,
          progress: bool = True) -> str:
    """Plan, write every image and publish, holding the store lock for the whole run. Returns the version.

    Args:
        store_path: the label store.
        classes: pseudo classes to merge, in tie-break order.
        parent: the published version to start from ('latest' = newest).
        policy: 'carve-others' or 'overwrite'.
        allow_partial: images without a pseudo label keep the parent's labels.
        workers: processes writing images (1 = in this process); one writer per image.
        progress: show a progress bar.
    """
    if workers < 1:
        raise MergeError(f"Expected workers >= 1. Got {workers} instead.")
    names = parse_classes(classes)
    store = open_label_store(store_path, mode="a")
    with store.lock(purpose=f"merge {','.join(names)}"):
        plan = plan_merge(store_path, classes=names, parent=parent, policy=policy,
                          allow_partial=allow_partial, take_lock=False)
        if plan.published:
            return plan.version
        todo = pending_images(plan)
        bar = tqdm(total=len(todo), desc=f"merge {plan.version}", unit="img", disable=not progress)
        if workers == 1 or len(todo) <= 1:
            for s, i in todo:
                merge_image(plan.store_path, plan.version, s, i, spec=plan.spec)
                bar.update()
        else:
            # spawn: workers start clean (no inherited zarr/tqdm threads); each call writes one whole image
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(merge_image, plan.store_path, plan.version, s, i, spec=plan.spec)
                           for s, i in todo]
                try:
                    for f in as_completed(futures):
                        f.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # the draft stays; a rerun resumes it
                    raise
        bar.close()
        finish_merge(store_path, plan, take_lock=False)
    return plan.version



def discard_draft(store_path: str | os.PathLike[str], version: str, *, wait_for_lock: bool = False) -> None:
    """Deletes an abandoned (unpublished) draft version under the store lock.

    A merge that was stopped and will not be rerun leaves its draft (``addclass inspect`` lists drafts); a
    rerun of the same merge would finish it instead. Published versions cannot be discarded.

    Raises:
        KeyError: the store has no draft named ``version``.
        ImmutableError: ``version`` is published.
        StoreLockedError: another process holds the lock (e.g. the merge that is writing the draft).
    """
    store = open_label_store(store_path, mode="a")
    with store.lock(wait=wait_for_lock, purpose=f"discard draft {version}"):
        store.refresh()
        store.discard_draft(version)
