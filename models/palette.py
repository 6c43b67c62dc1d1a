"""Label-map colours shared by reports, overlays and exports.

Class ids follow ``docs/interfaces.md``: 0 others, 1 human, 2 building, 3 vegetation, 4 ground, 5 sky,
6 water, 7.. new classes, 255 ignore. The MaSS13K colours are fixed; new classes take the next entry of
``NEW_CLASS_COLORS`` (class 7, usually "car", is orange), and ids past that list get deterministic,
well-spread generated colours.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping

import numpy as np

__all__ = [
    "BASE_CLASS_NAMES",
    "BASE_PALETTE",
    "IGNORE_COLOR",
    "NEW_CLASS_COLORS",
    "class_color",
    "colorize",
    "palette_lut",
]

RGB = tuple[int, int, int]

BASE_CLASS_NAMES: tuple[str, ...] = ("others", "human", "building", "vegetation", "ground", "sky", "water")

BASE_PALETTE: dict[int, RGB] = {
    0: (0, 0, 0),
    1: (255, 0, 0),
    2: (64, 34, 64),
    3: (0, 255, 0),
    4: (93, 64, 0),
    5: (0, 0, 255),
    6: (0, 255, 255),
}

# Colours for new classes 7, 8, ...; chosen far from the base palette and from each other.
NEW_CLASS_COLORS: tuple[RGB, ...] = (
    (255, 128, 0),  # 7, e.g. car
    (255, 0, 255),
    (255, 255, 0),
    (128, 0, 255),
    (0, 128, 128),
    (255, 160, 200),
    (128, 128, 0),
    (0, 160, 255),
)

IGNORE_COLOR: RGB = (128, 128, 128)


def class_color(class_id: int, *, ignore_index: int = 255) -> RGB:
    """Colour of one class id.

    Args:
        class_id: Label value (0..254, or ``ignore_index``).
        ignore_index: Label value drawn in grey.

    Returns:
        An RGB triple.
    """
    if class_id == ignore_index:
        return IGNORE_COLOR
    if class_id in BASE_PALETTE:
        return BASE_PALETTE[class_id]
    k = class_id - len(BASE_PALETTE)
    if 0 <= k < len(NEW_CLASS_COLORS):
        return NEW_CLASS_COLORS[k]
    # Golden-ratio hue walk: deterministic and well spread for any further id.
    hue = (0.13 + 0.618033988749895 * class_id) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return (round(255 * r), round(255 * g), round(255 * b))


def palette_lut(palette: Mapping[int, RGB] | None = None, *, ignore_index: int = 255) -> np.ndarray:
    """A 256 x 3 uint8 lookup table from label value to RGB.

    Args:
        palette: Overrides for some ids; the others use ``class_color``.
        ignore_index: Label value drawn in grey.

    Returns:
        256 x 3 uint8 array.
    """
    lut = np.array([class_color(i, ignore_index=ignore_index) for i in range(256)], dtype=np.uint8)
    for class_id, color in (palette or {}).items():
        lut[int(class_id)] = color
    return lut


def colorize(
    labels: np.ndarray, palette: Mapping[int, RGB] | None = None, *, ignore_index: int = 255
) -> np.ndarray:
    """Colour a label map.

    Args:
        labels: H x W integer label map; values outside 0..255 are drawn as ignore.
        palette: Optional overrides, as for ``palette_lut``.
        ignore_index: Label value drawn in grey.

    Returns:
        H x W x 3 uint8 RGB image.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"Expected an H x W label map. Got shape {labels.shape} instead.")
    lut = palette_lut(palette, ignore_index=ignore_index)
    if labels.dtype != np.uint8:
        fill = ignore_index if 0 <= ignore_index <= 255 else 255
        labels = np.where((labels >= 0) & (labels <= 255), labels, fill).astype(np.uint8)
    rgb: np.ndarray = lut[labels]  # H x W x 3
    return rgb
