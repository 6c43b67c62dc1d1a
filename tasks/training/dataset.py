"""A torch Dataset over one label version of a store, with the MaSSFormer training augmentations.

Training pipeline (docs/design.md §3.2, mmseg semantics): random resize by a ratio of the native size
(bilinear image, nearest labels and provenance) -> ``RandomCrop(crop_size, cat_max_ratio=0.75)`` -> horizontal
flip (p = 0.5) -> ``PhotoMetricDistortion`` -> pad bottom/right to the crop size (label 255, provenance 255,
image the ImageNet mean, i.e. 0 after the model's normalization, as mmseg's data preprocessor pads). Labels
and provenance go through the same geometry, so they stay aligned pixel for pixel. The evaluation mode returns
full images.

Unlike the reference, which picks a short-edge size from a list relative to a nominal 3072 px, the resize
ratio is continuous and relative to each image's own size (``scale_range``).

Randomness is explicit: a sample is addressed by a key ``(index, draw)`` and its augmentation comes from a
numpy ``Generator`` seeded by ``(seed, draw)``, so a sample does not depend on which worker process loads it.
`StepSampler` yields such keys for a run of training steps, which makes the data order a pure function of
(seed, step) and lets a resumed run continue with the exact batches it would have seen.

The store is opened lazily in each process (the Dataset pickles without it), so it works with DataLoader
worker processes. This module does not import ``models``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from addclass.common.errors import InputError, UnknownNameError
from addclass.storage.registry import IGNORE_INDEX, PROV_IGNORE
from addclass.storage.store import LabelStore, open_label_store

# Image padding value (RGB, 0..255): the ImageNet mean, which the model's normalization maps to 0.
PAD_RGB: tuple[float, float, float] = (123.675, 116.28, 103.53)
CROP_RETRIES = 10  # mmseg RandomCrop: up to 10 new crops while one class dominates

SampleKey = tuple[int, int]  # (image index, draw): draw seeds the augmentation of this sample


def random_resize(
    image: np.ndarray,
    maps: Sequence[np.ndarray],
    *,
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resizes by a ratio drawn uniformly from ``ratio_range``, keeping the aspect ratio.

    Args:
        image: H x W x 3 uint8 RGB.
        maps: H x W uint8 maps (labels, provenance), resized with nearest neighbour.
        ratio_range: (low, high) scale of the native size; (1, 1) disables resizing.
        rng: Source of the ratio.

    Returns:
        The resized image (bilinear) and maps (nearest, pixel-centre aligned with the image), all h' x w' with
        ``h' = round(H * r)``.
    """
    lo, hi = ratio_range
    ratio = float(rng.uniform(lo, hi))
    h, w = image.shape[:2]
    new_h, new_w = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    if (new_h, new_w) == (h, w):
        return image, list(maps)
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # NEAREST_EXACT samples at pixel centres, as INTER_LINEAR does; plain INTER_NEAREST takes floor(x / r) and
    # shifts the labels against the image by up to a pixel at non-integer ratios (boundaries learnt off by one).
    resized = [cv2.resize(m, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT) for m in maps]
    return image, resized


def random_crop_bbox(
    labels: np.ndarray,
    *,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """A random crop window, redrawn while one class covers too much of it (mmseg ``RandomCrop``).

    A window is accepted when it holds more than one class and the largest class covers less than
    ``cat_max_ratio`` of its non-ignore pixels. After ``CROP_RETRIES`` rejected windows the next draw is
    used as is (mmseg's behaviour).

    Args:
        labels: H x W label map.
        crop_size: (height, width); a window is clipped to the map where the map is smaller.
        cat_max_ratio: Largest allowed fraction of one class; >= 1 disables the check.
        rng: Source of the offsets.
        ignore_index: Label left out of the counts.

    Returns:
        (y1, y2, x1, x2) of the window.
    """
    h, w = labels.shape[:2]
    ch, cw = crop_size

    def draw() -> tuple[int, int, int, int]:
        y1 = int(rng.integers(0, max(h - ch, 0) + 1))
        x1 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y1, min(y1 + ch, h), x1, min(x1 + cw, w)

    bbox = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_RETRIES):
            y1, y2, x1, x2 = bbox
            values, counts = np.unique(labels[y1:y2, x1:x2], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            bbox = draw()
    return bbox


def _convert(channel: np.ndarray, *, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(channel.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    *,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on an RGB uint8 image.

    Each step runs with probability 0.5: brightness (add U(-delta, delta)), then contrast (multiply by
    U(range)) either second or last (a coin flip), saturation (scale HSV S), hue (shift HSV H, mod 180).
    Every step saturates to uint8, as mmseg's ``convert``. mmseg works on BGR with ``bgr2hsv``; on RGB with
    ``COLOR_RGB2HSV`` the HSV values are the same.

    Args:
        image: H x W x 3 uint8 RGB.
        rng: Source of all decisions.
        brightness_delta: Largest brightness shift.
        contrast_range: Contrast factor range.
        saturation_range: Saturation factor range.
        hue_delta: Largest hue shift (OpenCV hue units, 0..179); the shift is in [-delta, delta).

    Returns:
        The distorted H x W x 3 uint8 image.
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=float(rng.uniform(-brightness_delta, brightness_delta)))
    contrast_first = int(rng.integers(2)) == 1
    if contrast_first and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(*contrast_range)))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=float(rng.uniform(*saturation_range)))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int32) + shift) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = _convert(img, alpha=float(rng.uniform(*contrast_range)))
    return img


