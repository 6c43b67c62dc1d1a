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
by unpublished drafts are reserved. A version's ids can therefore have gaps (`tasks.export` remaps them for
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
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from tqdm import tqdm

from models.labelers.label_record import rle_decode
from storage.names import parse_class_name
from storage.pseudo import missing_pseudo, pseudo_done, pseudo_runs, read_pseudo_mask, read_pseudo_record
from storage.registry import IGNORE_INDEX, PROV_PSEUDO, ClassInfo, VersionInfo
from storage.store import LabelStore, open_label_store

POLICIES: tuple[str, ...] = ("carve-others", "overwrite")
SECTION = "merge"
SPEC_FORMAT = 1
OVERLAP_RULE = "highest-score, ties to the earlier class"
# Test hook: seconds to sleep after each written image, so a test can kill -9 a merge midway.
DELAY_ENV = "ADDCLASS_MERGE_TEST_DELAY_S"


class MergeError(ValueError):
    """Bad merge input: unknown class or parent, class not pseudo-labelled, partially labelled split, ..."""


@dataclass(frozen=True)
class MergePlan:
    """A registered draft version and everything the workers and `finish_merge` need.

    Attributes:
        store_path: the label store.
        version: name of the new version (a reused draft on a rerun).
        parent: the published parent version.
        policy: `carve-others` or `overwrite`.
        classes: the merged pseudo classes, in priority order for score ties.
        class_ids: all class ids of the new version (parent's ids plus the new ones), sorted.
        new_classes: registry entries to add at publish (classes not yet in the store registry).
        items: every (split, image id) of the store; all must be written before publishing.
        spec: the version spec (JSON): also the draft's identity, so a rerun with the same inputs resumes it.
        resumed: True if an existing draft was reused.
        published: True if an identical merge is already published as `version` (nothing to do).
    """

    store_path: str
    version: str
    parent: str
    policy: str
    classes: tuple[str, ...]
    class_ids: tuple[int, ...]
    new_classes: tuple[ClassInfo, ...]
    items: tuple[tuple[str, str], ...]
    spec: dict[str, Any]
    resumed: bool = False
    published: bool = False


def parse_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise MergeError(f"Expected a merge policy in {POLICIES}. Got {policy!r} instead.")
    return policy


def parse_classes(classes: str | Sequence[str]) -> tuple[str, ...]:
    """'car,bicycle' or ['car', 'bicycle'] -> ('car', 'bicycle'); refuses empty lists and duplicates."""
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
    if not names or any(not n for n in names):
        raise MergeError(f"Expected one or more class names (e.g. 'car' or 'car,bicycle'). "
                         f"Got {classes!r} instead.")
    for n in names:
        try:
            parse_class_name(n)
        except ValueError as e:
            raise MergeError(str(e)) from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeError(f"Class names given more than once: {dup}.")
    return tuple(names)


def merge_spec(store: str | os.PathLike[str] | LabelStore, version: str) -> dict[str, Any]:
    """The spec a merged version was made with (`sections["merge"][version]`)."""
    st = store if isinstance(store, LabelStore) else open_label_store(store)
    specs = st.section(SECTION)
    if version not in specs:
        raise KeyError(f"No merge spec for version {version!r} in {st.path} (v1 is the precise labels).")
    return dict(specs[version])


def _pseudo_class_status(store: LabelStore,
                         name: str) -> tuple[dict[str, Any], dict[str, list[str]], list[str]]:
    """(run entry, {split: missing ids} for the labelled splits, labelled splits) of one pseudo class."""
    runs = pseudo_runs(store)
    has_arrays = f"pseudo/{name}" in store.root
    if name not in runs:
        if not has_arrays:
            known = ", ".join(sorted(runs)) or "none"
            registered = ", ".join(c.name for c in store.classes())
            raise MergeError(
                f"Unknown class {name!r} in {store.path}: it has never been pseudo-labelled "
                f"(pseudo-labelled classes: {known}; registered classes: {registered}). "
                f"Run `addclass pseudo-label STORE --prompt {name}` first."
            )
        raise MergeError(
            f"Class {name!r} is not pseudo-labelled yet in {store.path}: its pseudo-label run has not "
            f"finished (no run record). Rerun `addclass pseudo-label STORE --prompt {name}` to finish it."
        )
    run = runs[name]
    key = run.get("settings_key")
    missing: dict[str, list[str]] = {}
    splits: list[str] = []
    for split in store.splits():
        ids = store.image_ids(split)
        miss = missing_pseudo(store, name, split, key=key)
        if split in run.get("splits", {}) or len(miss) < len(ids):
            splits.append(split)
            missing[split] = miss
        elif len(missing_pseudo(store, name, split)) < len(ids):
            # finished labels from other settings: leaving the split out would train on no `name` there
            done = sorted(run.get("splits", {}))
            raise MergeError(
                f"Split {split!r} of class {name!r} in {store.path} was pseudo-labelled with other labeler "
                f"settings than its latest run (settings key {key}, on {done}), so the two do not mix. "
                f"Rerun `addclass pseudo-label STORE --prompt {run.get('prompt', name)} --split {split}` with "
                f"the settings of that run (or relabel {done} with the old ones)."
            )
    if not splits:
        raise MergeError(f"Class {name!r} is not pseudo-labelled yet in {store.path}: no split has finished "
                         f"pseudo labels. Run `addclass pseudo-label STORE --prompt {name}`.")
    return run, missing, splits


