"""Run a trained model on new images of any size: label PNGs (and optional overlays and class scores) in a folder.

Inputs are files, folders (searched recursively for images) or glob patterns. Each image ``NAME.ext`` gives
``OUT/NAME.png``: a palette PNG whose pixel values are the store's class ids (0 others ... 6 water, 7.. new classes;
what mmseg and `addclass evaluate-masks` read) and whose palette draws them in the project's colours;
``OUT/classes.json`` lists the ids, names and colours. Options: ``OUT/overlays/NAME.jpg`` (image and labels
blended) and ``OUT/scores/NAME.npz`` (per-class scores normalised to sum 1, uint8 0-255, K x H x W: large).

Modes (`PredictConfig`): the whole image at once (the release evaluates 4096 x 3072 images whole), or sliding
windows (memory bounded by the window), each at the model's own scales (``test_scale`` times each of its
``test_ratios``, averaged in probability space), or with test-time augmentation: the scores averaged over
``tta_scales`` (times the model's ``test_scale``, in place of its ratios) and horizontal flips.

A rerun skips images whose PNG this command wrote before (listed in the folder's ``.addclass-written.json``)
unless ``overwrite``; a file it did not write is never replaced. An unreadable image is reported by name and
the others go on; the caller sees the failures in the returned summary.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import Image

from addclass.common.errors import InputError
from addclass.models import release
from addclass.models.massformer.model import MaSSFormer
from addclass.models.palette import class_color, colorize
from addclass.storage.staging import WRITTEN_MANIFEST, record_written

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CLASSES_FILE = "classes.json"
PREDICT_MODES = ("auto", "whole", "slide")
DEFAULT_TTA_SCALES = release.TTA_SCALES  # MaSS13K's multi-scale test (ratios of test_scale)


@dataclass(frozen=True)
class PredictConfig:
    """How to predict.

    Attributes:
        mode: ``"auto"`` (the model's own: tiles of the size it trained on, `MaSSFormer.scores`), ``"whole"``
            (one pass over the full image) or ``"slide"`` (``window`` tiles every ``stride``).
        window: Tile size of ``slide``, in input pixels (a multiple of 256 wastes no padding).
        stride: Tile step of ``slide`` (None: 3/4 of the window).
        tta: Average over ``tta_scales`` x (image, flipped image).
        tta_scales: Ratios of the model's ``test_scale``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        bf16: bf16 autocast of the network on CUDA (ignored on the CPU).
        overlays: Also write ``overlays/NAME.jpg``.
        scores: Also write ``scores/NAME.npz``.
        overwrite: Replace predictions this command wrote before (never other files).
    """

    mode: Literal["auto", "whole", "slide"] = "auto"
    window: int = 1024
    stride: int | None = None
    tta: bool = False
    tta_scales: tuple[float, ...] = DEFAULT_TTA_SCALES
    device: str = "cpu"
    bf16: bool = True
    overlays: bool = False
    scores: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PREDICT_MODES:
            raise InputError(f"Expected mode in {PREDICT_MODES}. Got {self.mode!r} instead.")
        if self.window < 32 or (self.stride is not None and not 0 < self.stride <= self.window):
            raise InputError(f"Expected window >= 32 and 0 < stride <= window. Got {self.window}, {self.stride}.")
        if not self.tta_scales or min(self.tta_scales) <= 0:
            raise InputError(f"Expected positive tta_scales. Got {self.tta_scales!r} instead.")


def find_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The images named by ``inputs`` (files, folders searched recursively, glob patterns), in order, once each.

    Raises:
        FileNotFoundError: an input matches nothing (the message names it).
        ValueError: two images would write the same output name (both are named).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True)
                             if Path(m).suffix.lower() in IMAGE_SUFFIXES and Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"No image at {item} (expected an image file, a folder of images or a glob "
                                    f"pattern; image types {', '.join(IMAGE_SUFFIXES)}).")
        found += matches
    unique = list(dict.fromkeys(p.resolve() for p in found))
    by_name: dict[str, Path] = {}
    for p in unique:
        if p.stem in by_name:
            raise InputError(f"{by_name[p.stem]} and {p} would both write {p.stem}.png: predict them into "
                             "separate folders.")
        by_name[p.stem] = p
    return unique


def read_image_rgb(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB (EXIF orientation applied).

    Raises:
        ValueError: the file cannot be decoded (the message names it).
    """
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"Cannot decode image {path}: unreadable, corrupt or not an image.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@torch.no_grad()
def image_scores(model: MaSSFormer, image_rgb: np.ndarray, config: PredictConfig) -> torch.Tensor:
    """K x H x W class scores of one image, normalised to sum 1 per pixel, averaged over the TTA views."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)[None].float().to(device)  # 1 x 3 x H x W
    ratios = config.tta_scales if config.tta else model.test_ratios  # TTA's ratios replace the model's own
    scales = [r * model.test_scale for r in ratios]
    flips = (False, True) if config.tta else (False,)
    total = None
    use_bf16 = config.bf16 and device.type == "cuda"
    for scale in scales:
        for flip in flips:
            view = x.flip(-1) if flip else x
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if config.mode == "slide":
                    p = model.sliding_probs(view, window=config.window, stride=config.stride, scale=scale)
                elif config.mode == "auto":
                    p = model.scores(view, scale=scale)
                else:
                    p = model.semantic_probs(view, scale=scale)
            p = p.float()[0]  # K x H x W
            p = p / p.sum(dim=0, keepdim=True).clamp_min(1e-6)
            p = p.flip(-1) if flip else p
            total = p if total is None else total + p
    assert total is not None
    return total / (len(scales) * len(flips))


def palette_png(labels: np.ndarray, path: Path) -> None:
    """Writes ``labels`` (H x W uint8 class ids) as a palette PNG, atomically."""
    im = Image.fromarray(labels, mode="P")
    flat: list[int] = []
    for i in range(256):
        flat += list(class_color(i))
    im.putpalette(flat)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_extras(name: str, image_rgb: np.ndarray, labels: np.ndarray, scores: torch.Tensor, out: Path,
                  config: PredictConfig) -> None:
    if config.overlays:
        (out / "overlays").mkdir(exist_ok=True)
        blend = cv2.addWeighted(image_rgb, 0.5, colorize(labels), 0.5, 0)
        if not cv2.imwrite(str(out / "overlays" / f"{name}.jpg"), cv2.cvtColor(blend, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Cannot write {out / 'overlays' / f'{name}.jpg'}.")
    if config.scores:
        (out / "scores").mkdir(exist_ok=True)
        quantised = (scores.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        np.savez_compressed(out / "scores" / f"{name}.npz", scores=quantised)


def write_classes_json(out: Path, model_config: dict[str, Any], *, model_dir: Path) -> None:
    """``classes.json``: store class id, name and colour of every class the PNGs can hold, and the model."""
    ids = model_config.get("store_class_ids") or list(range(model_config["num_classes"]))
    doc = {"model": str(model_dir), "label_version": model_config.get("label_version"),
           "classes": [{"id": int(i), "name": n, "color": list(class_color(int(i)))}
                       for i, n in zip(ids, model_config["class_names"], strict=True)]}
    (out / CLASSES_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def _previous(out: Path) -> set[str]:
    try:
        return set(json.loads((out / WRITTEN_MANIFEST).read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _outputs(stem: str, config: PredictConfig) -> list[str]:
    """The files one image writes, relative to the output folder (the label PNG first)."""
    return ([f"{stem}.png"] + ([f"overlays/{stem}.jpg"] if config.overlays else [])
            + ([f"scores/{stem}.npz"] if config.scores else []))


@dataclass(frozen=True)
class PredictPlan:
    """What a prediction run does (`plan_predict`): ``images`` to predict (paths), those ``skipped`` (predicted
    before, no ``overwrite``) and ``refused`` ({path: why}: a file addclass did not write is in the way)."""

    model_dir: str
    out_dir: str
    config: PredictConfig
    class_ids: tuple[int, ...]  # store class id of each model class index
    images: tuple[str, ...]
    skipped: tuple[str, ...]
    refused: dict[str, str]


def plan_predict(model_dir: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]],
                 out_dir: str | os.PathLike[str], *, config: PredictConfig = PredictConfig()) -> PredictPlan:
    """Finds the images and the model, writes ``classes.json`` and lists every file the run will write in the
    folder's manifest before any is written (so workers in several processes never update it, and a killed
    run's files are still known as ours).

    Raises:
        FileNotFoundError, ValueError: bad inputs or model (named), before anything is written.
        MemoryError: the largest image would not fit in the device's free memory in this mode
            (`tasks.prediction.predict_memory`).
    """
    from addclass.tasks.model_files.model_folder import read_model_config, resolve_model_dir

    images = find_images(inputs)
    folder = resolve_model_dir(model_dir)
    model_config = read_model_config(folder)
    check_memory(_image_sizes(images), model_config, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_classes_json(out, model_config, model_dir=folder)
    ours = _previous(out)
    todo: list[str] = []
    skipped: list[str] = []
    refused: dict[str, str] = {}
    for path in images:
        rel = f"{path.stem}.png"
        if (out / rel).exists() and rel not in ours:
            refused[str(path)] = f"{out / rel} exists and was not written by addclass predict; it is kept."
        elif (out / rel).exists() and not config.overwrite:
            skipped.append(str(path))
        else:
            todo.append(str(path))
    record_written(out, [r for p in todo for r in _outputs(Path(p).stem, config)])
    class_ids = model_config.get("store_class_ids") or list(range(model_config["num_classes"]))
    return PredictPlan(model_dir=str(folder), out_dir=str(out), config=config, class_ids=tuple(class_ids),
                       images=tuple(todo), skipped=tuple(skipped), refused=refused)


def _image_sizes(images: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, height, width) of each image, from its header (an unreadable image is left out: it fails by name
    when its turn comes)."""
    sizes = []
    for path in images:
        try:
            with Image.open(path) as im:
                sizes.append((str(path), im.height, im.width))
        except (OSError, ValueError):
            continue
    return sizes


def check_memory(sizes: Sequence[tuple[str, int, int]], model_config: dict[str, Any], config: PredictConfig) -> None:
    """`tasks.prediction.predict_memory.check_predict_memory` for images of ``sizes`` ((name, height, width)) predicted by
    a model of ``model_config`` with ``config``."""
    from addclass.tasks.prediction.predict_memory import check_predict_memory
    from addclass.tasks.training.train import resolve_device

    ratios = config.tta_scales if config.tta else model_config.get("test_ratios", [1.0])
    scale = float(model_config.get("test_scale", 1.0)) * max(ratios)
    test_window = int(model_config.get("test_window", 0))
    window: int | None = None  # "whole", or "auto" with a whole-image model
    if config.mode == "slide":
        window = config.window
    elif config.mode == "auto" and test_window:
        window = max(1, round(test_window / scale))  # the model's tiles: test_window network pixels
    device = resolve_device(config.device)
    check_predict_memory(sizes, variant=str(model_config.get("variant")), num_classes=int(model_config["num_classes"]),
                         scale=scale, window=window, device=device, mode=config.mode)


def predict_batch(plan: PredictPlan, images: Sequence[str], *, progress: bool = False) -> dict[str, Any]:
    """Predicts ``images`` (a part of ``plan.images``) with the model loaded once; an image that cannot be read
    or written is reported and the others go on.

    Returns:
        ``{"written": [label PNG paths], "failed": {image path: message}}``.
    """
    from addclass.tasks.model_files.model_folder import load_trained_model

    config = plan.config
    model = load_trained_model(plan.model_dir, device=config.device)
    lut = np.array(plan.class_ids, np.uint8)
    out = Path(plan.out_dir)
    result: dict[str, Any] = {"written": [], "failed": {}}
    for path in _progress([Path(p) for p in images], progress):
        try:
            image = read_image_rgb(path)
            scores = image_scores(model, image, config)  # K x H x W
            labels = lut[scores.argmax(dim=0).cpu().numpy()]
            palette_png(labels, out / f"{path.stem}.png")
            _write_extras(path.stem, image, labels, scores, out, config)
            result["written"].append(str(out / f"{path.stem}.png"))
        except (OSError, ValueError) as e:  # this image only: the others go on
            result["failed"][str(path)] = str(e)
    return result


def predict_images(
    model_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    config: PredictConfig = PredictConfig(),
    progress: bool = False,
) -> dict[str, Any]:
    """Predicts every image of ``inputs`` into ``out_dir`` in this process (module docstring; the `predict`
    flow maps `predict_batch` over workers instead).

    Returns:
        ``{"out_dir", "written": [...], "skipped": [...], "failed": {image path: message}}``.

    Raises:
        FileNotFoundError, ValueError: bad inputs or model, before any prediction (named).
    """
    plan = plan_predict(model_dir, inputs, out_dir, config=config)
    done = predict_batch(plan, plan.images, progress=progress) if plan.images else {"written": [], "failed": {}}
    return {"out_dir": plan.out_dir, "written": done["written"], "skipped": list(plan.skipped),
            "failed": {**plan.refused, **done["failed"]}}


def _progress(items: Sequence[Path], enabled: bool) -> Iterable[Path]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="predict", unit="img")
