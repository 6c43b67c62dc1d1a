"""Checks of flow parameters that run before any work (errors name the parameter)."""

from __future__ import annotations

from collections.abc import Sequence

from storage.names import parse_split


def check_splits(parameter: str, splits: Sequence[str]) -> list[str]:
    """`splits` as a list of train/val/test names; a typo ("valid") is a ValueError naming `parameter`."""
    if isinstance(splits, str) or not splits:
        raise ValueError(f"Expected {parameter} to be a non-empty list of splits. Got {splits!r} instead.")
    try:
        return [parse_split(s) for s in splits]
    except ValueError as e:
        raise ValueError(f"{parameter}: {e}") from None
