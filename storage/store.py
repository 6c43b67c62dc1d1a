"""The zarr v3 label store: open/create, schema version, lock, immutable precise labels, atomic publish.

The on-disk layout is documented in `storage/layout.md`; the document key, schema version and error types are
in `storage/schema.py`. Everything about a store's metadata lives in the
root group's attributes under the key "addclass" and is written by one process at a time (the lock holder);
per-image arrays are written by any number of workers, one writer per array (see docs/design.md §7.4).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import cv2
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from addclass.common.errors import InputError, StateError, UnknownNameError
from addclass.storage.lock import store_lock
from addclass.storage.names import (
    parse_class_name,
    parse_image_id,
    parse_split,
    parse_version,
    version_number,
)
from addclass.storage.registry import (
    IGNORE_INDEX,
    PRECISE_CLASSES,
    PROV_IGNORE,
    PROV_PRECISE,
    ClassInfo,
    ImageRecord,
    VersionInfo,
)
from addclass.storage.schema import (
    ATTRS_KEY,
    SCHEMA_VERSION,
    ImmutableError,
    StoreCorruptError,
    StoreSchemaError,
    is_label_store,
    labels_sha256,
    load_store_doc,
    now_iso,
    open_store_root,
)
from addclass.storage.staging import staged_dir

# ATTRS_KEY ... now_iso live in storage.schema; they are re-exported so that callers import them from here
__all__ = [
    "ATTRS_KEY", "CHUNK", "SCHEMA_VERSION", "HandMaskKind", "ImmutableError", "LabelStore", "StoreCorruptError",
    "StoreSchemaError", "build_label_store", "is_label_store", "labels_sha256", "now_iso", "open_label_store",
]

CHUNK = 1024
HandMaskKind = Literal["eval", "reference"]


class LabelStore:
    """A handle on one label store. Use `open_label_store` or `build_label_store`, not the constructor."""

    def __init__(self, path: Path, *, mode: Literal["r", "a", "w"]) -> None:
        self.path = path
        self.mode = mode
        self._root = self._open_root()
        if mode == "w":
            self._doc: dict[str, Any] = {}
        else:
            self._doc = self._load_doc()

    # ------------------------------------------------------------------ metadata
    def _open_root(self) -> zarr.Group:
        return open_store_root(self.path, mode=self.mode)

    def _load_doc(self) -> dict[str, Any]:
        return load_store_doc(self._root, self.path)

    def refresh(self) -> None:
        """Re-read the metadata (another process may have published a version)."""
        self._root = self._open_root()
        self._doc = self._load_doc()

    def _save(self) -> None:
        self._require_writable()
        self._root.attrs[ATTRS_KEY] = self._doc

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"Store {self.path} was opened read-only (mode='r').")

    @property
    def info(self) -> dict[str, Any]:
        return {k: self._doc.get(k) for k in ("schema_version", "name", "source", "created")}

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo.from_dict(c) for c in self._doc.get("classes", [])]

    def class_by_name(self, name: str) -> ClassInfo:
        for c in self.classes():
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.classes())
        raise UnknownNameError(f"Unknown class {name!r} in {self.path}; known classes: {known}.")

    def add_class(self, info: ClassInfo) -> None:
        """Register a new class (id must be the next free id, name unique)."""
        existing = self.classes()
        if any(c.name == info.name for c in existing):
            raise InputError(f"Class {info.name!r} already exists in {self.path}.")
        if info.id != len(existing):
            raise InputError(f"Expected the next class id {len(existing)} for {info.name!r}. Got {info.id}.")
        self._doc["classes"] = [c.to_dict() for c in existing] + [info.to_dict()]
        self._save()

    def versions(self) -> dict[str, VersionInfo]:
        """Published label versions, oldest first."""
        vs = {k: VersionInfo.from_dict(v) for k, v in self._doc.get("versions", {}).items()}
        return dict(sorted(vs.items(), key=lambda kv: version_number(kv[0])))

    def resolve_version(self, version: str) -> str:
        """'latest' -> the newest published version; otherwise checks that `version` is published."""
        vs = self.versions()
        if version == "latest":
            return next(reversed(vs))
        parse_version(version)
        if version not in vs:
            raise UnknownNameError(f"Unknown label version {version!r} in {self.path}; published: {', '.join(vs)}.")
        return version

    def next_version_name(self) -> str:
        """One more than any version name ever used: published, drafts, and discarded drafts (never reused, so
        a straggling writer of a discarded draft cannot put arrays under a new version)."""
        used = set(self.versions()) | set(self._doc.get("drafts", {})) | set(self._doc.get("discarded", []))
        return f"v{max(version_number(v) for v in used) + 1}"

    def splits(self) -> list[str]:
        return [s for s in self._doc.get("splits", {}) if self._doc["splits"][s]]

    def image_ids(self, split: str) -> list[str]:
        return list(self._doc.get("splits", {}).get(parse_split(split), []))

    def _image_records(self, split: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._root[f"images/{parse_split(split)}"].attrs.get("records", {}))

    def image_record(self, split: str, image_id: str) -> ImageRecord:
        recs = self._image_records(split)
        if image_id not in recs:
            raise UnknownNameError(f"Unknown image id {image_id!r} in split {split!r} of {self.path}.")
        return ImageRecord.from_dict(recs[image_id])

    def image_records(self, split: str) -> list[ImageRecord]:
        recs = self._image_records(split)
        return [ImageRecord.from_dict(recs[i]) for i in self.image_ids(split)]

    def image_path(self, record: ImageRecord) -> Path:
        p = Path(record.path)
        return p if p.is_absolute() else self.path / p

    def read_image(self, split: str, image_id: str, *, verify: bool = True) -> np.ndarray:
        """The RGB image (H x W x 3 uint8) referenced by the store.

        `verify` (default): check the file's sha256 against the one recorded at ingest, from the same single
        read of the file (about 2 ms for a 4K JPEG, against ~80 ms to decode it): labels, pseudo labels and the
        SAM embedding cache all belong to the ingested file, so a changed file is a ValueError naming it.
        """
        rec = self.image_record(split, image_id)
        path = self.image_path(rec)
        if verify:
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            found = hashlib.sha256(data).hexdigest()  # as ingest's models.hashing.file_sha256, from one read
            if data and found != rec.sha256:
                raise InputError(f"Image {path} (id {image_id!r}, split {split!r}) changed since ingest (sha256 "
                                 f"{found[:12]}..., recorded {rec.sha256[:12]}...); re-ingest the store.")
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        else:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"Cannot read image {path} (id {image_id!r}, split {split!r}).")
        if bgr.shape[:2] != (rec.height, rec.width):
            raise InputError(
                f"Image {path} (id {image_id!r}) is {bgr.shape[1]}x{bgr.shape[0]}, "
                f"but the store recorded {rec.width}x{rec.height}: the file changed after ingest."
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    # ------------------------------------------------------------------ labels
    def _label_key(self, version: str, split: str, image_id: str, *, kind: str = "labels") -> str:
        return f"{kind}/{parse_version(version)}/{parse_split(split)}/{parse_image_id(image_id)}"

    def read_labels(self, split: str, image_id: str, *, version: str = "v1", verify: bool = True) -> np.ndarray:
        """Label map (H x W uint8) of `image_id` in a published `version`.

        With `verify` (the default) the map is checked against the sha256 recorded when it was written, so a
        deleted chunk (which zarr would read as its fill value, 0 = "others") or a damaged one is an error
        naming the image and version instead of wrong labels; a 4K map costs a few ms more.

        Raises:
            StoreCorruptError: a chunk is missing, undecodable or changed.
        """
        version = self.resolve_version(version)
        node = self.array(self._label_key(version, split, image_id))
        where = f"labels of image {image_id!r} ({split}, version {version}) in {self.path}"
        try:
            labels = np.asarray(node[...])
        except (RuntimeError, ValueError, OSError) as e:  # e.g. "Zstd decompression error"
            raise StoreCorruptError(f"Cannot read the {where}: {e}") from e
        expected = node.attrs.get("sha256")
        if verify and isinstance(expected, str) and labels_sha256(labels) != expected:
            raise StoreCorruptError(f"The {where} changed since they were written (sha256 mismatch): a chunk is "
                                    "missing or damaged. Restore the store from a backup or re-ingest.")
        return labels

    def read_provenance(self, split: str, image_id: str, *, version: str = "v1") -> np.ndarray:
        """Per-pixel provenance (0 precise, 1 pseudo, 255 ignore) of a published version."""
        return self.read_labels_and_provenance(split, image_id, version=version)[1]

    def read_labels_and_provenance(
        self, split: str, image_id: str, *, version: str = "v1"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, provenance) of a published version. v1 stores no provenance: it is derived from the
        labels (precise, ignore where 255), so v1 costs one read here instead of two."""
        version = self.resolve_version(version)
        labels = self.read_labels(split, image_id, version=version)
        if version == "v1":
            return labels, np.where(labels == IGNORE_INDEX, PROV_IGNORE, PROV_PRECISE).astype(np.uint8)
        key = self._label_key(version, split, image_id, kind="provenance")
        return labels, np.asarray(self.array(key)[...])

    def stored_sha256(self, split: str, image_id: str, *, version: str) -> str | None:
        sha = self._root[self._label_key(version, split, image_id)].attrs.get("sha256")
        return sha if isinstance(sha, str) else None

    def verify_version(self, version: str) -> list[str]:
        """Re-hash every label map of a published version; returns the ids whose content changed."""
        version = self.resolve_version(version)
        bad = []
        for split in self.splits():
            for image_id in self.image_ids(split):
                try:
                    arr = self.read_labels(split, image_id, version=version, verify=False)
                except StoreCorruptError:
                    bad.append(f"{split}/{image_id}")
                    continue
                if labels_sha256(arr) != self.stored_sha256(split, image_id, version=version):
                    bad.append(f"{split}/{image_id}")
        return bad

    def _create_uint8(self, key: str, shape: tuple[int, int], *, overwrite: bool = False) -> zarr.Array:
        h, w = shape
        chunks = (min(h, CHUNK), min(w, CHUNK))
        shards = None
        if h > CHUNK or w > CHUNK:  # one shard = one image: one file, one writer (docs/design.md §7.4)
            shards = (math.ceil(h / chunks[0]) * chunks[0], math.ceil(w / chunks[1]) * chunks[1])
        return self._root.create_array(
            key, shape=(h, w), dtype="uint8", chunks=chunks, shards=shards,
            compressors=ZstdCodec(level=3), fill_value=0, overwrite=overwrite,
        )

    def _write_array(self, key: str, data: np.ndarray, *, attrs: dict[str, Any], overwrite: bool) -> None:
        arr = self._create_uint8(key, data.shape, overwrite=overwrite)
        arr[...] = data
        arr.attrs.update({**attrs, "done": True})  # the marker goes last: a crash leaves done absent

    def _array_done(self, key: str) -> bool:
        try:
            return bool(self._root[key].attrs.get("done", False))
        except KeyError:
            return False

    def write_precise_labels(self, split: str, image_id: str, labels: np.ndarray) -> None:
        """Write the v1 (precise) labels of one image. Only while a store is being built: v1 is immutable."""
        if self.mode != "w":
            raise ImmutableError(
                f"Precise labels (v1) of {self.path} are immutable; they are written only by ingest."
            )
        key = self._label_key("v1", split, image_id)
        self._write_array(key, labels, attrs={"sha256": labels_sha256(labels)}, overwrite=False)

    # ------------------------------------------------------------------ versions (merge)
    def drafts(self) -> dict[str, dict[str, Any]]:
        return dict(self._doc.get("drafts", {}))

    def begin_version(self, version: str, *, parent: str, class_ids: Sequence[int], policy: str,
                      spec: dict[str, Any]) -> None:
        """Register an unpublished draft version (resumable: the same `spec` continues the same draft)."""
        parse_version(version)
        if version in self.versions():
            raise ImmutableError(f"Label version {version!r} of {self.path} is published and immutable.")
        drafts = self._doc.setdefault("drafts", {})
        entry = {"parent": parent, "class_ids": list(class_ids), "policy": policy, "spec": spec}
        if version in drafts and drafts[version] != entry:
            raise InputError(f"Draft {version!r} of {self.path} was started with other settings: {drafts[version]}.")
        drafts[version] = entry
        for split in self.splits():
            for kind in ("labels", "provenance"):
                self._root.require_group(f"{kind}/{version}/{split}")
        self._save()

    def _require_draft(self, version: str) -> None:
        if version in self.versions() or version == "v1":
            raise ImmutableError(f"Label version {version!r} of {self.path} is published and immutable.")
        if version not in self._doc.get("drafts", {}):
            raise UnknownNameError(f"No draft version {version!r} in {self.path}; call begin_version first.")

    def discard_draft(self, version: str) -> None:
        """Delete an unpublished draft version and its arrays. Published versions are refused (immutable).

        The arrays go first and the registration last, so a crash in between leaves a registered draft that
        a second call finishes deleting. The name is retired (`next_version_name` never hands it out again).
        """
        self._require_writable()
        self._require_draft(version)
        for kind in ("labels", "provenance"):
            try:
                del self._root[f"{kind}/{version}"]
            except KeyError:
                pass
        self._doc["drafts"].pop(version)
        self._doc.setdefault("discarded", []).append(version)
        self._save()

    def version_image_done(self, version: str, split: str, image_id: str) -> bool:
        return self._array_done(self._label_key(version, split, image_id))

    def write_version_labels(self, version: str, split: str, image_id: str, labels: np.ndarray,
                             provenance: np.ndarray) -> None:
        """Write one image of a draft version (labels + provenance). Rewrites an unfinished image."""
        self._require_draft(version)
        if labels.shape != provenance.shape:
            raise InputError(f"labels {labels.shape} and provenance {provenance.shape} differ for {image_id!r}.")
        self._write_array(self._label_key(version, split, image_id, kind="provenance"), provenance,
                          attrs={}, overwrite=True)
        self._write_array(self._label_key(version, split, image_id), labels,
                          attrs={"sha256": labels_sha256(labels)}, overwrite=True)

    def publish_version(self, version: str, *, new_classes: Sequence[ClassInfo] = ()) -> VersionInfo:
        """Publish a draft once every image is written: one metadata write makes it visible."""
        self._require_draft(version)
        missing = [f"{s}/{i}" for s in self.splits() for i in self.image_ids(s)
                   if not self.version_image_done(version, s, i)]
        if missing:
            raise StateError(f"Cannot publish {version!r}: {len(missing)} images unwritten, e.g. {missing[:5]}.")
        draft = self._doc["drafts"].pop(version)
        info = VersionInfo(
            name=version, parent=draft["parent"], class_ids=tuple(draft["class_ids"]), created=now_iso(),
            policy=draft["policy"], counts={s: len(self.image_ids(s)) for s in self.splits()},
        )
        classes = [c.to_dict() for c in self.classes()] + [c.to_dict() for c in new_classes]
        self._doc["classes"] = classes
        self._doc.setdefault("versions", {})[version] = info.to_dict()
        self._save()
        return info

    # ------------------------------------------------------------------ hand masks
    def hand_mask_sets(self, kind: HandMaskKind) -> dict[str, dict[str, list[str]]]:
        """{class name: {split: [image ids]}} of `eval` (test) or `reference` (train/val) hand masks."""
        return {c: {s: list(ids) for s, ids in v.items()} for c, v in self._doc.get("hand_masks", {}).get(kind, {}).items()}

    def hand_mask_ids(self, kind: HandMaskKind, class_name: str, split: str) -> list[str]:
        return self.hand_mask_sets(kind).get(class_name, {}).get(split, [])

    def write_hand_mask(self, kind: HandMaskKind, class_name: str, split: str, image_id: str,
                        mask: np.ndarray) -> None:
        """Write a hand-annotated binary mask (0/1, 255 ignore) kept apart from the training labels."""
        if kind not in ("eval", "reference"):
            raise InputError(f"Expected hand mask kind 'eval' or 'reference'. Got {kind!r} instead.")
        self._require_writable()
        class_name, split = parse_class_name(class_name), parse_split(split)
        bad = np.setdiff1d(np.unique(mask), [0, 1, IGNORE_INDEX])
        if bad.size:
            raise InputError(f"Hand mask {kind}/{class_name}/{image_id} has values {bad.tolist()} (expected 0/1/255).")
        self._write_array(f"{kind}/{class_name}/{parse_image_id(image_id)}", mask.astype(np.uint8),
                          attrs={"split": split}, overwrite=False)
        sets = self._doc.setdefault("hand_masks", {}).setdefault(kind, {})
        sets.setdefault(class_name, {}).setdefault(split, []).append(image_id)
        if self.mode != "w":  # while building, the whole document is written once at the end
            self._save()

    def read_hand_mask(self, kind: HandMaskKind, class_name: str, image_id: str) -> np.ndarray:
        key = f"{kind}/{parse_class_name(class_name)}/{parse_image_id(image_id)}"
        try:
            return np.asarray(self.array(key)[...])
        except KeyError:
            raise UnknownNameError(f"No {kind} mask for class {class_name!r}, image {image_id!r} in {self.path}.") from None

    # ------------------------------------------------------------------ generic attrs and arrays for tasks
    def section(self, name: str) -> dict[str, Any]:
        """A named metadata section (e.g. 'pseudo', 'models'): a copy; write back with `set_section`."""
        return dict(self._doc.get("sections", {}).get(name, {}))

    def set_section(self, name: str, value: dict[str, Any]) -> None:
        self._doc.setdefault("sections", {})[name] = value
        self._save()

    @property
    def root(self) -> zarr.Group:
        """The zarr root group, for task modules that keep their own arrays (pseudo/, cache/)."""
        return self._root

    def array(self, key: str) -> zarr.Array:
        """The zarr array at `key` (KeyError if there is none, or a group is there)."""
        node = self._root[key]
        if not isinstance(node, zarr.Array):
            raise UnknownNameError(f"{key!r} in {self.path} is a group, not an array.")
        return node

    @contextmanager
    def lock(self, *, wait: bool = False, timeout: float | None = None, purpose: str = "") -> Iterator[None]:
        """Exclusive writer lock (see `storage.lock.store_lock`). On acquiring it the metadata is re-read, so
        the holder never writes back a document that another writer changed since this handle opened."""
        with store_lock(self.path, wait=wait, timeout=timeout, purpose=purpose):
            if self.mode != "w":
                self.refresh()
            yield

    # ------------------------------------------------------------------ building (ingest)
    def _init_doc(self, *, name: str, source: str) -> None:
        self._doc = {
            "schema_version": SCHEMA_VERSION, "name": name, "source": source, "created": now_iso(),
            "classes": [ClassInfo(id=i, name=n, source="precise").to_dict() for i, n in enumerate(PRECISE_CLASSES)],
            "splits": {}, "versions": {}, "drafts": {}, "hand_masks": {}, "sections": {},
        }
        self._save()

    def write_image_records(self, split: str, records: Sequence[ImageRecord]) -> None:
        """Record the images of a split (only while building a store)."""
        if self.mode != "w":
            raise ImmutableError(f"The image list of {self.path} is fixed at ingest.")
        split = parse_split(split)
        ids = [parse_image_id(r.id) for r in records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise InputError(f"Duplicate image ids in split {split!r}: {dup[:10]}.")
        group = self._root.require_group(f"images/{split}")
        group.attrs["records"] = {r.id: r.to_dict() for r in records}
        self._doc["splits"][split] = ids
        self._save()

    def _finish_build(self) -> None:
        counts = {s: len(ids) for s, ids in self._doc["splits"].items() if ids}
        self._doc["versions"]["v1"] = VersionInfo(
            name="v1", parent=None, class_ids=tuple(range(len(PRECISE_CLASSES))), created=now_iso(),
            policy="precise", counts=counts,
        ).to_dict()
        self._save()


def open_label_store(path: str | os.PathLike[str], *, mode: Literal["r", "a"] = "r") -> LabelStore:
    """Open an existing label store (`mode='r'` read-only, `'a'` to add pseudo labels and versions)."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise FileNotFoundError(f"No label store at {p} (missing {p / 'zarr.json'}). Create one with `addclass ingest`.")
    if mode not in ("r", "a"):
        raise InputError(f"Expected mode 'r' or 'a'. Got {mode!r} instead.")
    return LabelStore(p, mode=mode)


@contextmanager
def build_label_store(path: str | os.PathLike[str], *, name: str, source: str, overwrite: bool = False,
                      sources: Sequence[str | os.PathLike[str]] = ()) -> Iterator[LabelStore]:
    """Build a new store in a temporary folder next to `path` and publish it there only on success.

    A failure midway leaves no half store. An existing store is replaced only with `overwrite=True`, only
    when no other process holds its lock, and never when `path` is something else than a label store or
    holds one of the `sources` (the folders the new store reads from).
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it.")
    if final.exists():
        if not is_label_store(final):
            raise FileExistsError(f"{final} exists and is not an addclass label store; overwrite=True "
                                  f"(--overwrite) only replaces a label store. Choose another path.")
        for src in map(Path, sources):
            if src.resolve() == final.resolve() or final.resolve() in src.resolve().parents:
                raise InputError(f"The source {src} is inside {final}, which overwrite=True (--overwrite) would "
                                 f"delete. Write the store to another path.")
    with staged_dir(final, guard=lambda: store_lock(final, purpose="overwrite by ingest")) as tmp:
        zarr.open_group(str(tmp), mode="w", zarr_format=3)
        store = LabelStore(tmp, mode="w")
        store._init_doc(name=name, source=source)
        yield store
        if not store.splits():
            raise InputError(f"Refusing to create an empty store at {final}: no images were ingested.")
        store._finish_build()
