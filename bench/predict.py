"""Prediction on the CPU: seconds and peak memory per image, whole image vs sliding window, the TTA cost, and how
close `tasks.prediction.predict_memory`'s estimate (the up-front refusal of whole images that do not fit) comes to the
measured peak.

Each measurement runs in a fresh child process (random weights of the variant, fp32, `MaSSFormer.semantic_probs`
or `sliding_probs` under inference mode, as `addclass predict` runs them), so its peak resident set is its own.
Anchors, in the same run: whole-image mode for the slide rows (``slide / whole`` ratios of seconds and peak), the
single pass for the TTA row (``tta / single``), and the measured peak for the estimate (``estimate / measured``).
Prints one JSON document.

Example::

    .venv/bin/python bench/predict.py                                  # lite_r18 and r50 at 4096 x 3072
    .venv/bin/python bench/predict.py --variants tiny --size 768 1024  # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 8  # 7 precise classes and car


def child(variant: str, height: int, width: int, mode: str, window: int, views: int, threads: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from addclass.models.build import MODEL_BUILDERS

    torch.set_num_threads(threads)
    model = MODEL_BUILDERS[variant](NUM_CLASSES).eval()
    image = torch.rand(1, 3, height, width) * 255
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        total = None
        for v in range(views):  # TTA: flips of the image (the views' cost, not their scales)
            view = image.flip(-1) if v % 2 else image
            p = (model.sliding_probs(view, window=window, scale=1.0) if mode == "slide"
                 else model.semantic_probs(view, scale=1.0))
            total = p if total is None else total + p
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": round(seconds, 2), "peak_bytes": peak, "before_bytes": base}


def measure(variant: str, height: int, width: int, mode: str, *, window: int, views: int, threads: int,
            timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, str(height), str(width), mode, str(window), str(views),
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1], "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="lite_r18,r50")
    ap.add_argument("--size", type=int, nargs=2, default=(3072, 4096), metavar=("H", "W"))
    ap.add_argument("--window", type=int, default=1024, help="slide: tile size (stride 3/4 of it)")
    ap.add_argument("--tta-views", type=int, default=12, help="views of the TTA row (MaSS13K: 6 scales x 2 flips)")
    ap.add_argument("--tta-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        v, h, w, mode, window, views, threads = args.child
        print(json.dumps(child(v, int(h), int(w), mode, int(window), int(views), int(threads))))
        return
    from addclass.tasks.prediction.predict_memory import estimate_predict_bytes

    h, w = args.size
    gb = 2**30
    rows = []
    for variant in args.variants.split(","):
        row: dict[str, Any] = {"variant": variant, "size": [h, w], "window": args.window, "threads": args.threads}
        for mode in ("whole", "slide"):
            row[mode] = measure(variant, h, w, mode, window=args.window, views=1, threads=args.threads,
                                timeout=args.timeout)
            window = None if mode == "whole" else args.window
            est = estimate_predict_bytes(variant=variant, height=h, width=w, num_classes=NUM_CLASSES, scale=1.0,
                                         window=window)
            row[mode]["estimate_bytes"] = est
            if "peak_bytes" in row[mode]:
                row[mode]["estimate_over_measured"] = round(est / row[mode]["peak_bytes"], 3)
                row[mode]["peak_gb"] = round(row[mode]["peak_bytes"] / gb, 2)
        if "seconds" in row["whole"] and "seconds" in row["slide"]:
            row["slide_over_whole"] = {"seconds": round(row["slide"]["seconds"] / row["whole"]["seconds"], 3),
                                       "peak": round(row["slide"]["peak_bytes"] / row["whole"]["peak_bytes"], 3)}
        th, tw = args.tta_size
        single = measure(variant, th, tw, "whole", window=args.window, views=1, threads=args.threads,
                         timeout=args.timeout)
        tta = measure(variant, th, tw, "whole", window=args.window, views=args.tta_views, threads=args.threads,
                      timeout=args.timeout)
        row["tta"] = {"size": [th, tw], "views": args.tta_views, "single_s": single.get("seconds"),
                      "tta_s": tta.get("seconds")}
        if single.get("seconds") and tta.get("seconds"):
            row["tta"]["tta_over_single"] = round(tta["seconds"] / single["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "predict", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
