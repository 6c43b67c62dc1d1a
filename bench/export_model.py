"""onnxruntime against PyTorch on the CPU: seconds per image and the largest score difference.

For each model (the ``tiny`` and ``lite_r18`` variants with random weights, or ``--model-dir`` trained ones),
exports ONNX with `tasks.model_files.export_model.export_model` (checked at its two small sizes), then times
``MaSSFormer.semantic_probs(scale=1.0)`` (PyTorch eager, the model's own CPU paths) and the onnxruntime session
on the same random ``--size`` image, alternating them, with the same thread count for both; the median of
``--repeats`` runs after one warm-up each is reported. Prints JSON.

Usage::

    python bench/export_model.py                       # tiny + lite_r18 at 1024 x 1024, 2 threads
    python bench/export_model.py --size 512 768 --threads 1 --model-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from addclass.models.build import MODEL_BUILDERS
from addclass.tasks.model_files.export_model import export_model, load_exported
from addclass.tasks.model_files.model_folder import FORMAT, FORMAT_VERSION, load_trained_model, save_model_dir

NUM_CLASSES = 7


def _random_model_dir(variant: str, folder: Path) -> Path:
    """A model folder holding ``variant`` with random (seeded) weights."""
    torch.manual_seed(0)
    model = MODEL_BUILDERS[variant](NUM_CLASSES)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "variant": variant, "pixel_decoder": "hr",
        "num_classes": NUM_CLASSES, "class_names": [f"class{i}" for i in range(NUM_CLASSES)],
        "store_class_ids": list(range(NUM_CLASSES)), "test_scale": 1.0,
    }
    return save_model_dir(folder / variant, model=model, config=config, step=0)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(model_dir: Path, out: Path, *, size: tuple[int, int], threads: int, repeats: int
                ) -> dict[str, Any]:
    """Exports ``model_dir`` to ONNX at ``out`` and times both runtimes on one ``size`` image."""
    start = time.perf_counter()
    info = export_model(model_dir, out, format="onnx", overwrite=True)
    export_s = time.perf_counter() - start
    model = load_trained_model(model_dir)
    run_onnx = load_exported(out, format="onnx", threads=threads)
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255  # 1 x 3 x H x W
    expected = model.semantic_probs(images, scale=1.0)
    diff = float((run_onnx(images) - expected).abs().max())
    torch_s = _median_seconds(lambda: model.semantic_probs(images, scale=1.0), repeats)
    onnx_s = _median_seconds(lambda: run_onnx(images), repeats)
    return {
        "variant": info["variant"],
        "export_s": round(export_s, 1),
        "check_max_abs_diff": max(c["max_abs_diff"] for c in info["verification"]["checks"]),
        "torch_s_per_image": round(torch_s, 3),
        "onnxruntime_s_per_image": round(onnx_s, 3),
        "onnxruntime_speedup": round(torch_s / onnx_s, 2),
        "max_abs_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["tiny", "lite_r18"], choices=sorted(MODEL_BUILDERS))
    parser.add_argument("--model-dir", nargs="*", default=[], help="trained model or run folders instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(d) for d in args.model_dir] or [_random_model_dir(v, Path(tmp)) for v in args.variants]
        for i, model_dir in enumerate(dirs):
            results.append(bench_model(model_dir, Path(tmp) / f"model{i}.onnx", size=tuple(args.size),
                                       threads=args.threads, repeats=args.repeats))
            results[-1]["model_dir"] = str(model_dir) if args.model_dir else None
    print(json.dumps({
        "size": list(args.size), "threads": args.threads, "repeats": args.repeats,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "cpu": platform.processor(),
        "models": results,
    }, indent=2))


if __name__ == "__main__":
    main()
