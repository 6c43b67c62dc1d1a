"""Pseudo-label a prompt over a split of a label store, in batches of images, resumably.

`plan_pseudo_label` validates the prompt and splits the work into batches; `label_batch` labels one batch in
the calling process (one labeler per process, built once and reused: no per-image set-up) and writes each
image's result as soon as it is done; `pseudo_label` runs the whole thing locally. Prefect/Dask map
`label_batch` over the batches (flows/add_class.py). Results live under `pseudo/<class>/<split>/<id>`
(storage/pseudo.py); images already done with the same settings are skipped, so a rerun after a crash
finishes the job without redoing or duplicating work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from addclass.common.errors import InputError, StateError
from addclass.models.hashing import json_hash
from addclass.models.labelers.base import Labeler
from addclass.models.labelers.build import LabelerConfig  # flows and benches import them from here
from addclass.models.labelers.build import LabelerKind as LabelerKind
from addclass.storage.names import class_name_from_prompt, parse_split
from addclass.storage.pseudo import (
    missing_pseudo,
    pseudo_done,
    pseudo_runs,
    read_pseudo_record,
    record_pseudo_run,
    write_pseudo_result,
)
from addclass.storage.store import LabelStore, open_label_store


def settings_key(settings: dict[str, Any]) -> str:
    """The resume key of pseudo labels: 16 hex digits of the sha256 of the settings as JSON with sorted keys.

    Stored with every result (`storage.pseudo`): a rerun skips the images done under the same key. The value
    must never change (it would relabel every store), so it is pinned in tests/models/test_hashing.py.
    """
    return json_hash(settings, length=16)


_BUILT: dict[str, Labeler] = {}  # one labeler per process and settings (Dask workers reuse it across batches)


def build_labeler(config: LabelerConfig, *, store_path: str | os.PathLike[str] | None = None) -> Labeler:
    """Build (or reuse) the labeler of `config` in this process; SAM embeddings are cached in the store."""
    key = settings_key({**config.to_dict(), "store": str(store_path)})
    if key in _BUILT:
        return _BUILT[key]
    cache = None
    if store_path is not None and config.entry.embedding_cache:
        from addclass.storage.embedding_cache import StoreEmbeddingCache

        cache = StoreEmbeddingCache(store_path)
    labeler = config.entry.build(config, embedding_cache=cache)
    _BUILT[key] = labeler
    return labeler


@dataclass(frozen=True)
class PseudoPlan:
    """What a pseudo-label run will do: the class, its resume key and the batches of image ids left."""

    store: str
    prompt: str
    class_name: str
    split: str
    key: str
    labeler: LabelerConfig
    batches: list[list[str]]
    already_done: int


def check_prompt(store: LabelStore, prompt: str) -> str:
    """The class name for `prompt`; refuses empty prompts and prompts naming an existing class."""
    name = class_name_from_prompt(prompt)
    existing = {c.name for c in store.classes()}
    if name in existing:
        raise InputError(f"Prompt {prompt!r} names class {name!r}, which already exists in {store.path} "
                         f"(classes: {', '.join(sorted(existing))}).")
    return name


def class_name_for(store: LabelStore, prompt: str) -> str:
    """Like `check_prompt`, but accepts a pseudo class already added from this same prompt (a rerun)."""
    name = class_name_from_prompt(prompt)
    for c in store.classes():
        if c.name == name and not (c.source == "pseudo" and c.prompt == prompt):
            return check_prompt(store, prompt)  # raises with the full message
    return name


def validate_labeler(config: LabelerConfig) -> None:
    """Fail before any work if the labeler could not be built, e.g. a Grounded-SAM checkpoint is missing (the
    error names the file and the URL). Loads no model."""
    config.entry.check(config)


def plan_pseudo_label(store_path: str | os.PathLike[str], *, prompt: str, split: str = "train",
                      labeler: LabelerConfig, batch_size: int = 8) -> PseudoPlan:
    """Validate the inputs and list the batches still to label (nothing is written)."""
    if batch_size < 1:
        raise InputError(f"Expected batch_size >= 1. Got {batch_size} instead.")
    store = open_label_store(store_path)
    split = parse_split(split)
    name = check_prompt(store, prompt)
    earlier = pseudo_runs(store).get(name, {}).get("prompt")
    if earlier is not None and earlier != prompt:
        raise InputError(f"Prompt {prompt!r} names class {name!r}, whose pseudo labels in {store.path} come from "
                         f"prompt {earlier!r}; rerun with {earlier!r} (it resumes) or choose a prompt that names "
                         "another class. Nothing was relabelled.")
    ids = store.image_ids(split)
    if not ids:
        raise InputError(f"Split {split!r} of {store.path} has no images.")
    if labeler.entry.reads_reference:
        have = set(store.hand_mask_ids("reference", name, split))
        if split == "test" or not have:
            raise InputError(f"The {labeler.kind} labeler needs reference/{name} hand masks for split "
                             f"{split!r} (evaluation masks never feed a labeler); {store.path} has none.")
    key = settings_key({"prompt": prompt, **labeler.resume_settings()})
    todo = missing_pseudo(store, name, split, key=key)
    batches = [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]
    return PseudoPlan(store=str(store_path), prompt=prompt, class_name=name, split=split, key=key, labeler=labeler,
                      batches=batches, already_done=len(ids) - len(todo))


def label_batch(plan: PseudoPlan, image_ids: list[str]) -> dict[str, int]:
    """Label `image_ids` and write each result at once; returns {'labelled', 'skipped', 'detections', 'pid'}."""
    store = open_label_store(plan.store, mode="a")
    labeler = build_labeler(plan.labeler, store_path=plan.store)
    out = {"labelled": 0, "skipped": 0, "detections": 0, "pid": os.getpid()}
    for image_id in image_ids:
        if pseudo_done(store, plan.class_name, plan.split, image_id, key=plan.key):
            out["skipped"] += 1
            continue
        rec = store.image_record(plan.split, image_id)
        # the recorded sha256 also keys the SAM embedding cache: the file must be the one ingested
        image = store.read_image(plan.split, image_id)
        ref = None
        if plan.labeler.entry.reads_reference:
            ref = store.read_hand_mask("reference", plan.class_name, image_id) == 1
        result = labeler.label(image, plan.prompt, image_sha256=rec.sha256, reference_mask=ref)
        write_pseudo_result(store, plan.class_name, plan.split, image_id, mask=result.mask,
                            record=result.to_dict(), key=plan.key)
        out["labelled"] += 1
        out["detections"] += result.num_instances
    return out


def labeler_settings(plan: PseudoPlan) -> dict[str, Any]:
    """The labeler's own settings (weights hashes, flags such as `simulated` / `random_weights`)."""
    settings = dict(build_labeler(plan.labeler, store_path=plan.store).settings())
    for name in plan.labeler.entry.recorded_flags:  # e.g. smoke-test weights, flagged in the registry
        settings[name] = getattr(plan.labeler, name)
    return settings


