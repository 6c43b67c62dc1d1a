"""A label version derived image by image from a parent version, resumable and published once.

`write_derived_version` is the mechanism `addclass predict --into-store` and `addclass review import` share: it
holds the store lock, reuses an unpublished draft made with the same spec (a killed run resumes, images already
written are kept), returns the version an identical earlier run published instead of making another, writes each
image (the caller's labels, or the parent's), records the spec in a document section and publishes in one
metadata write.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from addclass.storage.store import LabelStore

# (split, image id) -> (labels, provenance) of a changed image, or None to keep the parent's
ImageLabels = Callable[[str, str], "tuple[np.ndarray, np.ndarray] | None"]


@dataclass(frozen=True)
class DerivedVersion:
    """What `write_derived_version` did: the version, whether an identical run had already published it, how
    many images the caller changed in this run and how many a killed run had written before."""

    version: str
    existing: bool
    changed: int
    resumed: int


def write_derived_version(store: LabelStore, *, section: str, policy: str, parent: str, class_ids: list[int],
                          spec: dict[str, Any], image_labels: ImageLabels, purpose: str,
                          progress: bool = False) -> DerivedVersion:
    """Derives a version of ``store`` (opened with ``mode="a"``) from ``parent`` (module docstring).

    Args:
        section: The document section that keeps ``spec`` per version (e.g. ``"predict"``).
        policy: The version's policy (and the drafts it may resume).
        spec: Everything that defines the version, JSON-serialisable; compared as the store keeps it.
        image_labels: The caller's labels of an image, or None where the parent's stay.
        purpose: What the lock holder is doing (shown to a second writer).
    """
    spec = json.loads(json.dumps(spec))  # as the store keeps it (tuples become lists)
    with store.lock(purpose=purpose):
        store.refresh()
        done = next((v for v, s in store.section(section).items() if s == spec and v in store.versions()), None)
        if done is not None:
            return DerivedVersion(done, existing=True, changed=0, resumed=0)
        drafts = [v for v, d in store.drafts().items() if d.get("policy") == policy and d.get("spec") == spec]
        version = drafts[0] if drafts else store.next_version_name()
        store.begin_version(version, parent=parent, class_ids=class_ids, policy=policy, spec=spec)
        images = [(s, i) for s in store.splits() for i in store.image_ids(s)]
        todo = [(s, i) for s, i in images if not store.version_image_done(version, s, i)]
        changed = 0
        for split, image_id in tqdm(todo, desc=f"{policy} {version}", unit="img", disable=not progress):
            new = image_labels(split, image_id)
            if new is None:
                new = store.read_labels_and_provenance(split, image_id, version=parent)
            else:
                changed += 1
            store.write_version_labels(version, split, image_id, *new)
        specs = store.section(section)
        specs[version] = spec  # harmless if the publish below never happens: it names a draft
        store.set_section(section, specs)
        store.publish_version(version)
    return DerivedVersion(version, existing=False, changed=changed, resumed=len(images) - len(todo))
