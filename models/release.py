"""The sizes of MaSSFormer's released recipe that several modules default to, and the CPU-sized runs' point
count, written once.

Light on purpose (no torch): the CLI reads them to print its defaults. The release trains on 8 GPUs x 2 images
of square crops; the points are sampled per mask by the matcher and the mask losses.
"""

from __future__ import annotations

ITERS = 80000
CROP_SIZE = 1024
NUM_POINTS = 12544  # sampled points per mask (matcher and losses)
CPU_NUM_POINTS = 8192  # the CPU-sized runs' points per mask (the flows' defaults, `addclass train` on a CPU, the demo)
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # MaSS13K's multi-scale test, as ratios of the test scale