def finish_pseudo_label(plan: PseudoPlan, *, detections: int) -> dict[str, Any]:
    """Check every image is done and record the run in the store (lock holder only)."""
    store = open_label_store(plan.store, mode="a")
    left = missing_pseudo(store, plan.class_name, plan.split, key=plan.key)
    if left:
        raise StateError(f"{len(left)} images of {plan.split!r} still lack a pseudo label, e.g. {left[:5]}.")
    settings = labeler_settings(plan)
    image_ids = store.image_ids(plan.split)
    # the split's detections, from every image's stored record: a resumed run counts the images done before too
    total = sum(len(read_pseudo_record(store, plan.class_name, plan.split, i).get("instances", ()))
                for i in image_ids)
    record_pseudo_run(store, plan.class_name, prompt=plan.prompt, labeler=settings, key=plan.key, split=plan.split,
                      images=len(image_ids), detections=total)
    return {"class": plan.class_name, "split": plan.split, "key": plan.key, "labeler": settings,
            "already_done": plan.already_done, "detections_new": detections, "detections": total}


def pseudo_label(store_path: str | os.PathLike[str], *, prompt: str, split: str = "train",
                 labeler: LabelerConfig, batch_size: int = 8, progress: bool = True,
                 wait_for_lock: bool = False) -> dict[str, Any]:
    """Pseudo-label `prompt` over `split` in this process (the CLI path), holding the store lock."""
    plan = plan_pseudo_label(store_path, prompt=prompt, split=split, labeler=labeler, batch_size=batch_size)
    store = open_label_store(store_path)
    with store.lock(wait=wait_for_lock, purpose=f"pseudo-label {plan.class_name}"):
        detections = 0
        total = sum(len(b) for b in plan.batches)
        with tqdm(total=total, desc=f"pseudo-label {plan.class_name} ({split})", unit="img",
                  disable=not progress) as bar:
            for batch in plan.batches:
                r = label_batch(plan, batch)
                detections += r["detections"]
                bar.update(len(batch))
        return finish_pseudo_label(plan, detections=detections)


