"""What makes a folder an addclass label store: the document key, the schema version, and the store's errors.

A store is a zarr v3 group whose root attributes hold the store document under `ATTRS_KEY` (see
`storage/layout.md`). This module opens that group and validates the document; `storage.store.LabelStore`
builds on it. The names here are also importable from `storage.store`.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from addclass.common.errors import StateError, UserError

SCHEMA_VERSION = 1
ATTRS_KEY = "addclass"


class StoreSchemaError(StateError):
    """The store was written by a newer addclass (or is not an addclass store)."""


class StoreCorruptError(StateError):
    """Stored data is missing or damaged (the message names the image and version)."""


class ImmutableError(UserError, PermissionError):
    """An attempt to modify published labels (precise labels and published versions never change)."""


def now_iso() -> str:
    """The current UTC time as the store document writes it (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def labels_sha256(labels: np.ndarray) -> str:
    """Content hash of a label map (shape + bytes), stored next to each published array."""
    h = hashlib.sha256(f"{labels.shape}|{labels.dtype}".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def open_store_root(path: Path, *, mode: Literal["r", "a", "w"]) -> zarr.Group:
    """The store's zarr group; a damaged metadata file is an error naming it (zarr's own message does not).

    Raises:
        StoreSchemaError: `path/zarr.json` is not valid zarr group metadata.
    """
    try:
        return zarr.open_group(str(path), mode="r" if mode == "r" else "a", use_consolidated=False)
    except (ValueError, TypeError, KeyError) as e:  # JSON syntax, "Invalid zarr_format", missing keys
        raise StoreSchemaError(f"{path / 'zarr.json'} is not valid zarr group metadata: {e}") from e


def load_store_doc(root: zarr.Group, path: Path) -> dict[str, Any]:
    """The store document in the attributes of `root` (the group at `path`), checked for its schema version.

    Raises:
        StoreSchemaError: the group carries no store document, or one of a newer schema version.
    """
    doc = root.attrs.get(ATTRS_KEY)
    if not isinstance(doc, dict):
        raise StoreSchemaError(f"{path} is a zarr group but not an addclass label store (no '{ATTRS_KEY}').")
    schema = int(doc.get("schema_version", 0))
    if schema > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"{path} has store schema version {schema}, newer than this addclass supports "
            f"({SCHEMA_VERSION}). Upgrade addclass to read it."
        )
    return doc


def is_label_store(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds an addclass label store (a zarr group whose attributes carry the store document)."""
    meta = Path(path) / "zarr.json"
    try:
        return ATTRS_KEY in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