def _build_spec(store: LabelStore, *, classes: tuple[str, ...], parent: str, policy: str,
                allow_partial: bool) -> tuple[dict[str, Any], tuple[int, ...], tuple[ClassInfo, ...]]:
    versions = store.versions()
    parent_info = versions[parent]
    registry = {c.name: c for c in store.classes()}
    # ids of classes that unpublished drafts introduce are reserved: a name keeps one id store-wide
    drafted: dict[str, int] = {}
    for d in store.drafts().values():
        for n, i in d.get("spec", {}).get("class_ids", {}).items():
            if n not in registry:
                drafted.setdefault(n, int(i))
    next_id = max([c.id for c in registry.values()] + list(drafted.values())) + 1
    ids: dict[str, int] = {}
    pending_new: list[tuple[str, int]] = []
    pseudo: dict[str, Any] = {}
    missing_all: dict[str, dict[str, list[str]]] = {}
    for name in classes:
        known = registry.get(name)
        if known is not None and known.source != "pseudo":
            raise MergeError(f"Class {name!r} is a precise class of {store.path}; only pseudo classes can be "
                             "merged.")
        if known is not None and known.id in parent_info.class_ids:
            raise MergeError(
                f"Class {name!r} (id {known.id}, {known.source}) is already a class of the parent version "
                f"{parent!r}; merge it from a version without it (e.g. --from v1) or pick another class."
            )
        run, missing, splits = _pseudo_class_status(store, name)
        if known is not None:
            ids[name] = known.id  # already registered by another merge: one id per name store-wide
        elif name in drafted:
            ids[name] = drafted[name]
            pending_new.append((name, drafted[name]))
        else:
            ids[name] = next_id
            pending_new.append((name, next_id))
            next_id += 1
        pseudo[name] = {"settings_key": run.get("settings_key"), "splits": splits}
        gaps = {s: m for s, m in missing.items() if m}
        if gaps:
            missing_all[name] = gaps
    if max(ids.values()) >= IGNORE_INDEX:
        raise MergeError(f"Class ids must stay below {IGNORE_INDEX} (the ignore label). "
                         f"Got {max(ids.values())}.")
    if missing_all and not allow_partial:
        lines = [f"  {c} / {s}: {len(m)} of {len(store.image_ids(s))} images without a pseudo label: "
                 f"{', '.join(m[:20])}{' ...' if len(m) > 20 else ''}"
                 for c, per in missing_all.items() for s, m in per.items()]
        raise MergeError("Partially pseudo-labelled split(s); finish `addclass pseudo-label` or pass "
                         "--allow-partial (those images keep the parent's labels):\n" + "\n".join(lines))
    partial_images = sorted({(s, i) for per in missing_all.values() for s, m in per.items() for i in m})
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "parent": parent,
        "policy": policy,
        "classes": list(classes),
        "class_ids": {n: ids[n] for n in classes},
        "overlap": OVERLAP_RULE,
        "pseudo": pseudo,
        "partial": bool(partial_images),
        "partial_count": len(partial_images),
        "missing": missing_all,
    }
    class_ids = tuple(sorted(set(parent_info.class_ids) | set(ids.values())))
    runs = pseudo_runs(store)
    new = tuple((n, i, runs[n]) for n, i in pending_new)
    return spec, class_ids, tuple(
        ClassInfo(id=i, name=n, source="pseudo", prompt=r.get("prompt"), labeler=r.get("labeler"),
                  policy=policy)
        for n, i, r in new
    )


def plan_merge(store_path: str | os.PathLike[str], *, classes: str | Sequence[str], parent: str = "latest",
               policy: str = "carve-others", allow_partial: bool = False,
               take_lock: bool = True) -> MergePlan:
    """Validate a merge and register its draft version (or find the draft/version of an identical merge).

    Args:
        store_path: the label store.
        classes: pseudo classes to merge ('car' or 'car,bicycle' or a list); the order breaks score ties.
        parent: the published version to start from ('latest' = newest).
        policy: 'carve-others' (pseudo only on parent label 0) or 'overwrite' (everywhere except ignore).
        allow_partial: let images without a pseudo label keep the parent's labels instead of failing.
        take_lock: take the store lock for the metadata write; pass False when the caller holds it.

    Returns:
        The plan. `resumed` if an unpublished draft with the same spec was found (its written images are
        kept); `published` (nothing to do) if this exact merge is already a published version.

    Raises:
        MergeError: unknown class or parent version, class not pseudo-labelled, class already in the parent,
            partially labelled split without `allow_partial`, bad policy.
        StoreLockedError: another process writes the store.
    """
    names = parse_classes(classes)
    policy = parse_policy(policy)
    store = open_label_store(store_path, mode="a")
    if take_lock:
        with store.lock(purpose=f"merge {','.join(names)} (plan)"):
            return _plan_locked(store, names=names, parent=parent, policy=policy, allow_partial=allow_partial)
    return _plan_locked(store, names=names, parent=parent, policy=policy, allow_partial=allow_partial)


