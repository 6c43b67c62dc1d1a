"""Ingest datasets into a new label store: MaSS13K layout, CamVid (car hidden in "others"), synthetic.

Every ingest builds the store in a temporary folder and publishes it only when every image is valid and
written (`storage.store.build_label_store`), so a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from addclass.common.errors import InputError
from addclass.models.hashing import file_sha256
from addclass.storage.names import parse_image_id
from addclass.storage.registry import IGNORE_INDEX, PRECISE_CLASSES, ImageRecord
from addclass.storage.store import LabelStore, build_label_store
from addclass.tasks.data.synthetic_scenes import make_scene

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
VALID_PRECISE = np.array(list(range(len(PRECISE_CLASSES))) + [IGNORE_INDEX])

# CamVid ids: 0 Sky, 1 Building, 2 Pole, 3 Road, 4 Pavement, 5 Tree, 6 SignSymbol, 7 Fence, 8 Car,
# 9 Pedestrian, 10 Bicyclist, 11 Unlabelled  ->  our 7 classes (car hidden in "others").
CAMVID_TO_PRECISE = np.array([5, 2, 0, 4, 4, 3, 0, 0, 0, 1, 1, IGNORE_INDEX], np.uint8)
CAMVID_CAR, CAMVID_UNLABELLED = 8, 11


@dataclass(frozen=True)
class Sample:
    """One image to ingest: its id, image file and annotation file."""

    id: str
    image: Path
    annotation: Path


def _jpeg_is_complete(path: Path) -> bool:
    """A JPEG ends with its end-of-image marker (FF D9), possibly followed by a little padding; a cut file does
    not (libjpeg only warns "Premature end of JPEG file" and fills the rest with grey)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return True  # not a JPEG stream at all: the decoder names it
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256))
        return b"\xff\xd9" in f.read()


