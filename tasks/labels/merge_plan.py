"""Planning a merge: validate the inputs and register the draft version (`plan_merge`, docs/design.md §6.3).

`tasks.labels.merge` describes the merge rule and the whole run; this module holds its first step: parsing the
classes and policy, checking that every class is pseudo-labelled with one set of labeler settings, picking the
class ids, building the version spec (the draft's identity) and registering, resuming or recognising the draft
version. Everything here is importable from `tasks.labels.merge` as well.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from addclass.common.errors import InputError
from addclass.storage.names import parse_class_name
from addclass.storage.pseudo import missing_pseudo, pseudo_runs
from addclass.storage.registry import IGNORE_INDEX, ClassInfo
from addclass.storage.store import LabelStore, open_label_store

POLICIES: tuple[str, ...] = ("carve-others", "overwrite")
SECTION = "merge"
SPEC_FORMAT = 1
OVERLAP_RULE = "highest-score, ties to the earlier class"


class MergeError(InputError):
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
