"""SAM image-embedding cache inside a label store (`cache/<key>`), keyed by image sha256 + SAM variant +
checkpoint hash (see `models.labelers.embedding_cache.embedding_key`). A second prompt over the same images
reads the embedding instead of running the SAM image encoder. Entries are written whole (one array per key)
and marked done last, so concurrent workers and crashes never leave a half entry that is read back.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from addclass.common.errors import InputError
from addclass.storage.store import open_label_store

PREFIX = "cache"


class StoreEmbeddingCache:
    """`get(key) -> Tensor | None`, `put(key, tensor)` over the store at `path` (the EmbeddingCache protocol)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._root = open_label_store(path, mode="a").root
        self.hits = 0
        self.misses = 0

    def _name(self, key: str) -> str:
        if ".." in key or key.startswith("/"):
            raise InputError(f"Bad embedding cache key {key!r}.")
        return f"{PREFIX}/{key}"

    def get(self, key: str) -> torch.Tensor | None:
        try:
            arr = self._root[self._name(key)]
        except KeyError:
            self.misses += 1
            return None
        if not isinstance(arr, zarr.Array) or not arr.attrs.get("done"):
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(np.asarray(arr[...]))

    def put(self, key: str, value: torch.Tensor) -> None:
        data = value.detach().to("cpu", torch.float32).contiguous().numpy()
        arr = self._root.create_array(self._name(key), shape=data.shape, dtype="float32", chunks=data.shape,
                                      compressors=ZstdCodec(level=1), overwrite=True)
        arr[...] = data
        arr.attrs["done"] = True