def read_rgb(path: Path, *, image_id: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Missing image file {path} (image id {image_id!r}).")
    if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_is_complete(path):
        raise InputError(f"Image {path} (image id {image_id!r}) is cut short: no JPEG end marker. Copy it again.")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"Cannot decode image {path} (image id {image_id!r}): unreadable or corrupt.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label_png(path: Path, *, image_id: str) -> np.ndarray:
    """A label map as stored: a grey (``L``) PNG's values or a palette (``P``) PNG's indices, as mmseg reads
    them (many datasets ship palette PNGs; OpenCV would expand those to colours)."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing annotation {path} for image id {image_id!r}.")
    try:
        with Image.open(path) as im:
            im.load()
            mode, bands = im.mode, len(im.getbands())
            lab = np.asarray(im) if mode in ("L", "P") else None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"Cannot decode annotation {path} (image id {image_id!r}): unreadable or corrupt "
                         f"({e}).") from None
    if lab is None:
        if bands != 1:
            raise InputError(f"Annotation {path} (image id {image_id!r}) has {bands} channels ({mode}); expected "
                             "a single-channel (grey or palette) label map.")
        raise InputError(f"Annotation {path} (image id {image_id!r}) is a {mode} image; expected 8-bit labels.")
    return np.ascontiguousarray(lab, dtype=np.uint8)


def check_labels(labels: np.ndarray, *, allowed: np.ndarray, image_hw: tuple[int, int], where: str) -> None:
    if labels.shape != image_hw:
        raise InputError(f"{where}: label size {labels.shape[1]}x{labels.shape[0]} differs from the image "
                         f"size {image_hw[1]}x{image_hw[0]}.")
    bad = np.setdiff1d(np.unique(labels), allowed)
    if bad.size:
        raise InputError(f"{where}: label values {bad.tolist()} are outside the class set {allowed.tolist()}.")


def _pair_folder(images: Path, annotations: Path, *, label_ext: str = ".png") -> list[Sample]:
    for folder in (images, annotations):
        if folder.is_symlink() and not folder.is_dir():
            raise FileNotFoundError(f"{folder} is a broken or looping symbolic link ({os.readlink(folder)}).")
    if not images.is_dir():
        raise FileNotFoundError(f"Missing image folder {images}.")
    if not annotations.is_dir():
        raise FileNotFoundError(f"Missing annotation folder {annotations}.")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputError(f"Empty split: no {'/'.join(IMAGE_EXTS)} images in {images}.")
    seen: dict[str, Path] = {}
    samples = []
    for f in files:
        image_id = parse_image_id(f.stem)
        if image_id in seen:
            raise InputError(f"Duplicate image id {image_id!r}: {seen[image_id]} and {f}.")
        seen[image_id] = f
        samples.append(Sample(id=image_id, image=f, annotation=annotations / f"{f.stem}{label_ext}"))
    stems = {f.stem for f in files}
    orphans = sorted(p.name for p in annotations.iterdir() if p.suffix == label_ext and p.stem not in stems)
    if orphans:
        log.warning("%d annotations in %s have no image in %s and are not ingested: %s%s", len(orphans),
                    annotations, images, ", ".join(orphans[:5]), ", ..." if len(orphans) > 5 else "")
    return samples


def _check_unique_across_splits(splits: dict[str, list[Sample]]) -> None:
    owner: dict[str, str] = {}
    for split, samples in splits.items():
        for s in samples:
            if s.id in owner:
                raise InputError(f"Duplicate image id {s.id!r} in splits {owner[s.id]!r} and {split!r}.")
            owner[s.id] = split


def _ingest_split(store: LabelStore, split: str, samples: list[Sample], *, convert, progress: bool) -> None:
    """Validate and write one split; `convert(raw_label, sample) -> (precise, {class: hand mask})`."""
    records = []
    for s in tqdm(samples, desc=f"ingest {split}", unit="img", disable=not progress):
        image = read_rgb(s.image, image_id=s.id)
        raw = read_label_png(s.annotation, image_id=s.id)
        if raw.shape != image.shape[:2]:
            raise InputError(f"{s.annotation}: label size {raw.shape[1]}x{raw.shape[0]} differs from image "
                             f"{s.image} size {image.shape[1]}x{image.shape[0]} (image id {s.id!r}).")
        precise, hand = convert(raw, s)
        store.write_precise_labels(split, s.id, precise)
        for cls, mask in hand.items():
            store.write_hand_mask("eval" if split == "test" else "reference", cls, split, s.id, mask)
        records.append(ImageRecord(id=s.id, path=str(s.image.resolve()), sha256=file_sha256(s.image),
                                   height=image.shape[0], width=image.shape[1]))
    store.write_image_records(split, records)


def mass13k_image_folder(src: Path, split: str) -> Path | None:
    """The image folder of a split: `images/{split}`, or for train and val the released dataset's
    `images_pad/{split}` (its config reads train and val from there and test from `images/test`)."""
    candidates = [src / "images_pad" / split] if split in ("train", "val") else []
    candidates.append(src / "images" / split)
    if split in ("train", "val") and (src / "images" / split).is_dir():
        candidates.reverse()  # a folder laid out by hand: images/ first
    return next((c for c in candidates if c.is_dir()), None)


def ingest_mass13k(src: str | os.PathLike[str], store: str | os.PathLike[str], *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """MaSS13K layout: `images/{split}/*.jpg` (train and val also as the released `images_pad/{split}`) and
    `annotations/{split}/*.png` (labels 0..6, 255; grey or palette PNGs)."""
    src = Path(src)
    for sp in ("train", "val", "test"):
        for link in (src / "images" / sp, src / "images_pad" / sp):
            if link.is_symlink() and not link.is_dir():  # is_dir() is False for a loop: the split would vanish
                raise FileNotFoundError(f"{link} is a broken or looping symbolic link ({os.readlink(link)}).")
    folders = {sp: mass13k_image_folder(src, sp) for sp in ("train", "val", "test")}
    splits = {sp: _pair_folder(folder, src / "annotations" / sp) for sp, folder in folders.items() if folder}
    if not splits:
        raise FileNotFoundError(f"No MaSS13K splits under {src} (expected images/{{train,val,test}} or the "
                                "released images_pad/{train,val} and images/test).")
    _check_unique_across_splits(splits)

    def convert(raw: np.ndarray, s: Sample) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        check_labels(raw, allowed=VALID_PRECISE, image_hw=raw.shape, where=f"{s.annotation} (id {s.id!r})")
        return raw, {}

    with build_label_store(store, name=src.name, source="mass13k", overwrite=overwrite, sources=[src]) as st:
        for split, samples in splits.items():
            _ingest_split(st, split, samples, convert=convert, progress=progress)
    return Path(store)


def camvid_to_precise(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CamVid ids -> (7-class precise labels, car hand mask 0/1 with 255 where CamVid is Unlabelled)."""
    car = (raw == CAMVID_CAR).astype(np.uint8)
    car[raw == CAMVID_UNLABELLED] = IGNORE_INDEX
    return CAMVID_TO_PRECISE[raw], car


def ingest_camvid(src: str | os.PathLike[str], store: str | os.PathLike[str], *, val_fraction: float = 0.2,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """CamVid layout (`train/`, `trainannot/`, `test/`, `testannot/`); car is hidden inside "others".

    The last `val_fraction` of the (sorted, sequential) train frames become the val split, so validation
    never looks at test. Car hand masks go to `reference/car` (train, val) and `eval/car` (test).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"Expected val_fraction in [0, 1). Got {val_fraction} instead.")
    src = Path(src)
    train = _pair_folder(src / "train", src / "trainannot")
    test = _pair_folder(src / "test", src / "testannot")
    n_val = int(round(len(train) * val_fraction))
    splits = {"train": train[: len(train) - n_val], "val": train[len(train) - n_val:], "test": test}
    splits = {k: v for k, v in splits.items() if v}
    _check_unique_across_splits(splits)

    def convert(raw: np.ndarray, s: Sample) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        check_labels(raw, allowed=np.arange(12), image_hw=raw.shape, where=f"{s.annotation} (id {s.id!r})")
        precise, car = camvid_to_precise(raw)
        return precise, {"car": car}

    with build_label_store(store, name="camvid", source="camvid", overwrite=overwrite, sources=[src]) as st:
        for split, samples in splits.items():
            _ingest_split(st, split, samples, convert=convert, progress=progress)
    return Path(store)


def synthetic_split_sizes(n: int) -> dict[str, int]:
    """60 / 20 / 20 % train / val / test, at least one image in each split."""
    if n < 3:
        raise InputError(f"Expected at least 3 synthetic images (one per split). Got {n} instead.")
    n_val = n_test = max(1, round(n * 0.2))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def ingest_synthetic(store: str | os.PathLike[str], *, images: int = 12, size: tuple[int, int] = (256, 384),
                     seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Procedural scenes (`tasks.data.synthetic_scenes`); image files go to `STORE/files/<split>/`.

    Exact car masks are stored as hand masks: `reference/car` for train and val, `eval/car` for test.
    """
    h, w = size
    with build_label_store(store, name=f"synthetic-seed{seed}", source="synthetic", overwrite=overwrite) as st:
        k = 0
        for split, n in tqdm(synthetic_split_sizes(images).items(), desc="synthetic", disable=not progress):
            folder = st.path / "files" / split
            folder.mkdir(parents=True, exist_ok=True)
            records = []
            for _ in range(n):
                image_id = f"syn{seed}_{k:05d}"
                scene = make_scene(height=h, width=w, seed=seed * 1_000_003 + k)
                path = folder / f"{image_id}.png"
                if not cv2.imwrite(str(path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"Cannot write {path}.")
                st.write_precise_labels(split, image_id, scene.labels)
                st.write_hand_mask("eval" if split == "test" else "reference", "car", split, image_id,
                                   scene.car.astype(np.uint8))
                records.append(ImageRecord(id=image_id, path=str(path.relative_to(st.path)),
                                           sha256=file_sha256(path), height=h, width=w))
                k += 1
            st.write_image_records(split, records)
    return Path(store)


def iter_samples(splits: dict[str, list[Sample]]) -> Iterable[tuple[str, Sample]]:
    for split, samples in splits.items():
        for s in samples:
            yield split, s
