"""Where a CamVid model puts "car": predicted vs hand-labelled car share, and the precise (v1) classes under its
false-positive car pixels, per split. A diagnostic for the val/test gap of ``bench/camvid_newclass.py``.

Each argument is a run folder of that experiment (``runs/<row>/``, with ``final/``); the store is the run's
own (``train_config.json``). Prints JSON, one entry per run and split.

Example::

    .venv/bin/python bench/camvid_confusion.py runs/camvid_newclass/runs/* --splits val,test
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/camvid_newclass.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from addclass.storage.registry import IGNORE_INDEX  # noqa: E402
from addclass.storage.store import LabelStore, open_label_store  # noqa: E402
from addclass.tasks.evaluation.evaluate import hand_mask_kinds, predict_labels  # noqa: E402
from addclass.tasks.model_files.model_folder import load_trained_model  # noqa: E402

CLASS = "car"


def car_confusion(store: LabelStore, predict: Any, split: str, *, car_id: int) -> dict[str, Any]:
    """Car shares and the v1 classes under false-positive car pixels over the images of ``split`` that
    have a car hand mask. ``predict(image) -> H x W labels``."""
    names = {c.id: c.name for c in store.classes()}
    kinds = hand_mask_kinds(store, CLASS, split)
    under_fp = np.zeros(256, np.int64)
    pixels = pred_car = gt_car = true_pos = 0
    for image_id in store.image_ids(split):
        if image_id not in kinds:
            continue
        pred = predict(store.read_image(split, image_id)) == car_id
        hand = store.read_hand_mask(kinds[image_id], CLASS, image_id)  # type: ignore[arg-type]
        valid = hand != IGNORE_INDEX
        gt = (hand == 1) & valid
        pixels += int(valid.sum())
        pred_car += int((pred & valid).sum())
        gt_car += int(gt.sum())
        true_pos += int((pred & gt).sum())
        v1 = store.read_labels(split, image_id, version="v1")
        under_fp += np.bincount(v1[pred & valid & ~gt], minlength=256)
    fp = int(under_fp.sum())
    return {
        "images": len(kinds), "pred_car_share": pred_car / max(1, pixels), "gt_car_share": gt_car / max(1, pixels),
        "recall": true_pos / max(1, gt_car), "precision": true_pos / max(1, pred_car),
        "false_positive_v1_classes": {names.get(k, str(k)) if k != IGNORE_INDEX else "ignore": round(v / fp, 4)
                                      for k, v in enumerate(under_fp.tolist()) if v} if fp else {},
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (with final/ and train_config.json)")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []
    for run in map(Path, args.runs):
        if not (run / "final").is_dir() or not (run / "train_config.json").is_file():
            continue  # not a finished training run (e.g. a results file next to them)
        store = open_label_store(json.loads((run / "train_config.json").read_text())["store"])
        car_id = store.class_by_name(CLASS).id
        model = load_trained_model(run / "final", device=args.device)

        def predict(image: np.ndarray, model: torch.nn.Module = model) -> np.ndarray:
            return predict_labels(model, [image], args.device)[0]

        for split in args.splits.split(","):
            res = car_confusion(store, predict, split, car_id=car_id)
            out.append({"run": str(run), "split": split, **res})
            print(json.dumps(out[-1]), flush=True)


if __name__ == "__main__":
    main()
