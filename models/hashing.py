"""Content hashes that end up on disk: file and byte sha256s, and the JSON identity hash of a config.

Every value made here is persisted: the image sha256 of each `ImageRecord` (checked by
`LabelStore.read_image`), the SAM and GroundingDINO weights identities in the embedding cache keys, the
sha256 manifests of model folders, the pseudo-label settings keys (`tasks.labels.pseudo_label.settings_key`), the
config hashes of the model registry (`tasks.model_files.model_registry.config_hash`) and the run-folder names
(`tasks.training.train_config.run_name`). A change orphans users' stores and run folders, so tests/models/test_hashing.py
pins every one to a fixed value.

Here because models/ and tasks/ both use it; storage/ may not import models/, and needs none of it: it stores
the hashes its callers compute and only recomputes the sha256 of image bytes it has already read
(`LabelStore.read_image`) and its own label-map hash (`storage.store.labels_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

__all__ = ["bytes_sha256", "file_sha256", "json_hash"]


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of ``data``: the same value as `file_sha256` of a file holding these bytes."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (the chunk size does not change the value)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def json_hash(obj: Any, *, algorithm: Literal["sha256", "sha1"] = "sha256", length: int | None = None) -> str:
    """A stable hash of a JSON-like object, the hex digest of its JSON with sorted keys.

    The JSON is ``json.dumps(obj, sort_keys=True, default=str)``: key order does not matter, values JSON
    cannot encode (paths, ...) count by their ``str``, and the rest is ``json.dumps``' default (ASCII,
    ``", "`` and ``": "`` separators), which the stored hashes were made with.

    Args:
        obj: Dicts, lists, strings, numbers, booleans and None, nested.
        algorithm: ``"sha256"`` (settings keys, config hashes) or ``"sha1"`` (run-folder names).
        length: Keep the first ``length`` hex digits (None: all of them).

    Returns:
        Lower-case hex digits.
    """
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.new(algorithm, blob).hexdigest()[:length]
