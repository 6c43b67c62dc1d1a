"""Image inputs of the labelers: one decoded RGB array from an array, a path or a callable, and a background
reader that decodes (and hashes) the next images while the current one is labelled."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from addclass.common.errors import InputError
from addclass.models.labelers.embedding_cache import image_sha256 as compute_image_sha256

ImageInput = np.ndarray | str | os.PathLike[str] | Callable[[], np.ndarray]


def load_image_rgb(source: ImageInput) -> np.ndarray:
    """An H x W x 3 uint8 RGB array from an array, an image path (OpenCV) or a zero-argument callable."""
    if isinstance(source, np.ndarray):
        image = source
    elif callable(source):
        image = source()
    else:
        import cv2

        bgr = cv2.imread(os.fspath(source), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"Cannot read image {os.fspath(source)}")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"Expected an H x W x 3 uint8 RGB image. Got {image.shape} {image.dtype} instead.")
    return image


_DONE = object()


def prefetch_images(images: Iterable[ImageInput], *, depth: int) -> Iterator[tuple[np.ndarray, str]]:
    """Decode images (and hash their pixels) on a daemon thread, ``depth`` ahead of the consumer.

    Yields:
        (H x W x 3 uint8 RGB image, sha256 of its pixels), in input order; a reader's error is re-raised here.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def _put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _worker() -> None:
        try:
            for source in images:
                image = load_image_rgb(source)
                if not _put((image, compute_image_sha256(image))):
                    return
        except Exception as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            _put(exc)
            return
        _put(_DONE)

    thread = threading.Thread(target=_worker, name="addclass-image-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
