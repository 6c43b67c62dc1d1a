"""The labeler options' rules, written once: their ranges (`check_options`, `check_tiles`) and which of them
stay out of a resume key while they are off (`OFF_SWITCH`, `without_off_options`).

`models.labelers.build.LabelerConfig` checks its fields with them when it is built, and
`models.labelers.grounded_sam.GroundedSamLabeler` (built directly by benches, and by ``with_options``) checks
its own with the same functions. Light on purpose: the labeler's torch modules import it, and it imports no
other labeler module (the labeler modules form no import cycle; tests/test_import_graph.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from addclass.common.errors import InputError

# The options' defaults, for `LabelerConfig` (whose defaults the flows' `LabelingParams` take) and the labeler.
SAM_VARIANT: Final = "vit_b"
DINO_CONFIG: Final = "swint_ogc"
BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
NMS_IOU = 0.8
MAX_BOXES = 20
DINO_IMAGE_SIZE = 800  # GroundingDINO's input short side (the reference's)
TILE_OVERLAP = 128
NEGATIVE_IOU = 0.5
REFINE_MARGIN = 0.25


def check_tiles(tile: int, overlap: int) -> None:
    """Raises InputError unless ``tile >= 64`` and ``0 <= overlap <= tile / 2`` (detection tiles, px)."""
    if tile < 64 or not 0 <= overlap <= tile // 2:
        raise InputError(f"Expected tile_size >= 64 and 0 <= tile_overlap <= tile_size / 2. "
                         f"Got {tile}, {overlap} instead.")


def check_options(*, box_threshold: float, text_threshold: float, nms_iou: float | None, max_boxes: int | None,
                  tile_size: int | None, tile_overlap: int, min_region_area: int, negative_iou: float,
                  refine_margin: float) -> None:
    """Raises InputError naming the first detection option out of its range.

    The thresholds are in [0, 1): a score is kept when it is strictly above its threshold, and a sigmoid score
    is never above 1, so a threshold of 1 would keep nothing.
    """
    for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
        if not 0.0 <= float(value) < 1.0:
            raise InputError(f"Expected {name} in [0, 1). Got {value} instead.")
    if nms_iou is not None and not 0.0 < float(nms_iou) <= 1.0:
        raise InputError(f"Expected nms_iou in (0, 1] or None. Got {nms_iou} instead.")
    if max_boxes is not None and int(max_boxes) < 1:
        raise InputError(f"Expected max_boxes >= 1 or None. Got {max_boxes} instead.")
    if tile_size is not None:
        check_tiles(int(tile_size), int(tile_overlap))
    if int(min_region_area) < 0:
        raise InputError(f"Expected min_region_area >= 0. Got {min_region_area} instead.")
    if not 0.0 < float(negative_iou) <= 1.0:
        raise InputError(f"Expected negative_iou in (0, 1]. Got {negative_iou} instead.")
    if not 0.0 <= float(refine_margin) <= 4.0:
        raise InputError(f"Expected refine_margin in [0, 4]. Got {refine_margin} instead.")


# option -> the option that switches it on; an option is off while its switch is falsy (None, 0, (), False)
OFF_SWITCH: dict[str, str] = {
    "tile_size": "tile_size", "tile_overlap": "tile_size", "min_region_area": "min_region_area",
    "negative_phrases": "negative_phrases", "negative_iou": "negative_phrases",
    "refine": "refine", "refine_margin": "refine", "hq_token_only": "hq_token_only",
}


def without_off_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` without the options that are off (`OFF_SWITCH`): the resume keys of runs made before an
    option existed stay the same. Options whose switch is not in `settings` are kept."""
    return {k: v for k, v in settings.items()
            if not (k in OFF_SWITCH and OFF_SWITCH[k] in settings and not settings[OFF_SWITCH[k]])}