def _plan_locked(store: LabelStore, *, names: tuple[str, ...], parent: str, policy: str,
                 allow_partial: bool) -> MergePlan:
    store.refresh()
    requested = parent
    try:
        parent = store.resolve_version(parent)
    except (KeyError, ValueError) as e:
        raise MergeError(str(e.args[0]) if e.args else str(e)) from None
    if requested == "latest":  # a rerun after this very merge was published: `latest` is its result
        done = _published_as_latest(store, latest=parent, names=names, policy=policy,
                                    allow_partial=allow_partial)
        if done is not None:
            return done
    spec, class_ids, new_classes = _build_spec(store, classes=names, parent=parent, policy=policy,
                                               allow_partial=allow_partial)
    entry = {"parent": parent, "class_ids": list(class_ids), "policy": policy, "spec": spec}
    items = tuple((s, i) for s in store.splits() for i in store.image_ids(s))

    def make(version: str, new: tuple[ClassInfo, ...], *, resumed: bool = False,
             published: bool = False) -> MergePlan:
        return MergePlan(store_path=str(store.path), version=version, parent=parent, policy=policy,
                         classes=names, class_ids=class_ids, new_classes=new, items=items, spec=spec,
                         resumed=resumed, published=published)

    specs = store.section(SECTION)
    for name, info in store.versions().items():  # an identical merge is already published: nothing to do
        if specs.get(name) == spec and list(info.class_ids) == list(class_ids):
            return make(name, (), published=True)
    resumed = [v for v, d in sorted(store.drafts().items()) if d == entry]
    version = resumed[0] if resumed else store.next_version_name()
    store.begin_version(version, parent=parent, class_ids=class_ids, policy=policy, spec=spec)
    new = tuple(ClassInfo(id=c.id, name=c.name, source=c.source, prompt=c.prompt, labeler=c.labeler,
                          policy=c.policy, added_in=version) for c in new_classes)
    return make(version, new, resumed=bool(resumed))


def _pseudo_ready(store: LabelStore, name: str, split: str, image_id: str, *, key: str | None) -> bool:
    if key is not None:
        return pseudo_done(store, name, split, image_id, key=key)
    try:
        return bool(store.root[f"pseudo/{name}/{split}/{image_id}"].attrs.get("done"))
    except KeyError:
        return False


def _published_as_latest(store: LabelStore, *, latest: str, names: tuple[str, ...], policy: str,
                         allow_partial: bool) -> MergePlan | None:
    """The plan of `latest` if it is exactly the merge asked for (same classes, policy and pseudo labels)."""
    spec = store.section(SECTION).get(latest)
    if not spec or spec.get("classes") != list(names) or spec.get("policy") != policy:
        return None
    try:
        again, class_ids, _ = _build_spec(store, classes=names, parent=spec["parent"], policy=policy,
                                          allow_partial=allow_partial)
    except MergeError:
        return None
    if again != spec:
        return None
    items = tuple((s, i) for s in store.splits() for i in store.image_ids(s))
    return MergePlan(store_path=str(store.path), version=latest, parent=spec["parent"], policy=policy,
                     classes=names, class_ids=class_ids, new_classes=(), items=items, spec=spec,
                     published=True)


def _score_map(record: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """H x W float32: max detection score of the instances covering each pixel (0 where none does)."""
    score = np.zeros(shape, np.float32)
    for rle, s in zip(record.get("instances", []), record.get("scores", []), strict=False):
        m = rle_decode(rle)
        if m.shape != shape:
            raise ValueError(f"Pseudo instance mask is {m.shape}, expected {shape}.")
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
        raise ValueError("Overlapping pseudo masks need per-class score maps.")
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
            raise RuntimeError(f"The pseudo label of {image_id!r} ({split}) for {name!r} changed or "
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
            raise RuntimeError(f"Version {plan.version!r} of {store.path} was published by another merge.")
        return store.versions()[plan.version]
    draft = store.drafts().get(plan.version)
    if draft is None or draft.get("spec") != plan.spec:
        raise RuntimeError(f"Draft {plan.version!r} of {store.path} is gone or differs from the plan; "
                           "rerun `addclass merge`.")
    registry = {c.name: c.id for c in store.classes()}
    for c in plan.new_classes:
        if registry.get(c.name, c.id) != c.id:
            raise RuntimeError(f"Class {c.name!r} was registered with id {registry[c.name]} by another "
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
