"""Cache for SAM image embeddings, so a second prompt over the same images skips the SAM image encoder.

The labeler only needs ``get``/``put`` (``EmbeddingCache`` protocol). ``InMemoryEmbeddingCache`` is for tests
and single-process runs; a store-backed (zarr) implementation lives with the storage code.

Keys come from ``embedding_key``: the image's sha256, the SAM variant and the weights identity (sha256 of the
checkpoint file, or ``"random-<seed>"`` for random weights), so a different checkpoint never reuses an
embedding.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from addclass.common.errors import InputError


@runtime_checkable
class EmbeddingCache(Protocol):
    """Key -> SAM image embedding (1 x C x h x w, C=256, h=w=64 for SAM's 1024 input)."""

    def get(self, key: str) -> torch.Tensor | None:
        """The stored embedding, or None when absent."""
        ...

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store an embedding under ``key`` (overwrites)."""
        ...


def image_sha256(image: np.ndarray) -> str:
    """Hex sha256 of an image: a ``"HxWxC|<dtype>|"`` header, then the pixels in C order.

    Used when the caller passes no ``image_sha256`` (e.g. the sha256 of the source file). Both work as cache
    keys as long as one convention is used per cache.
    """
    header = "x".join(str(d) for d in image.shape) + f"|{image.dtype.str}|"
    digest = hashlib.sha256(header.encode())
    digest.update(np.ascontiguousarray(image).data.cast("B"))
    return digest.hexdigest()


def embedding_key(*, image_sha256: str, sam_variant: str, weights_id: str) -> str:
    """The cache key of one image's SAM embedding.

    Args:
        image_sha256: Hex sha256 identifying the image pixels.
        sam_variant: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` or ``"tiny"``.
        weights_id: sha256 of the SAM checkpoint file, or ``"random-<seed>"``.
    """
    for name, value in (
        ("image_sha256", image_sha256),
        ("sam_variant", sam_variant),
        ("weights_id", weights_id),
    ):
        if not value or "/" in value:
            raise InputError(f"{name} must be a non-empty string without '/'. Got {value!r} instead.")
    return f"sam-embedding/{sam_variant}/{weights_id}/{image_sha256}"


class InMemoryEmbeddingCache:
    """Thread-safe in-memory ``EmbeddingCache`` with optional LRU eviction.

    Values are stored as detached CPU copies, so a cached tensor never pins accelerator memory and later
    in-place changes by the caller do not leak into the cache.

    Args:
        max_items: Keep at most this many embeddings (least recently used evicted); None = unbounded.
    """

    def __init__(self, *, max_items: int | None = None) -> None:
        if max_items is not None and max_items < 1:
            raise InputError(f"max_items must be >= 1 or None. Got {max_items} instead.")
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        """The stored embedding (a CPU tensor), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store a detached CPU copy of ``value``."""
        stored = value.detach().to("cpu", copy=True)
        with self._lock:
            self._items[key] = stored
            self._items.move_to_end(key)
            if self.max_items is not None:
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items
