"""Benchmark: ``models.metrics.image_counts`` against a straightforward per-class cv2 implementation.

Both run in the same process on the same synthetic pairs (default one 2160 x 3840 pair, 8 classes, with curved
region boundaries, thin poles, small objects and a void region), alternating, and must give identical counts.

The anchor is the upstream style (docs/design.md §4.6): per class, boolean masks; mIoU by sums; BIoU with
MaSS13K's ``mask_to_boundary`` (zero pad + ``cv2.erode`` 3 x 3, d iterations); BF1 with DAVIS ``seg2bmap`` and
``cv2.dilate`` with ``disk(2)``.

Usage:
    python bench/metrics.py [--height 2160 --width 3840 --classes 8 --pairs 1 --repeats 5]

Prints one JSON object: seconds per pair (min / median) for both, the speed-up, whether every count is
identical, the scores, and the fast path's peak numpy/cv2 allocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import cv2
import numpy as np

from addclass.models.metrics import COUNT_KEYS, boundary_width, image_counts, metrics_from_counts

# ------------------------------------------------------------------------------------------------
# Anchor: the straightforward per-class implementation
# ------------------------------------------------------------------------------------------------

DISK2 = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0],
    ],
    dtype=np.uint8,
)  # skimage.morphology.disk(2)


def _mask_to_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """MaSS13K / boundary-iou-api ``mask_to_boundary`` (uint8 0/1)."""
    h, w = mask.shape
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def _seg2bmap(seg: np.ndarray) -> np.ndarray:
    """davis2017-evaluation ``_seg2bmap`` (same-size case)."""
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b: np.ndarray = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def anchor_counts(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255
) -> dict[str, np.ndarray]:
    """Per-class loop with cv2 morphology; the same counts as ``image_counts``."""
    h, w = gt.shape
    d = max(1, int(round(0.001 * np.sqrt(h**2 + w**2))))  # noqa: RUF046 (MaSS13K verbatim)
    valid = gt != ignore_index
    out = {k: np.zeros(num_classes, dtype=np.int64) for k in COUNT_KEYS}
    for c in range(num_classes):
        p = pred == c
        g = gt == c
        inter = int(np.count_nonzero(p & g & valid))
        ap = int(np.count_nonzero(p & valid))
        ag = int(np.count_nonzero(g & valid))
        out["area_intersect"][c] = inter
        out["area_pred_label"][c] = ap
        out["area_label"][c] = ag
        out["area_union"][c] = ap + ag - inter
        bp = _mask_to_boundary(p.astype(np.uint8), d)
        bg = _mask_to_boundary(g.astype(np.uint8), d)
        out["biou_intersect"][c] = int((bp * bg).sum())
        out["biou_union"][c] = int(((bp + bg) > 0).sum())
        fb = _seg2bmap(p & valid)
        gb = _seg2bmap(g)
        fd = cv2.dilate(fb.astype(np.uint8), DISK2) > 0
        gd = cv2.dilate(gb.astype(np.uint8), DISK2) > 0
        out["bf_pred_match"][c] = int(np.count_nonzero(fb & gd))
        out["bf_pred_total"][c] = int(np.count_nonzero(fb))
        out["bf_gt_match"][c] = int(np.count_nonzero(gb & fd))
        out["bf_gt_total"][c] = int(np.count_nonzero(gb))
    return out


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------


def synthetic_pair(h: int, w: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A gt with curved regions, poles, small objects and void; a prediction with displaced boundaries."""
    rng = np.random.default_rng(seed)
    hh, ww = h // 2, w // 2
    coarse = rng.normal(size=(num_classes, 9, 16)).astype(np.float32)
    wobble = rng.normal(size=(num_classes, 36, 64)).astype(np.float32)

    def regions(noise: float) -> np.ndarray:
        best = np.full((hh, ww), -np.inf, dtype=np.float32)
        labels = np.zeros((hh, ww), dtype=np.uint8)
        for c in range(num_classes):
            field = cv2.resize(coarse[c], (ww, hh), interpolation=cv2.INTER_CUBIC)
            field += noise * cv2.resize(wobble[c], (ww, hh), interpolation=cv2.INTER_CUBIC)
            better = field > best
            best[better] = field[better]
            labels[better] = c
        return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)

    gt = regions(0.05)
    pred = regions(0.25)
    for _ in range(40):  # poles: 1-3 px wide vertical lines, slightly shifted in the prediction
        x, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h // 2))
        width, c = int(rng.integers(1, 4)), int(rng.integers(0, num_classes))
        y1 = y0 + int(rng.integers(h // 8, h // 2))
        gt[y0:y1, x : x + width] = c
        dx = int(rng.integers(-2, 3))
        pred[y0:y1, max(0, x + dx) : x + dx + width] = c
    for _ in range(300):  # small objects, some missed or hallucinated
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        sy, sx, c = int(rng.integers(3, 40)), int(rng.integers(3, 40)), int(rng.integers(0, num_classes))
        if rng.random() < 0.8:
            gt[y : y + sy, x : x + sx] = c
        if rng.random() < 0.8:
            pred[y + 1 : y + sy + 1, x : x + sx] = c
    for _ in range(5):  # void regions in the gt
        y, x = int(rng.integers(0, h - 200)), int(rng.integers(0, w - 300))
        cv2.ellipse(gt, (x + 150, y + 100), (150, 80), 0, 0, 360, 255, -1)
    return pred, gt


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _stats(times: list[float]) -> dict[str, float]:
    return {"min": round(min(times), 4), "median": round(statistics.median(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=2160)
    parser.add_argument("--width", type=int, default=3840)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pairs = [synthetic_pair(args.height, args.width, args.classes, args.seed + i) for i in range(args.pairs)]
    fast_t: list[float] = []
    anchor_t: list[float] = []
    identical = True
    fast_total = {k: np.zeros(args.classes, dtype=np.int64) for k in COUNT_KEYS}
    image_counts(*pairs[0], num_classes=args.classes)  # warm-up (imports, first-call allocations)
    for _ in range(args.repeats):
        for pred, gt in pairs:
            t0 = time.perf_counter()
            fast = image_counts(pred, gt, num_classes=args.classes)
            t1 = time.perf_counter()
            anchor = anchor_counts(pred, gt, args.classes)
            t2 = time.perf_counter()
            fast_t.append(t1 - t0)
            anchor_t.append(t2 - t1)
            identical &= all(np.array_equal(fast[k], anchor[k]) for k in COUNT_KEYS)
    for pred, gt in pairs:
        counts = image_counts(pred, gt, num_classes=args.classes)
        for k in COUNT_KEYS:
            fast_total[k] += counts[k]

    tracemalloc.start()
    image_counts(*pairs[0], num_classes=args.classes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    scores = metrics_from_counts(fast_total)
    fast_s, anchor_s = _stats(fast_t), _stats(anchor_t)
    print(
        json.dumps(
            {
                "shape": [args.height, args.width],
                "num_classes": args.classes,
                "biou_d": boundary_width(args.height, args.width),
                "pairs": args.pairs,
                "repeats": args.repeats,
                "fast_s_per_pair": fast_s,
                "anchor_s_per_pair": anchor_s,
                "speedup_min": round(anchor_s["min"] / fast_s["min"], 2),
                "speedup_median": round(anchor_s["median"] / fast_s["median"], 2),
                "values_identical": bool(identical),
                "miou": round(scores["miou"], 6),
                "mbiou": round(scores["mbiou"], 6),
                "mbf1": round(scores["mbf1"], 6),
                "fast_peak_alloc_mb": round(peak / 2**20, 1),
                "input_mb": round((pairs[0][0].nbytes + pairs[0][1].nbytes) / 2**20, 1),
                "cv2_threads": cv2.getNumThreads(),
            }
        )
    )


if __name__ == "__main__":
    main()
