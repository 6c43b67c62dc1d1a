"""Will a prediction fit in memory? An estimate of one image's peak, checked before any image is predicted.

Whole-image prediction holds the network's activations for the whole (scaled) image at once: a 4096 x 3072
photo through r50 needs far more than a laptop has, and the kernel's OOM killer would end the run with no
message. `check_predict_memory` refuses such a run up front, naming the largest image, the estimate, what is
free and the mode that fits (``slide``: memory bounded by the window).

The estimate is linear in the pixels of the largest single forward pass (the scaled image, or the scaled tile in
``slide`` / ``auto`` mode), plus a fixed part per variant, plus the class scores kept at the image's own size
(K float32 maps, twice: the pass and the running TTA sum). The constants were measured on the CPU (fp32,
inference mode, peak resident set of ``semantic_probs`` of 8 classes at 512², 1024² and 1024 x 1536 in a fresh
process; the per-pixel part is the larger of the two slopes, rounded up; `bench/predict.py` compares the
estimate with the measured peak)::

    variant    fixed    per pixel of the forward pass    measured peak at 1024 x 1536
    tiny       60 MB    450 B                            1.45 GB (process included)
    lite_r18   120 MB   650 B                            1.84 GB
    r50        200 MB   1400 B                           3.00 GB

The baselines were measured the same way (one thread) on another 2-core machine, next to r50 and tiny in the
same session, where r50 peaked at 1276 / 2180 / 2786 MiB (512², 1024², 1024 x 1536; slopes 1207 / 1211 B per
pixel) and tiny at 833 / 1120 / 1314 MiB: Mask2Former R50 peaked at 1269 / 1511 / 2103 MiB (slopes 323 / 1185
B), MaskFormer R50 at 1200 / 1409 / 1646 MiB (278 / 475 B), the tiny baselines at or below 1105 MiB with
slopes below 280 B. So ``mask2former_r50`` takes r50's constants and the tiny baselines tiny's (they bound
them); ``maskformer_r50`` takes r50's fixed part and its larger slope scaled by r50's table-to-session ratio
(1400 / 1211), rounded up::

    mask2former_r50    200 MB   1400 B                          2.05 GB (this session; r50: 2.72)
    maskformer_r50     200 MB    600 B                          1.61 GB
    mask2former_tiny    60 MB    450 B                          1.08 GB (tiny: 1.28)
    maskformer_tiny     60 MB    450 B                          1.03 GB

The SeMask FPN variants take r50's and tiny's constants unmeasured (estimates, docs/design.md §1.9),
so r50 on a whole 4096 x 3072 image is estimated at 22.6 GiB (margin included), and at 3.8 GiB in 1024 tiles.

``ADDCLASS_MEMORY_CHECK=0`` turns the check off, as for training (`tasks.training.train_memory`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from addclass.common.errors import InputError, InsufficientMemoryError
from addclass.tasks.training.train_memory import (
    ENV_SWITCH,
    MARGIN,
    PROCESS_BYTES,
    VariantMemory,
    available_bytes,
)

VARIANT_PREDICT_MEMORY: dict[str, VariantMemory] = {
    "tiny": VariantMemory(60 * 2**20, 450),
    "lite_r18": VariantMemory(120 * 2**20, 650),
    "r50": VariantMemory(200 * 2**20, 1400),
    "mask2former_r50": VariantMemory(200 * 2**20, 1400),
    "maskformer_r50": VariantMemory(200 * 2**20, 600),
    "mask2former_tiny": VariantMemory(60 * 2**20, 450),
    "maskformer_tiny": VariantMemory(60 * 2**20, 450),
    # Not measured yet (estimates): r50's and tiny's constants.
    "semask_fpn_swint": VariantMemory(200 * 2**20, 1400),
    "semask_fpn_tiny": VariantMemory(60 * 2**20, 450),
}


def forward_pixels(height: int, width: int, *, scale: float, window: int | None) -> int:
    """Pixels of the largest single forward pass over an image: the whole image at ``scale``, or one
    ``window`` x ``window`` tile (image pixels) at ``scale`` when the image is larger than the window."""
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if window is None or max(height, width) <= window:
        return h * w
    side = max(1, round(window * scale))
    return min(h, side) * min(w, side)


def estimate_predict_bytes(*, variant: str, height: int, width: int, num_classes: int, scale: float,
                           window: int | None) -> int:
    """Estimated peak memory of predicting one image, in bytes, margin included.

    Raises:
        ValueError: ``variant`` has no measurement.
    """
    if variant not in VARIANT_PREDICT_MEMORY:
        raise InputError(f"Expected variant in {sorted(VARIANT_PREDICT_MEMORY)}. Got {variant!r} instead.")
    m = VARIANT_PREDICT_MEMORY[variant]
    scores = 2 * 4 * num_classes * height * width  # the pass's K x H x W float32 scores and the TTA sum
    network = m.bytes_per_pixel * forward_pixels(height, width, scale=scale, window=window)
    return int(MARGIN * (PROCESS_BYTES + m.fixed_bytes + network + scores))


def check_predict_memory(images: Sequence[tuple[str | Path, int, int]], *, variant: str, num_classes: int,
                         scale: float, window: int | None, device: torch.device, mode: str) -> None:
    """Refuses a prediction whose largest image would not fit in the device's free memory.

    Args:
        images: ``(path, height, width)`` of every image.
        scale: The largest scale an image is predicted at (test scale x the largest TTA ratio, or without
            TTA the largest of the model's ``test_ratios``).
        window: Tile size in image pixels at that scale, or None for whole images.
        mode: The prediction mode, for the message.

    Raises:
        InsufficientMemoryError: naming the image, the estimate, what is free and what to change.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0" or not images:
        return
    free = available_bytes(device)
    if free is None:
        return
    need, path, h, w = max((estimate_predict_bytes(variant=variant, height=h, width=w, num_classes=num_classes,
                                                   scale=scale, window=window), str(path), h, w)
                           for path, h, w in images)
    if need <= free:
        return
    gb = 2**30
    fix = ("use --mode slide (memory bounded by --window)" if window is None
           else "use a smaller --window" if mode == "slide" else "use --mode slide with a smaller --window")
    raise InsufficientMemoryError(
        f"Predicting {path} ({w}x{h}) with {variant} in {mode} mode at scale {scale:g} needs about "
        f"{need / gb:.1f} GB on {device.type}, and {free / gb:.1f} GB is free: {fix}. {ENV_SWITCH}=0 skips "
        "this check."
    )
