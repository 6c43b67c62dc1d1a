"""Validation during training: scores every N steps, the learning curve, and a warning for unlearned classes.

`validate` scores the model being trained on the store's validation split with `tasks.evaluation.evaluate.evaluate_model`
(the same rules as the final report): each new class against its hand masks (IoU / BIoU / BF1, class vs rest)
and the precise classes against v1 (mIoU). It predicts at the model's ``test_scale`` alone: a model that averages
several scales (``test_ratios``) is tracked at the first of them, at a fraction of the cost (the demo's scales 2
and 3 cost 3.25x scale 2), so its curve runs below the final evaluation, which uses every scale. `tasks.training.train` writes the result into ``train_log.jsonl`` as a line
``{"step": N, "val": {...}}`` (training lines hold ``"total"`` instead), and draws `learning_curve_png` from
that log into the run folder. `unpredicted_classes` names the classes that have ground truth on the split
and no correct pixel (IoU 0): after ``warn_after`` of a run, `tasks.training.train` logs a warning for them, the sign
of a recipe that does not learn.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from addclass.tasks.evaluation.evaluate import evaluate_model

CURVE_FILE = "learning_curve.png"


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


class _AtTestScale:
    """A MaSSFormer predicting at its ``test_scale`` only (without the other scales of ``test_ratios``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.num_classes = model.num_classes

    def eval(self) -> _AtTestScale:
        self.model.eval()
        return self

    def predict(self, images: Any) -> Any:
        return self.model.predict(images, scale=self.model.test_scale)


def validate(model: Any, *, store: str | os.PathLike[str], version: str, split: str = "val",
             max_images: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Scores ``model`` (put back in train mode by the caller) on ``split``, at its ``test_scale`` alone.

    Returns:
        ``{"split", "num_images", "scale": the inference scale, "miou7": 7-class mIoU, "new_classes": {name:
        {"iou", "biou", "bf1"}}, "per_class_iou": {name: IoU of each precise class with ground truth on the
        split}}``; fractions, None where undefined.
    """
    result = evaluate_model(store, model=_AtTestScale(model), splits=(split,), label_version=version,
                            device=device, progress=False, max_images=max_images)
    r = result.split(split)
    labelled = np.asarray(r.precise.counts["area_label"]) > 0
    return {
        "split": split,
        "num_images": r.num_images,
        "scale": float(model.test_scale),
        "miou7": _finite(r.precise.miou),
        "new_classes": {name: {"iou": _finite(m.iou), "biou": _finite(m.biou), "bf1": _finite(m.bf1)}
                        for name, m in r.new_classes.items()},
        "per_class_iou": {c["name"]: _finite(c["iou"]) for c, has in zip(r.precise.per_class, labelled, strict=True)
                          if has},
    }


def unpredicted_classes(scores: Mapping[str, Any]) -> list[str]:
    """Classes with ground truth on the validated split and IoU 0 there (no pixel of them found)."""
    new = [name for name, m in scores["new_classes"].items() if m["iou"] is not None and m["iou"] == 0.0]
    precise = [name for name, iou in scores["per_class_iou"].items() if iou is not None and iou == 0.0]
    return precise + new


def read_log(run_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training lines, validation lines) of a run's ``train_log.jsonl``."""
    path = Path(run_dir) / "train_log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "total" in r], [r for r in rows if "val" in r]


def learning_curve_png(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path | None:
    """Draws the training loss (smoothed) and the validation scores against the step; None without a log.

    Args:
        run_dir: The run folder (its ``train_log.jsonl``).
        out: The PNG to write (default ``run_dir/learning_curve.png``); written atomically.
    """
    train_rows, val_rows = read_log(run_dir)
    if not train_rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else Path(run_dir) / CURVE_FILE
    steps = np.array([r["step"] for r in train_rows])
    loss = np.array([r["total"] for r in train_rows], float)
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")  # running mean of `window` steps
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    ax_loss.plot(steps, loss, color="0.8", lw=0.6)
    ax_loss.plot(steps[window - 1:], smooth, color="C0", lw=1.4, label=f"mean of {window} steps")
    ax_loss.set(xlabel="step", ylabel="total loss", title="training loss", yscale="log")
    ax_loss.legend(fontsize=8)
    if val_rows:
        vsteps = [r["step"] for r in val_rows]
        series: dict[str, list[float]] = {"7-class mIoU": [_pct(r["val"]["miou7"]) for r in val_rows]}
        for name in val_rows[-1]["val"]["new_classes"]:
            for key in ("iou", "biou"):
                series[f"{name} {key.upper().replace('BIOU', 'BIoU').replace('IOU', 'IoU')}"] = [
                    _pct(r["val"]["new_classes"].get(name, {}).get(key)) for r in val_rows]
        for label, values in series.items():
            ax_val.plot(vsteps, values, marker="o", ms=3, label=label)
        ax_val.set(xlabel="step", ylabel="%", ylim=(0, 100),
                   title=f"validation ({_where(val_rows[-1]['val'])})")
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation", ha="center", va="center")
        ax_val.set_axis_off()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _pct(x: float | None) -> float:
    return math.nan if x is None else 100.0 * x


def _where(scores: Mapping[str, Any]) -> str:
    """``val, 8 images, scale 2`` (logs written before the scale was recorded: without it)."""
    scale = scores.get("scale")
    return f"{scores['split']}, {scores['num_images']} images" + ("" if scale is None else f", scale {scale:g}")


def format_scores(scores: Mapping[str, Any]) -> str:
    """One log line: ``val (8 images, scale 2): car IoU 81.2 BIoU 40.1, 7-class mIoU 77.0``."""
    parts = [f"{name} IoU {_fmt(m['iou'])} BIoU {_fmt(m['biou'])}" for name, m in scores["new_classes"].items()]
    parts.append(f"7-class mIoU {_fmt(scores['miou7'])}")
    return f"{scores['split']} ({_where(scores).split(', ', 1)[1]}): " + ", ".join(parts)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"

