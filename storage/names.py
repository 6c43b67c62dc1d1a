"""Validation of names that become paths or array names inside a store (zarr `parse_*` style)."""

from __future__ import annotations

import re

from addclass.common.errors import InputError

SPLITS: tuple[str, ...] = ("train", "val", "test")
_CLASS_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^v[1-9][0-9]{0,5}$")


def parse_split(split: str) -> str:
    """Return `split` if it is one of train/val/test, else raise ValueError quoting it."""
    if split not in SPLITS:
        raise InputError(f"Expected a split in {SPLITS}. Got {split!r} instead.")
    return split


def class_name_from_prompt(prompt: str) -> str:
    """Turn a free-text prompt into a safe class name: 'Traffic light' -> 'traffic_light'.

    A prompt of several phrases (GroundingDINO's separator: 'car . van . truck') is named after its first
    phrase ('car'). Anything that is not a lower-case letter or digit becomes '_', so a prompt such as '../x'
    can never escape the store ('x'). Raises ValueError for prompts that leave nothing usable.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"Expected a non-empty text prompt. Got {prompt!r} instead.")
    first = prompt.strip().split(" . ")[0]
    name = re.sub(r"[^a-z0-9]+", "_", first.lower()).strip("_")
    if name and name[0].isdigit():
        name = f"c_{name}"
    return parse_class_name(name[:48], what=f"prompt {prompt!r}")


def parse_class_name(name: str, *, what: str | None = None) -> str:
    """Return `name` if it is a valid class name (lower-case letters, digits, '_'; starts with a letter)."""
    if not isinstance(name, str) or not _CLASS_RE.match(name):
        src = f" (from {what})" if what else ""
        raise InputError(
            f"Expected a class name of lower-case letters, digits and '_' starting with a letter{src}. "
            f"Got {name!r} instead."
        )
    return name


def parse_image_id(image_id: str) -> str:
    """Return `image_id` if it is safe as an array name (letters, digits, '.', '_', '-'; no '..')."""
    if not isinstance(image_id, str) or not _IMAGE_ID_RE.match(image_id) or ".." in image_id:
        raise InputError(
            f"Expected an image id of letters, digits, '.', '_' or '-' (at most 128, no '..'). "
            f"Got {image_id!r} instead."
        )
    return image_id


def parse_version(version: str) -> str:
    """Return `version` if it looks like 'v1', 'v2', ..."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise InputError(f"Expected a label version such as 'v1' or 'v2'. Got {version!r} instead.")
    return version


def version_number(version: str) -> int:
    return int(parse_version(version)[1:])
