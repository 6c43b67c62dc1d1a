"""Parameters, MACs, forward time and peak memory of MaSSFormer R50 against its baselines, in one run.

Rows: MaSSFormer R50 (``r50``), its FPN ablation (``r50`` with ``pixel_decoder="fpn"``), Mask2Former R50
(``mask2former_r50``), MaskFormer R50 (``maskformer_r50``) and SeMask FPN Swin-T (``semask_fpn_swint``);
docs/design.md §1.6, §1.8 and §1.9.

MACs are counted by `models.macs.count_macs` on the meta device (no memory, no compute) at the paper's
test size 4096 x 3072 (``--macs-size``); see that module for what is counted. The paper's figures (Tab. 2) are
fvcore MACs, which skip the deformable sampling ops (mmcv's DCN in MaSSFormer, MSDeformAttn in Mask2Former), so
the comparable column is ``macs_excluding_sampling_g``.

Forward time is measured on CPU at each ``--size`` (default 1024 x 1024 and 2048 x 2048) in eval mode under
``torch.no_grad()``, alternating the models so load changes hit them alike; the median is reported. Peak memory
is the rise of the process's peak resident set over one forward of each model alone (``/proc/self/clear_refs``
resets the peak; Linux only). Both are reported as ratios MaSSFormer / baseline. ``--predict-size H W``
additionally times ``MaSSFormer.predict`` (whole-image, chunked) and reports its peak RSS. ``--macs-only`` skips
all timing.

Usage::

    python bench/model.py --macs-only             # parameters + MACs at 4096 x 3072, a few seconds
    python bench/model.py                         # + timing and peak memory at 1024^2 and 2048^2 (long on CPU)
    python bench/model.py --size 512 512 --repeats 5 --threads 1 --predict-size 2048 1536
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from addclass.models.build import MODEL_BUILDERS, model_info
from addclass.models.macs import count_macs

NUM_CLASSES = 7
# Row name -> (variant, pixel decoder); None: the variant's own.
ROWS: dict[str, tuple[str, str | None]] = {
    "massformer": ("r50", "hr"),
    "fpn_ablation": ("r50", "fpn"),
    "mask2former": ("mask2former_r50", None),
    "maskformer": ("maskformer_r50", None),
    "semask_fpn": ("semask_fpn_swint", None),  # SeMask FPN Swin-T (docs/design.md §1.9); not in the MaSS13K paper
}
# The MaSS13K paper's Tab. 2 at 4096 x 3072 (fvcore MACs) and its parameter counts; the ablation is not in it.
PAPER = {
    "massformer": {"macs_g": 2036.0, "params_m": 37.42},
    "mask2former": {"macs_g": 3123.0, "params_m": 44.01},
    "maskformer": {"macs_g": 2396.0, "params_m": 41.31},
}
PAPER_MACS_G = PAPER["massformer"]["macs_g"]


def _build(row: str) -> torch.nn.Module:
    variant, decoder = ROWS[row]
    return MODEL_BUILDERS[variant](NUM_CLASSES, pixel_decoder=decoder).eval()


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return _rss_mb("VmHWM")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def static_rows(height: int, width: int) -> dict[str, Any]:
    """Parameters and MACs of every row (meta device), with the paper's figures and ratios to them."""
    out: dict[str, Any] = {}
    for row, (variant, decoder) in ROWS.items():
        info = model_info(variant, num_classes=NUM_CLASSES, pixel_decoder=decoder)
        macs = count_macs(variant, height=height, width=width, num_classes=NUM_CLASSES, pixel_decoder=decoder)
        rec: dict[str, Any] = {
            "variant": variant,
            "pixel_decoder": info["pixel_decoder"],
            "params": info["total"],
            "params_components": info["components"],
            "macs": macs,
        }
        if row in PAPER:
            rec["paper"] = PAPER[row]
            rec["params_ratio_to_paper"] = round(info["total"] / (PAPER[row]["params_m"] * 1e6), 4)
            rec["macs_ratio_to_paper"] = round(macs["macs_excluding_sampling_g"] / PAPER[row]["macs_g"], 4)
        out[row] = rec
    return out


def time_forward(height: int, width: int, repeats: int, rows: list[str]) -> dict[str, Any]:
    """Median eval forward time and peak-memory rise of each row at one input size; ratios MaSSFormer / row."""
    torch.manual_seed(0)
    models = {row: _build(row) for row in rows}
    images = torch.rand(1, 3, height, width) * 255
    times: dict[str, list[float]] = {row: [] for row in models}
    peak_rise: dict[str, float] = {}
    with torch.no_grad():
        for model in models.values():  # warm-up (oneDNN primitives, allocator), then the memory pass
            model(images)
        reset = True
        for row, model in models.items():
            gc.collect()
            reset = _reset_peak_rss() and reset
            before = _rss_mb("VmRSS")
            model(images)
            peak_rise[row] = round(_peak_rss_mb() - before, 1)
        for _ in range(repeats):
            for row, model in models.items():
                start = time.perf_counter()
                model(images)
                times[row].append(time.perf_counter() - start)
    median = {row: statistics.median(v) for row, v in times.items()}
    ref = "massformer"
    return {
        "input_hw": [height, width],
        "repeats": repeats,
        "forward_s": {row: round(t, 3) for row, t in median.items()},
        "peak_rss_rise_mb": peak_rise,
        "peak_reset": reset,
        "time_ratio_massformer_over": {
            row: round(median[ref] / median[row], 3) for row in models if row != ref and ref in median
        },
        "memory_ratio_massformer_over": {
            row: round(peak_rise[ref] / peak_rise[row], 3)
            for row in models
            if row != ref and ref in peak_rise and peak_rise[row] > 0
        },
        "all_runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def time_predict(height: int, width: int) -> dict[str, Any]:
    """Whole-image ``predict`` of MaSSFormer R50 (eval, CPU): time and peak resident memory."""
    torch.manual_seed(0)
    model = MODEL_BUILDERS["r50"](NUM_CLASSES).eval()
    images = torch.rand(1, 3, height, width) * 255
    reset = _reset_peak_rss()
    base = _peak_rss_mb()
    start = time.perf_counter()
    labels = model.predict(images)
    elapsed = time.perf_counter() - start
    assert labels.shape == (1, height, width)
    return {
        "input_hw": [height, width],
        "predict_s": round(elapsed, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mb": round(base, 1),
        "peak_reset": reset,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", nargs=2, type=int, action="append", default=None, metavar=("H", "W"),
        help="timing input, repeatable (default: 1024 1024 and 2048 2048)",
    )
    parser.add_argument("--macs-size", nargs=2, type=int, default=[4096, 3072], metavar=("H", "W"))
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS), help="rows to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--predict-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    parser.add_argument("--macs-only", action="store_true", help="parameters and MACs only, no timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.size or [[1024, 1024], [2048, 2048]]
    rows = list(dict.fromkeys(["massformer", *args.rows]))  # the ratios need MaSSFormer

    mh, mw = args.macs_size
    static = static_rows(mh, mw)
    result: dict[str, Any] = {
        "num_classes": NUM_CLASSES,
        "macs_input_hw": [mh, mw],
        "rows": static,
        "macs_ratio_massformer_over": {
            row: round(static["massformer"]["macs"]["macs_g"] / rec["macs"]["macs_g"], 3)
            for row, rec in static.items()
            if row != "massformer"
        },
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    if not args.macs_only:
        result["timing"] = [time_forward(h, w, args.repeats, rows) for h, w in sizes]
        if args.predict_size:
            result["predict"] = time_predict(args.predict_size[0], args.predict_size[1])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
