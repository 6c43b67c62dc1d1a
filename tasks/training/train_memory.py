"""Will a training run fit in memory? An estimate of its peak, checked against what the device has free.

A run that does not fit is refused before the model is built, with the estimate and the settings to change: the
alternative is the kernel's OOM killer ending this run, or a neighbour's, with no message.

The estimate is linear in the pixels of a step (``batch_size x crop height x crop width``), plus a fixed part
per variant (weights, gradients, AdamW state, the decoder's pixel-independent work) and the process itself
(Python, torch, the store). The constants were measured on the CPU (fp32, peak resident set of two training
steps with 2048 points; the points change the peak by < 2 %)::

    variant            fixed    per pixel of batch x crop^2     measured at batch 2 / 4, crop 256
    tiny               130 MB   2.2 kB                          1.14 / 1.43 GB
    lite_r18           370 MB   4.3 kB                          1.71 / 2.27 GB
    r50                540 MB   9.6 kB                          2.65 / 3.90 GB
    mask2former_r50    590 MB   8.8 kB                          2.38 / 3.46 GB
    maskformer_r50     510 MB   4.8 kB                          1.81 / 2.40 GB
    mask2former_tiny   120 MB   1.2 kB                          0.99 / 1.13 GB
    maskformer_tiny    130 MB   0.9 kB                          0.97 / 1.07 GB

(the four baselines measured later on another 2-core machine, with one thread, where tiny gave 1.13 / 1.39 GB;
the SeMask FPN constants are estimates, not measurements: ``semask_fpn_swint`` 560 MB + 6.0 kB, ``semask_fpn_tiny``
tiny's),
so the paper's setting (r50, batch 16, crop 1024) needs ~160 GB on one device: it is meant for 8 GPUs of 2
images each (~20 GB each). ``ADDCLASS_MEMORY_CHECK=0`` turns the check off (e.g. with swap you accept).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from addclass.common.errors import InputError, InsufficientMemoryError

PROCESS_BYTES = 750 * 2**20  # python + torch + zarr, before the model is built
MARGIN = 1.25  # allocator fragmentation, data loader workers' batches, validation at test scale
ENV_SWITCH = "ADDCLASS_MEMORY_CHECK"


@dataclass(frozen=True)
class VariantMemory:
    """Measured memory of one training step of a variant (module docstring)."""

    fixed_bytes: int
    bytes_per_pixel: int


VARIANT_MEMORY: dict[str, VariantMemory] = {
    "tiny": VariantMemory(130 * 2**20, 2200),
    "lite_r18": VariantMemory(370 * 2**20, 4300),
    "r50": VariantMemory(540 * 2**20, 9600),
    "mask2former_r50": VariantMemory(590 * 2**20, 8800),
    "maskformer_r50": VariantMemory(510 * 2**20, 4800),
    "mask2former_tiny": VariantMemory(120 * 2**20, 1200),
    "maskformer_tiny": VariantMemory(130 * 2**20, 900),
    # Not measured yet (estimates, docs/design.md §1.9): r50-like weights and optimiser state, a generous slope for
    # Swin's window attention and the Semantic FPN head at stride 4.
    "semask_fpn_swint": VariantMemory(560 * 2**20, 6000),
    "semask_fpn_tiny": VariantMemory(130 * 2**20, 2200),
}


def estimate_train_bytes(*, variant: str, batch_size: int, crop_size: tuple[int, int]) -> int:
    """Estimated peak memory of a training run, in bytes, margin included.

    Raises:
        ValueError: ``variant`` has no measurement.
    """
    if variant not in VARIANT_MEMORY:
        raise InputError(f"Expected variant in {sorted(VARIANT_MEMORY)}. Got {variant!r} instead.")
    m = VARIANT_MEMORY[variant]
    pixels = batch_size * crop_size[0] * crop_size[1]
    return int(MARGIN * (PROCESS_BYTES + m.fixed_bytes + m.bytes_per_pixel * pixels))


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free memory, or on the CPU the smaller of the kernel's
    ``MemAvailable`` and the cgroup's limit minus its use (containers); None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    candidates = [v for v in (_meminfo_available(), _cgroup_free()) if v is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_free() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def check_train_memory(
    *, variant: str, batch_size: int, crop_size: tuple[int, int], device: torch.device
) -> None:
    """Refuses a run whose estimated peak exceeds the device's free memory.

    Raises:
        InsufficientMemoryError: with the estimate, what is free, and the settings that bring it down.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return
    need = estimate_train_bytes(variant=variant, batch_size=batch_size, crop_size=crop_size)
    free = available_bytes(device)
    if free is None or need <= free:
        return
    gb = 2**30
    raise InsufficientMemoryError(
        f"A {variant} run with batch_size {batch_size} and crop_size {crop_size[0]}x{crop_size[1]} needs about "
        f"{need / gb:.1f} GB on {device.type}, and {free / gb:.1f} GB is free: lower batch_size (--batch-size) "
        f"or crop_size (--crop-size), or use a smaller variant (--variant tiny). {ENV_SWITCH}=0 skips this check."
    )
