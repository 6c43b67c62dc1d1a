"""Flow parameters: checks that run before any work (errors name the parameter), and the training config."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from storage.names import parse_split
from tasks.train import TrainConfig, run_name


def check_splits(parameter: str, splits: Sequence[str]) -> list[str]:
    """`splits` as a list of train/val/test names; a typo ("valid") is a ValueError naming `parameter`."""
    if isinstance(splits, str) or not splits:
        raise ValueError(f"Expected {parameter} to be a non-empty list of splits. Got {splits!r} instead.")
    try:
        return [parse_split(s) for s in splits]
    except ValueError as e:
        raise ValueError(f"{parameter}: {e}") from None


def flow_train_config(*, store: str, version: str, runs: Path, variant: str, iters: int, batch_size: int,
                      crop_size: int, num_points: int, num_workers: int, reweight: str,
                      inverse_weight_near_pseudo: bool, seed: int, device: str,
                      init_model: str | None, recipe: str = "auto",
                      scale_range: Sequence[float] = (0.5, 2.0), test_scale: float = 1.0) -> TrainConfig:
    """The training stage's `TrainConfig` (square crops), in a folder under `runs` named by `run_name`;
    building it checks the training parameters."""
    cfg = TrainConfig(store=store, version=version, variant=variant, iters=iters, batch_size=batch_size,
                      crop_size=(crop_size, crop_size), num_points=num_points, num_workers=num_workers,
                      reweight=reweight, inverse_weight_near_pseudo=inverse_weight_near_pseudo, seed=seed,
                      device=device, init_model=init_model, out_dir=str(runs), recipe=recipe,
                      scale_range=cast(tuple[float, float], tuple(scale_range)),  # TrainConfig checks it
                      test_scale=test_scale)
    return dataclasses.replace(cfg, out_dir=str(runs / run_name(cfg)))
