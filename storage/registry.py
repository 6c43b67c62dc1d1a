"""Metadata records of a label store: classes, label versions and image references.

All are frozen dataclasses with `to_dict`/`from_dict`; they live as JSON in zarr attributes (see layout.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from addclass.common.errors import InputError

ClassSource = Literal["precise", "pseudo"]

PRECISE_CLASSES: tuple[str, ...] = ("others", "human", "building", "vegetation", "ground", "sky", "water")
IGNORE_INDEX = 255

# provenance values (per pixel, per label version)
PROV_PRECISE = 0
PROV_PSEUDO = 1
PROV_PREDICTED = 2  # written by a trained model (`addclass predict --into-store`)
PROV_REVIEWED = 3  # checked by a person (`addclass review import`)
PROV_IGNORE = 255


@dataclass(frozen=True)
class ClassInfo:
    """One class of the registry.

    `labeler` holds the labeler settings for pseudo classes (including `simulated` / `random_weights`
    flags); `policy` and `parent` say how the class entered its first label version.
    """

    id: int
    name: str
    source: ClassSource
    prompt: str | None = None
    labeler: dict[str, Any] | None = None
    policy: str | None = None
    added_in: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassInfo:
        if d.get("source") not in ("precise", "pseudo"):
            raise InputError(f"Expected class source 'precise' or 'pseudo'. Got {d.get('source')!r} instead.")
        return cls(
            id=int(d["id"]),
            name=str(d["name"]),
            source=d["source"],
            prompt=d.get("prompt"),
            labeler=d.get("labeler"),
            policy=d.get("policy"),
            added_in=d.get("added_in"),
        )


@dataclass(frozen=True)
class VersionInfo:
    """A published label version: its classes (ids), its parent and how it was made."""

    name: str
    parent: str | None
    class_ids: tuple[int, ...]
    created: str
    policy: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # images per split

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_ids"] = list(self.class_ids)
        return d

    @property
    def model_class_ids(self) -> list[int]:
        """The store class ids in model order: a model trained on this version predicts class index `i` for
        store id `model_class_ids[i]`. Store ids may have gaps (a name keeps one id store-wide, so a branch
        `v1 -> v3` can hold ids 0..6 and 8); model indices never do."""
        return sorted(self.class_ids)

    def label_lut(self) -> list[int] | None:
        """256-entry lookup table from store label values to model class indices (255 stays 255, ids not in
        the version map to 255); None when the ids already are 0..K-1."""
        ids = self.model_class_ids
        if ids == list(range(len(ids))):
            return None
        lut = [IGNORE_INDEX] * 256
        for index, store_id in enumerate(ids):
            lut[store_id] = index
        return lut

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionInfo:
        return cls(
            name=str(d["name"]),
            parent=d.get("parent"),
            class_ids=tuple(int(i) for i in d["class_ids"]),
            created=str(d["created"]),
            policy=d.get("policy"),
            counts={str(k): int(v) for k, v in d.get("counts", {}).items()},
        )


@dataclass(frozen=True)
class ImageRecord:
    """Reference to an image file kept outside the store. `path` is absolute, or relative to the store."""

    id: str
    path: str
    sha256: str
    height: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        return cls(
            id=str(d["id"]), path=str(d["path"]), sha256=str(d["sha256"]),
            height=int(d["height"]), width=int(d["width"]),
        )