class LabelVersionDataset(Dataset[dict[str, Any]]):
    """Images of one split with the labels and provenance of one label version.

    Items are dicts: ``image`` 3 x H x W float32 RGB in 0..255, ``labels`` H x W int64 model class indices
    (`VersionInfo.model_class_ids`: the store ids where they are 0..K-1; 255 ignore and padding),
    ``provenance`` H x W uint8 (0 precise, 1 pseudo, 255 ignore and padding) and ``id`` (str).
    With ``augment=True`` every item is ``crop_size``; otherwise items are the full images, unchanged (batch
    those one at a time, or group them by size: the default collate stacks equal shapes only).

    Index with an int (the augmentation then depends only on the dataset ``seed`` and the index) or with a
    ``SampleKey`` ``(index, draw)`` from `StepSampler` (a fresh augmentation per draw).
    """

    def __init__(
        self,
        store: str | os.PathLike[str],
        *,
        version: str,
        split: str = "train",
        augment: bool = True,
        crop_size: tuple[int, int] = (1024, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        seed: int = 0,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        """Resolves the version and the image list (the store is then closed until first use).

        Args:
            store: Path of the label store.
            version: Published label version, or ``"latest"`` (resolved once, here).
            split: ``train``, ``val`` or ``test``.
            augment: Training augmentations (``False``: full images, no randomness).
            crop_size: (height, width) of training crops.
            scale_range: Range of the random resize ratio (of the native size).
            cat_max_ratio: ``RandomCrop``'s largest single-class fraction (>= 1 disables).
            flip_prob: Probability of a horizontal flip.
            photometric: Apply `photometric_distortion`.
            seed: Base seed of the augmentations.
            image_ids: A subset of the split's ids (in this order); default all of them.
        """
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise InputError(f"Expected crop_size (height, width) >= 1. Got {crop_size!r} instead.")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise InputError(
                f"Expected scale_range (low, high) with 0 < low <= high. Got {scale_range!r} instead."
            )
        if not 0 <= flip_prob <= 1:
            raise InputError(f"Expected flip_prob in [0, 1]. Got {flip_prob!r} instead.")
        self.store_path = Path(store)
        opened = open_label_store(self.store_path)
        self.version = opened.resolve_version(version)
        lut = opened.versions()[self.version].label_lut()
        self.label_lut = None if lut is None else np.asarray(lut, np.uint8)  # store id -> model index
        self.split = split
        all_ids = opened.image_ids(split)
        if image_ids is None:
            self.image_ids = list(all_ids)
        else:
            unknown = sorted(set(image_ids) - set(all_ids))
            if unknown:
                raise UnknownNameError(f"Unknown image ids {unknown[:5]} in split {split!r} of {self.store_path}.")
            self.image_ids = list(image_ids)
        if not self.image_ids:
            raise InputError(f"Split {split!r} of {self.store_path} has no images.")
        self.augment = augment
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(lo), float(hi))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = photometric
        self.seed = int(seed)
        self._store: LabelStore | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # reopened lazily in the worker process
        return state

    @property
    def store(self) -> LabelStore:
        """The store, opened read-only on first use in this process."""
        if self._store is None:
            self._store = open_label_store(self.store_path)
        return self._store

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The unaugmented (image H x W x 3 uint8 RGB, labels H x W uint8 model class indices, provenance
        H x W uint8)."""
        image_id = self.image_ids[index]
        image = self.store.read_image(self.split, image_id)
        labels, provenance = self.store.read_labels_and_provenance(self.split, image_id, version=self.version)
        if self.label_lut is not None:
            labels = self.label_lut[labels]
        if not image.shape[:2] == labels.shape == provenance.shape:
            raise InputError(
                f"Image {image_id!r} is {image.shape[:2]} but its {self.version} labels are {labels.shape} "
                f"and provenance {provenance.shape} in {self.store_path}."
            )
        return image, labels, provenance

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, draw = int(key[0]), int(key[1])
        else:
            index, draw = int(key), int(key)
        if not 0 <= index < len(self.image_ids):
            raise IndexError(f"Index {index} out of range for {len(self.image_ids)} images.")
        image, labels, provenance = self.read(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, draw])
            image, labels, provenance = self.transform(image, labels, provenance, rng=rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "provenance": torch.from_numpy(np.ascontiguousarray(provenance)),
            "id": self.image_ids[index],
            "sample": draw,  # the sample's position in the run (`StepSampler`): seeds its loss points too
        }

    def transform(
        self, image: np.ndarray, labels: np.ndarray, provenance: np.ndarray, *, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training augmentations (module docstring).

        Args:
            image: H x W x 3 uint8 RGB.
            labels: H x W uint8.
            provenance: H x W uint8.
            rng: Source of every random decision.

        Returns:
            (image crop_h x crop_w x 3 float32 RGB, labels and provenance crop_h x crop_w uint8).
        """
        image, (labels, provenance) = random_resize(
            image, (labels, provenance), ratio_range=self.scale_range, rng=rng
        )
        y1, y2, x1, x2 = random_crop_bbox(
            labels, crop_size=self.crop_size, cat_max_ratio=self.cat_max_ratio, rng=rng
        )
        image, labels, provenance = image[y1:y2, x1:x2], labels[y1:y2, x1:x2], provenance[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            image, labels, provenance = image[:, ::-1], labels[:, ::-1], provenance[:, ::-1]
        image = np.ascontiguousarray(image)
        if self.photometric:
            image = photometric_distortion(image, rng=rng)
        ch, cw = self.crop_size
        h, w = labels.shape
        out_image = np.empty((ch, cw, 3), np.float32)
        out_image[...] = np.asarray(PAD_RGB, np.float32)
        out_image[:h, :w] = image
        out_labels = np.full((ch, cw), IGNORE_INDEX, np.uint8)
        out_labels[:h, :w] = labels
        out_prov = np.full((ch, cw), PROV_IGNORE, np.uint8)
        out_prov[:h, :w] = provenance
        return out_image, out_labels, out_prov


class StepSampler(Sampler[SampleKey]):
    """Sample keys for training steps ``start_step .. total_steps - 1``, ``batch_size`` per step.

    The images are visited in epochs, each a fresh permutation seeded by ``(seed, epoch)``; epochs run on
    across batch boundaries, so every batch is full. Sample ``p`` of the run (counting from step 0) gets the
    key ``(permutation[p % n], p)``. The keys for a step are therefore the same whether a run starts at
    step 0 or resumes at that step. In a data-parallel run (``world_size`` processes) each process takes its
    slice of every step's batch: process ``r`` the positions ``step * batch_size + r * b .. + b - 1`` with
    ``b = batch_size / world_size``, so the batch of a step is the same whatever the number of processes.
    """

    def __init__(
        self, num_images: int, *, batch_size: int, total_steps: int, start_step: int = 0, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        """Args:
        num_images: Dataset length n.
        batch_size: Samples per step (over all processes).
        total_steps: Steps of the whole run.
        start_step: First step to yield (resume).
        seed: Seed of the permutations.
        rank: This process's index in ``0 .. world_size - 1``.
        world_size: Processes sharing each batch; must divide ``batch_size``.
        """
        if num_images < 1 or batch_size < 1:
            raise InputError(f"Expected num_images, batch_size >= 1. Got {num_images}, {batch_size} instead.")
        if not 0 <= start_step <= total_steps:
            raise InputError(
                f"Expected 0 <= start_step <= total_steps. Got {start_step}, {total_steps} instead."
            )
        if world_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise InputError(f"Expected world_size dividing batch_size {batch_size} and 0 <= rank < world_size. "
                             f"Got rank {rank}, world_size {world_size} instead.")
        self.num_images = num_images
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.start_step = start_step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * (self.batch_size // self.world_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_images)

    def __iter__(self) -> Iterator[SampleKey]:
        n = self.num_images
        share = self.batch_size // self.world_size
        epoch = -1
        perm = np.arange(n)
        for step in range(self.start_step, self.total_steps):
            first = step * self.batch_size + self.rank * share
            for p in range(first, first + share):
                if p // n != epoch:
                    epoch = p // n
                    perm = self._permutation(epoch)
                yield int(perm[p % n]), p


# Start method of DataLoader workers. Not "fork": OpenCV's thread pool (and CUDA) do not survive a fork of a
# process that has used them (cv2 calls in a forked worker can block forever).
WORKER_START_METHOD = "spawn"


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one thread per worker, so workers do not compete with training."""
    del worker_id
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
