"""Typed evaluation results: what `tasks.evaluation.evaluate` returns and what its readers (the report, validation during
training, the model registry, the flows, the benches) read by attribute instead of by string key.

Every type has ``to_dict()``, the JSON document written to ``metrics.json`` and to the store's model registry,
and ``from_dict()``, which reads such a document back (``from_dict(x.to_dict()) == x``); the document's keys
are those ``metrics.json`` has always had, so reports and registries written before these types still load.

- `MetricSummary`: the summed counts of a split and their scores (``models.metrics.metrics_summary``).
- `ClassResult`: one new class scored class vs rest against its hand masks (model or pseudo labels).
- `SplitResult`: rules 1-3 on one split (`tasks.evaluation.evaluate`'s module docstring).
- `ModelEvaluation`: ``evaluate_model``'s result, one `SplitResult` per split.
- `PseudoSplitResult` and `PseudoEvaluation`: ``evaluate_pseudo``'s result (rule 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from addclass.common.errors import InputError

__all__ = ["ClassResult", "MetricSummary", "ModelEvaluation", "PseudoEvaluation", "PseudoSplitResult", "SplitResult"]

_BINARY_KEYS = ("binary_miou", "binary_mbiou", "binary_mbf1")


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class MetricSummary:
    """Scores of counts summed over ``num_images`` images (``models.metrics.metrics_summary``).

    ``per_class``: ``[{id, name, iou, biou, bf1, acc, bf_precision, bf_recall}]``; ``means``: ``miou``,
    ``mbiou``, ``mbf1``, ``macc``, ``aAcc``; ``counts``: the summed ``models.metrics.COUNT_KEYS`` per class.
    Scores are fractions, None where undefined (a class absent from both prediction and truth).
    """

    num_images: int
    num_classes: int
    ignore_index: int
    per_class: list[dict[str, Any]]
    means: dict[str, float | None]
    counts: dict[str, list[int]]

    @property
    def miou(self) -> float | None:
        return self.means.get("miou")

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "per_class": [dict(c) for c in self.per_class], "means": dict(self.means),
                "counts": {k: list(v) for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricSummary:
        return cls(num_images=int(d["num_images"]), num_classes=int(d["num_classes"]),
                   ignore_index=int(d["ignore_index"]), per_class=[dict(c) for c in d["per_class"]],
                   means={k: _opt_float(v) for k, v in d["means"].items()},
                   counts={k: [int(x) for x in v] for k, v in d["counts"].items()})


@dataclass(frozen=True)
class ClassResult:
    """A new class scored class vs rest against its hand masks, counts summed over the split.

    ``iou``, ``biou``, ``bf1``: the class's own scores (the paper's car tables); ``binary``: the means over
    {rest, class} (``binary_miou``, ``binary_mbiou``, ``binary_mbf1``); ``summary``: the two-class summary
    they come from; ``hand_mask_kind``: the kinds of hand mask used ("eval", "reference"); ``class_id``: the
    model's class index (None for pseudo labels).
    """

    name: str
    iou: float | None
    biou: float | None
    bf1: float | None
    binary: dict[str, float | None]
    summary: MetricSummary
    hand_mask_kind: list[str]
    class_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"iou": self.iou, "biou": self.biou, "bf1": self.bf1, **self.binary,
                               **self.summary.to_dict(), "class": self.name}
        if self.class_id is not None:
            out["class_id"] = self.class_id
        out["hand_mask_kind"] = list(self.hand_mask_kind)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassResult:
        class_id = d.get("class_id")
        return cls(name=str(d["class"]), iou=_opt_float(d["iou"]), biou=_opt_float(d["biou"]),
                   bf1=_opt_float(d["bf1"]), binary={k: _opt_float(d[k]) for k in _BINARY_KEYS},
                   summary=MetricSummary.from_dict(d), hand_mask_kind=list(d.get("hand_mask_kind", [])),
                   class_id=None if class_id is None else int(class_id))


@dataclass(frozen=True)
class SplitResult:
    """Rules 1-3 on one split: ``precise`` (new classes folded into others, against v1), ``new_classes`` (by
    name; only classes with hand masks on the split), ``all`` (K classes, None when no image has every hand
    mask) and ``per_image`` (``[{id, split, height, width, precise, new_classes, all}]``, split order)."""

    num_images: int
    precise: MetricSummary
    new_classes: dict[str, ClassResult]
    all: MetricSummary | None
    per_image: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "precise": self.precise.to_dict(),
                "new_classes": {n: c.to_dict() for n, c in self.new_classes.items()},
                "all": None if self.all is None else self.all.to_dict(), "per_image": list(self.per_image)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitResult:
        return cls(num_images=int(d["num_images"]), precise=MetricSummary.from_dict(d["precise"]),
                   new_classes={n: ClassResult.from_dict(c) for n, c in d["new_classes"].items()},
                   all=None if d.get("all") is None else MetricSummary.from_dict(d["all"]),
                   per_image=list(d.get("per_image", [])))


@dataclass(frozen=True)
class ModelEvaluation:
    """``evaluate_model``'s result: what was scored (store, checkpoint, label version, its ``classes``
    ``[{id, name, source}]`` in model class order, ``num_precise`` of them precise, ``new_classes`` by name)
    and a `SplitResult` per evaluated split."""

    store: str
    checkpoint: str | None
    device: str
    label_version: str
    classes: list[dict[str, Any]]
    num_precise: int
    new_classes: list[str]
    pred_dir: str | None
    splits: dict[str, SplitResult] = field(default_factory=dict)

    def split(self, name: str) -> SplitResult:
        """The split's result; an error naming the evaluated splits when it was not evaluated."""
        if name not in self.splits:
            raise InputError(f"Split {name!r} was not evaluated (evaluated: {sorted(self.splits)}).")
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "checkpoint": self.checkpoint, "device": self.device,
                "label_version": self.label_version, "classes": [dict(c) for c in self.classes],
                "num_precise": self.num_precise, "new_classes": list(self.new_classes), "pred_dir": self.pred_dir,
                "splits": {s: r.to_dict() for s, r in self.splits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelEvaluation:
        return cls(store=str(d["store"]), checkpoint=d.get("checkpoint"), device=str(d.get("device", "cpu")),
                   label_version=str(d["label_version"]), classes=[dict(c) for c in d["classes"]],
                   num_precise=int(d["num_precise"]), new_classes=list(d["new_classes"]),
                   pred_dir=d.get("pred_dir"), splits={s: SplitResult.from_dict(r) for s, r in d["splits"].items()})


@dataclass(frozen=True)
class PseudoSplitResult:
    """Stored pseudo masks of one class on one split against its hand masks (rule 4): ``scores`` over the
    images that have both, ``num_hand_masks`` and ``num_pseudo`` on the split, ``per_image``
    ``[{id, iou, biou, bf1}]``."""

    scores: ClassResult
    num_hand_masks: int
    num_pseudo: int
    per_image: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.scores.to_dict(), "num_hand_masks": self.num_hand_masks, "num_pseudo": self.num_pseudo,
                "per_image": list(self.per_image)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PseudoSplitResult:
        return cls(scores=ClassResult.from_dict(d), num_hand_masks=int(d["num_hand_masks"]),
                   num_pseudo=int(d["num_pseudo"]), per_image=list(d["per_image"]))


@dataclass(frozen=True)
class PseudoEvaluation:
    """``evaluate_pseudo``'s result: ``classes`` {name: {split: `PseudoSplitResult`}}, ``skipped`` {name:
    {split: reason}} and the pseudo-label run each class was scored from (``settings_keys``)."""

    store: str
    classes: dict[str, dict[str, PseudoSplitResult]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    settings_keys: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store,
                "classes": {n: {s: r.to_dict() for s, r in splits.items()} for n, splits in self.classes.items()},
                "skipped": {n: dict(s) for n, s in self.skipped.items()}, "settings_keys": dict(self.settings_keys)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PseudoEvaluation:
        return cls(store=str(d["store"]),
                   classes={n: {s: PseudoSplitResult.from_dict(r) for s, r in splits.items()}
                            for n, splits in d["classes"].items()},
                   skipped={n: dict(s) for n, s in d.get("skipped", {}).items()},
                   settings_keys=dict(d.get("settings_keys", {})))
