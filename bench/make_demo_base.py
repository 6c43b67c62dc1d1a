"""Makes the demo's shipped 7-class base model: the tiny MaSSFormer trained on the synthetic scenes' precise
classes (car is still inside "others"), as a user's trained 7-class model would be.

The demo (`addclass demo`) adds "car" to this model the way ``addclass add-class --init-model`` adds a class to
a user's: so the quick start runs the product's path (fine-tune a trained model) instead of training every
class from random weights. This script is the one way the shipped file is made:

1. ingest the demo's store (`tasks.demo.DemoConfig`'s scenes: the same seed, count and size);
2. train the tiny model on label version v1 (the 7 precise classes) from scratch with the scratch recipe, at
   the demo's crop, resize range and inference scales;
3. score it on the val split (7-class mIoU against the precise labels);
4. write the model folder with its weights in float16 (half the bytes; the model computes in float32, so
   the weights are widened again when loaded) and a config.json stripped of this machine's paths, into
   ``--publish`` (default: the folder the demo reads, `models.pretrained.DEMO_BASE`), and score the
   published folder again, as loaded.

It prints one JSON document: the settings, the training time, both scores and the sha256 of the published
``model.safetensors`` (docs record it next to this command). Example::

    .venv/bin/python bench/make_demo_base.py --out runs/demo_base          # ~25 min on 2 cores
    .venv/bin/python bench/make_demo_base.py --out runs/demo_base_quick --iters 20 --publish runs/quick_pub
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from addclass.models.hashing import file_sha256
from addclass.models.pretrained import DEMO_BASE
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.demo import DemoConfig
from addclass.tasks.evaluation.evaluate import evaluate_model
from addclass.tasks.model_files.model_folder import (
    build_model,
    load_model_weights,
    read_model_config,
    save_model_dir,
)
from addclass.tasks.training.train import TrainConfig, train

# the scales the published base model was made and scored with (the demo's fine-tuned model averages 1.5, 2 and 3,
# chosen later on val: docs/quickstart.md)
BASE_TEST_RATIOS = (1.0, 1.5)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    demo = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo_base", help="work folder (store, run); replaced")
    ap.add_argument("--publish", default=str(DEMO_BASE), help="where the model folder goes (replaced)")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=demo.seed, help="training seed (the scenes use the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def publish_model_folder(source: Path, target: Path, *, iters: int, seed: int) -> Path:
    """Writes ``target``: the model of ``source`` with float16 weights and a config without this machine's
    paths (store and run folders), naming the command that made it."""
    config = read_model_config(source)
    model = build_model(config)
    load_model_weights(model, source)
    config.update(store=None, train_config={k: v for k, v in config["train_config"].items()
                                            if k not in ("store", "out_dir")},
                  source={"kind": "bench/make_demo_base.py", "iters": iters, "seed": seed})
    return save_model_dir(target, model=model.half(), config=config, step=iters)


def val_miou(store: Path, model_dir: Path) -> float:
    """7-class mIoU (%) on val against the precise labels."""
    result = evaluate_model(store, model_dir, splits=("val",), progress=False)
    miou = result.split("val").precise.miou
    assert miou is not None, "no val image scored"
    return round(100 * miou, 2)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    demo = DemoConfig()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # this script's own work folder
    store = out / "store.zarr"
    ingest_synthetic(store, images=demo.images, size=demo.size, seed=demo.seed, progress=False)
    config = TrainConfig(
        store=str(store), out_dir=str(out / "run"), version="v1", variant="tiny", iters=args.iters, batch_size=2,
        crop_size=(demo.crop, demo.crop), scale_range=demo.scale_range, num_points=demo.points,
        checkpoint_every=args.iters, keep_checkpoints=1, seed=args.seed, device="cpu", num_workers=0,
        val_every=0, test_scale=demo.test_scale, test_ratios=BASE_TEST_RATIOS, recipe="scratch",
    )
    t0 = time.perf_counter()
    final = train(config, progress=True)
    train_s = time.perf_counter() - t0
    trained = val_miou(store, final)
    published = publish_model_folder(final, Path(args.publish), iters=args.iters, seed=args.seed)
    as_loaded = val_miou(store, published)
    result = {
        "command": "bench/make_demo_base.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"iters": args.iters, "seed": args.seed, "scenes": {"images": demo.images, "size": demo.size,
                                                                         "seed": demo.seed},
                     "crop": demo.crop, "scale_range": demo.scale_range, "points": demo.points,
                     "test_scale": demo.test_scale, "test_ratios": BASE_TEST_RATIOS, "threads": args.threads},
        "train_s": round(train_s, 1), "s_per_step": round(train_s / args.iters, 3),
        "val_miou7": {"trained_fp32": trained, "published_fp16": as_loaded},
        "published": str(published), "model.safetensors": {
            "bytes": (published / "model.safetensors").stat().st_size,
            "sha256": file_sha256(published / "model.safetensors")},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
