"""Model registry in the label store (`sections["models"]`): trained models, their metrics, the champion.

Each entry records the checkpoint path, the label version it was trained on, a hash of its training config,
validation/test metrics and a selection score. `retrain` promotes a challenger only if it beats the champion on
the validation split, compared on the terms both have (a challenger trained on a newer version may know more
classes: its extra classes are not held against it, nor counted for it). Written by the lock-holding flow
process only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from addclass.common.errors import InputError, UnknownNameError
from addclass.models.hashing import json_hash
from addclass.storage.store import now_iso, open_label_store
from addclass.tasks.evaluation.evaluation_results import ModelEvaluation

SECTION = "models"


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of a training config as JSON with sorted keys (``config_hash`` of a
    registry entry; pinned in tests/models/test_hashing.py, as stored registries hold it)."""
    return json_hash(config, length=16)


def _evaluation(metrics: ModelEvaluation | Mapping[str, Any]) -> ModelEvaluation | None:
    """A registry entry's metrics as stored (``ModelEvaluation.to_dict()``) or typed; None for an empty one."""
    if isinstance(metrics, ModelEvaluation):
        return metrics
    return ModelEvaluation.from_dict(metrics) if metrics else None


def score_terms(results: ModelEvaluation | Mapping[str, Any], *, split: str = "val") -> dict[str, float]:
    """The numbers behind the selection score on `split`: ``"precise"`` (the 7-class mIoU) and each new class's
    IoU by name; terms that are missing or NaN are left out (empty when the split was not evaluated).

    Args:
        results: ``evaluate_model``'s result, or its ``to_dict()`` as a registry entry stores it.
    """
    evaluation = _evaluation(results)
    s = None if evaluation is None else evaluation.splits.get(split)
    if s is None:
        return {}
    terms = {"precise": s.precise.miou} | {name: c.iou for name, c in s.new_classes.items()}
    return {k: float(v) for k, v in terms.items() if v is not None and not math.isnan(v)}


def _mean(terms: dict[str, float], names: set[str] | None = None) -> float:
    values = [v for k, v in terms.items() if names is None or k in names]
    return float(sum(values) / len(values)) if values else math.nan


def selection_score(results: ModelEvaluation | Mapping[str, Any], *, split: str = "val") -> float:
    """The number that picks the champion: the mean of the 7-class mIoU and each new class's IoU on `split`.

    Returns NaN when the split was not evaluated (such a model can never be promoted over a scored one).
    """
    return _mean(score_terms(results, split=split))


def list_models(store_path: str | os.PathLike[str]) -> dict[str, Any]:
    return open_label_store(store_path).section(SECTION)


def register_model(store_path: str | os.PathLike[str], *, model_id: str, path: str, label_version: str,
                   config: dict[str, Any], metrics: ModelEvaluation, split: str = "val",
                   promote: str = "if-better") -> dict[str, Any]:
    """Record a trained model and decide whether it becomes the champion.

    Args:
        promote: 'if-better' (challenger must beat the champion's score), 'always', or 'never'.

    Returns:
        {"model_id", "score", "champion" (the champion after the decision), "promoted", "previous_champion",
        "previous_score", "compared_on" (the terms both models were scored on; their means decided)}.
    """
    if promote not in ("if-better", "always", "never"):
        raise InputError(f"Expected promote in ('if-better', 'always', 'never'). Got {promote!r} instead.")
    store = open_label_store(store_path, mode="a")
    reg = store.section(SECTION) or {"champion": None, "models": {}}
    score = selection_score(metrics, split=split)
    prev = reg.get("champion")
    prev_score = math.nan
    if prev in reg["models"] and reg["models"][prev]["score"] is not None:
        prev_score = float(reg["models"][prev]["score"])
    mine = score_terms(metrics, split=split)
    theirs = score_terms(reg["models"][prev].get("metrics", {}), split=split) if prev in reg["models"] else {}
    shared = set(mine) & set(theirs)  # like with like: the classes both models know
    mine_cmp, theirs_cmp = (_mean(mine, shared), _mean(theirs, shared)) if shared else (score, prev_score)
    if promote == "always" or (promote == "if-better" and (prev is None or math.isnan(theirs_cmp)
                                                         or (not math.isnan(mine_cmp) and mine_cmp > theirs_cmp))):
        reg["champion"] = model_id
    reg["models"][model_id] = {
        "path": path, "label_version": label_version, "config_hash": config_hash(config), "config": config,
        "score": None if math.isnan(score) else score, "score_split": split, "metrics": metrics.to_dict(),
        "created": now_iso(),
    }
    store.set_section(SECTION, reg)
    return {"model_id": model_id, "score": score, "champion": reg["champion"],
            "promoted": reg["champion"] == model_id, "previous_champion": prev,
            "previous_score": None if math.isnan(prev_score) else prev_score, "compared_on": sorted(shared)}


def resolve_init_model(store_path: str | os.PathLike[str], init_model: str | None) -> str | None:
    """The model folder a run starts from, checked before any work: ``"champion"`` is the store's current
    champion, a path must hold a trained model (`tasks.model_files.model_folder.resolve_init_dir`), None is a fresh start.

    Raises:
        KeyError: ``"champion"`` and the store has no champion yet (the message names the store).
        FileNotFoundError: nothing trained at the path (the message names it).
    """
    if init_model is None:
        return None
    if init_model == "champion":
        reg = list_models(store_path) or {}
        champion = reg.get("champion")
        if champion is None or champion not in reg.get("models", {}):
            raise UnknownNameError(
                f"init_model='champion' but {store_path} has no champion model yet: run add-class or retrain "
                "once without init_model, or pass a model folder."
            )
        init_model = str(reg["models"][champion]["path"])
    from addclass.tasks.model_files.model_folder import (
        resolve_init_dir,  # torch-heavy; only when a run starts from a model
    )

    return str(resolve_init_dir(init_model))
