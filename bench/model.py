"""MACs and forward time of MaSSFormer R50 against the FPN mask-classification baseline, in one run.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no compute)
at the paper's test size 4096 x 3072; MACs = FLOPs / 2. Counted ops: convolutions, linear/matmul/bmm (einsums
and attention lower to these) and torchvision's deformable convolution (custom formula, C_out * C_in * k^2 per
output pixel). The paper's 2036G "FLOPs" are fvcore MACs (docs/design.md §1.6); fvcore skips custom autograd
ops such as mmcv's modulated deformable conv, so the comparable figure is ``macs_excluding_deform_g``.
fvcore's small elementwise extras (batch norm, upsampling: ~1-2 %) are not counted here.

Forward time is measured on CPU at ``--size`` (default 768 x 512, about a minute in all) in
eval mode under ``torch.no_grad()``, alternating the two models so load changes hit both alike; the median is
reported. ``--predict-size H W`` additionally times ``MaSSFormer.predict`` (whole-image, chunked) and reports
its peak RSS.

Usage::

    python bench/model.py                       # MACs at 4096 x 3072 + timing at 768 x 512
    python bench/model.py --size 512 512 --repeats 5 --threads 1 --predict-size 2048 1536
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.massformer.build import build_massformer_r50

PAPER_MACS_G = 2036.0  # MaSSFormer R50 at 4096 x 3072 (docs/design.md §1.6, fvcore MACs)
NUM_CLASSES = 7


def _deform_conv2d_flops(
    input_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    b, c_out, h, w = out_shape
    _, c_in_per_group, kh, kw = weight_shape
    return 2 * b * c_out * c_in_per_group * kh * kw * h * w


def count_macs(pixel_decoder: str, height: int, width: int) -> dict[str, Any]:
    """MACs (in G) of one ``model(images)`` forward, total and per component, on the meta device."""
    with torch.device("meta"):
        model = build_massformer_r50(NUM_CLASSES, pixel_decoder=pixel_decoder).eval()
        images = torch.empty(1, 3, height, width)
    counter = FlopCounterMode(
        display=False, depth=2, custom_mapping={torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops}
    )
    with counter:  # no torch.no_grad(): the module tracker needs autograd; on meta it costs nothing
        model(images)
    counts = counter.get_flop_counts()
    glob = counts["Global"]
    deform = sum(v for k, v in glob.items() if "deform_conv2d" in str(k))
    total = sum(glob.values())
    per_component = {
        name: round(sum(counts.get(f"MaSSFormer.{name}", {}).values()) / 2e9, 3)
        for name in ("backbone", "pixel_decoder", "transformer_decoder")
    }
    return {
        "macs_g": round(total / 2e9, 3),
        "macs_excluding_deform_g": round((total - deform) / 2e9, 3),
        "deform_conv_macs_g": round(deform / 2e9, 3),
        "per_component_g": per_component,
        "by_op_g": {str(k): round(v / 2e9, 3) for k, v in glob.items()},
    }


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def time_forward(height: int, width: int, repeats: int) -> dict[str, Any]:
    """Median eval forward time of both models at one input size, runs interleaved."""
    torch.manual_seed(0)
    models = {name: build_massformer_r50(NUM_CLASSES, pixel_decoder=name).eval() for name in ("hr", "fpn")}
    images = torch.rand(1, 3, height, width) * 255
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up (oneDNN primitive creation, allocator)
            model(images)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    hr, fpn = statistics.median(times["hr"]), statistics.median(times["fpn"])
    return {
        "input_hw": [height, width],
        "repeats": repeats,
        "massformer_s": round(hr, 3),
        "baseline_s": round(fpn, 3),
        "ratio_massformer_over_baseline": round(hr / fpn, 3),
        "all_runs_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def time_predict(height: int, width: int) -> dict[str, Any]:
    """Whole-image ``predict`` of MaSSFormer R50 (eval, CPU): time and peak resident memory."""
    torch.manual_seed(0)
    model = build_massformer_r50(NUM_CLASSES).eval()
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
        "--size", nargs=2, type=int, default=[768, 512], metavar=("H", "W"), help="timing input"
    )
    parser.add_argument("--macs-size", nargs=2, type=int, default=[4096, 3072], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--predict-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    mh, mw = args.macs_size
    hr = count_macs("hr", mh, mw)
    fpn = count_macs("fpn", mh, mw)
    result: dict[str, Any] = {
        "model": "massformer_r50",
        "num_classes": NUM_CLASSES,
        "macs": {
            "input_hw": [mh, mw],
            "massformer": hr,
            "baseline_fpn": fpn,
            "ratio_massformer_over_baseline": round(hr["macs_g"] / fpn["macs_g"], 3),
            "paper_macs_g": PAPER_MACS_G,
            "ratio_to_paper": round(hr["macs_g"] / PAPER_MACS_G, 3),
            "ratio_to_paper_excluding_deform": round(hr["macs_excluding_deform_g"] / PAPER_MACS_G, 3),
        },
        "timing": time_forward(args.size[0], args.size[1], args.repeats),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    if args.predict_size:
        result["predict"] = time_predict(args.predict_size[0], args.predict_size[1])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