def import_pseudo(store_path: str | os.PathLike[str], *, class_name: str, masks_dir: str | os.PathLike[str],
                  prompt: str | None = None) -> dict[str, Any]:
    """Import binary PNG masks (one per image id, any split) made by another tool as pseudo labels.

    Every file is validated (known image id, size, binary values 0/1 or 0/255) before anything is written. A
    class imported before (e.g. partially, and merged with ``allow_partial``) is completed: masks are added for
    the images that have none, under the first import's settings, and masks already there are kept (never
    replaced); merge it again from a version without it (``--from v1``) for a complete version.
    """
    store = open_label_store(store_path, mode="a")
    name = _import_class_name(store, class_name)
    folder = Path(masks_dir)
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"No PNG masks in {folder}.")
    where = {i: s for s in store.splits() for i in store.image_ids(s)}
    masks: dict[str, tuple[str, np.ndarray]] = {}
    for f in files:
        if f.stem not in where:
            raise InputError(f"Mask {f} names image id {f.stem!r}, which is not in {store.path}.")
        m = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if m is None or m.ndim != 2:
            raise InputError(f"Mask {f} is unreadable or not a single-channel PNG.")
        rec = store.image_record(where[f.stem], f.stem)
        if m.shape != (rec.height, rec.width):
            raise InputError(f"Mask {f} is {m.shape[1]}x{m.shape[0]}, image {f.stem!r} is {rec.width}x{rec.height}.")
        bad = np.setdiff1d(np.unique(m), [0, 1, 255])
        if bad.size:
            raise InputError(f"Mask {f} has values {bad.tolist()}; expected binary 0/1 or 0/255.")
        masks[f.stem] = (where[f.stem], m > 0)
    earlier = pseudo_runs(store).get(name)
    if earlier is not None:  # completing an earlier import: its settings, and its masks stay
        settings, key, prompt = earlier["labeler"], earlier["settings_key"], earlier["prompt"]
    else:
        settings = {"labeler": "import", "masks_dir": str(folder.resolve())}
        key = settings_key({"prompt": prompt or name, **settings})
    with store.lock(purpose=f"import-pseudo {name}"):  # re-reads the store: another writer may have finished
        _import_class_name(store, class_name)  # ... adding this very class while the masks were validated
        per_split: dict[str, int] = {}
        kept = 0
        for image_id, (split, m) in masks.items():
            if earlier is not None and pseudo_done(store, name, split, image_id, key=key):
                kept += 1
                continue
            n, comp = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            from addclass.models.labelers.label_record import LabelRecord  # tasks may use models

            inst = np.stack([comp == k for k in range(1, n)]) if n > 1 else np.zeros((0, *m.shape), bool)
            boxes = [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
                     for ys, xs in (np.nonzero(i) for i in inst)]
            record = LabelRecord.from_instances(instance_masks=inst, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                                                scores=np.ones(len(inst), np.float32), phrases=[name] * len(inst))
            write_pseudo_result(store, name, split, image_id, mask=m, record=record.to_dict(), key=key)
            per_split[split] = per_split.get(split, 0) + 1
        for split in per_split:
            done = len(store.image_ids(split)) - len(missing_pseudo(store, name, split, key=key))
            record_pseudo_run(store, name, prompt=prompt or name, labeler=settings, key=key, split=split,
                              images=done, detections=0)
    return {"class": name, "images": per_split, "kept": kept}


def _import_class_name(store: LabelStore, class_name: str) -> str:
    """The class `import_pseudo` writes: a new class, or one an earlier import created (to complete it).

    Raises:
        InputError: the name is a precise class, or a class another labeler made.
    """
    name = class_name_from_prompt(class_name)
    run = pseudo_runs(store).get(name)
    if run is not None and run.get("labeler", {}).get("labeler") == "import":
        return name
    return check_prompt(store, class_name)
