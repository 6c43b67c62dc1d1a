"""Benchmark: Grounded-SAM pseudo-labelling, a demo-style naive loop vs ``GroundedSamLabeler``.

Same images (PNG files on disk), same random weights, same thresholds and top-k cap for every variant:

- ``naive_rebuild``: what running ``grounded_sam_demo.py`` once per image and prompt costs: build
  GroundingDINO and SAM, read the image, one GroundingDINO pass for ``"<prompt>."``, ``set_image`` (the
  embedding is recomputed for every prompt), one ``SamPredictor.predict(box=...)`` per box, union of the
  masks.
- ``naive_loaded``: the same loop with the models built once (the fairest naive baseline).
- ``ours``: ``GroundedSamLabeler.label_many(paths, prompts)``: models built once, all prompts in one caption
  (``"car . bicycle ."``), one embedding per image, all boxes in one batched decoder call, images read on a
  prefetch thread.
- ``second_prompt``: a new prompt over the same images, without cache (``cold``) and with the SAM embedding
  cache filled by ``ours`` (``warm``).

Prints one JSON object. ``--rss-4k`` instead labels one 2160 x 3840 image and prints the peak RSS.

Examples::

    python bench/pseudo_label.py                          # vit_b, GD test config at 256 px, 2 images, 2
    prompts python bench/pseudo_label.py --sam tiny --images 6    # quick
    python bench/pseudo_label.py --dino swint_ogc --dino-size 800 --images 4   # the shipped GD layout (slow
    on CPU) python bench/pseudo_label.py --rss-4k                 # peak RSS for one 4K image (vit_b)
    python bench/pseudo_label.py --options-4k --sam tiny          # every labeler option: cost ratios, 4K
    python bench/pseudo_label.py --options-4k --options refine mask_models --repeats 1   # vit_b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addclass.models.labelers.embedding_cache import InMemoryEmbeddingCache
from addclass.models.labelers.grounded_sam import GroundedSamLabeler
from addclass.models.labelers.grounded_sam_ops import select_boxes
from addclass.models.labelers.grounded_sam_weights import build_dino
from addclass.models.labelers.sam_engines import SAM_VARIANTS, build_sam_model


def _vm_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is measured from here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _write_images(folder: Path, count: int, height: int, width: int, seed: int) -> list[Path]:
    """Smooth random images (bicubic-upsampled noise) saved as PNG."""
    import cv2
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = torch.from_numpy(rng.random((1, 3, 9, 12)).astype(np.float32))
        big = F.interpolate(small, (height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        rgb = (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return paths


class NaiveGroundedSam:
    """The Grounded-SAM demo's per-run procedure, one image and one prompt at a time."""

    def __init__(self, args: argparse.Namespace, *, dino: Any = None, sam: Any = None) -> None:
        from segment_anything import SamPredictor

        self.args = args
        self.dino = dino or build_dino(
            config=args.dino, checkpoint=None, device=torch.device("cpu"), seed=args.seed
        )
        self.sam = sam or build_sam_model(args.sam, checkpoint=None, seed=args.seed)
        self.predictor = SamPredictor(self.sam)

    @torch.no_grad()
    def label(self, path: Path, prompt: str) -> np.ndarray:
        import cv2
        import groundingdino.datasets.transforms as T
        from groundingdino.util.utils import get_phrases_from_posmap
        from PIL import Image
        from torchvision.ops import box_convert

        # load_image() of the demo: PIL, RandomResize([800], max_size=1333) (here --dino-size), ImageNet norm
        image_pil = Image.open(path).convert("RGB")
        image = np.asarray(image_pil)
        transform = T.Compose(
            [
                T.RandomResize([self.args.dino_size], max_size=1333),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        tensor, _ = transform(image_pil, None)
        caption = prompt.lower().strip() + "."
        out = self.dino(tensor[None], captions=[caption])
        logits = out["pred_logits"].sigmoid()[0]  # Q x 256
        boxes = out["pred_boxes"][0]  # Q x 4
        scores = logits.max(dim=1).values
        tokenized = self.dino.tokenizer(caption)
        height, width = image.shape[:2]
        xyxy = box_convert(boxes * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        keep = select_boxes(scores, xyxy, box_threshold=0.35, nms_iou=0.8, max_boxes=self.args.max_boxes)
        _ = [get_phrases_from_posmap(logits[q] > 0.25, tokenized, self.dino.tokenizer) for q in keep.tolist()]
        bgr = cv2.imread(str(path))
        if bgr is None:
            raise FileNotFoundError(f"Cannot read image {path}.")
        self.predictor.set_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        union = np.zeros((height, width), bool)
        for box in xyxy[keep].numpy():  # one predict per box (grounded_sam_simple_demo.py)
            masks, _, _ = self.predictor.predict(box=box, multimask_output=False)
            union |= masks[0]
        return union


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _timed_cpu(fn: Any) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result); CPU time is less sensitive to other load on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    height, width = (int(v) for v in args.size.split("x"))
    result: dict[str, Any] = {
        "config": {
            "sam": args.sam, "dino": args.dino, "dino_size": args.dino_size, "images": args.images,
            "image_size": [height, width], "prompts": prompts, "max_boxes": args.max_boxes,
            "threads": torch.get_num_threads(), "weights": f"random-{args.seed}",
        },
        "loadavg_start": list(os.getloadavg()),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_images(Path(tmp), args.images, height, width, args.seed)
        cache = InMemoryEmbeddingCache()
        build_s, labeler = _timed(
            lambda: GroundedSamLabeler(
                sam_variant=args.sam, dino_config=args.dino, random_weights=True, seed=args.seed,
                dino_image_size=args.dino_size, max_boxes=args.max_boxes, embedding_cache=cache,
            )
        )  # fmt: skip
        result["build_s"] = round(build_s, 2)
        n_labels = len(paths) * len(prompts)

        naive_unions: dict[tuple[int, str], np.ndarray] = {}

        def naive(rebuild: bool) -> None:
            shared = None if rebuild else NaiveGroundedSam(args, dino=labeler.dino, sam=labeler.sam)
            for i, path in enumerate(paths):
                for prompt in prompts:
                    runner = NaiveGroundedSam(args) if shared is None else shared
                    naive_unions[(i, prompt)] = runner.label(path, prompt)

        variants: dict[str, Callable[[], Any]] = {}
        if not args.skip_rebuild:
            variants["naive_rebuild"] = lambda: naive(True)
        variants["naive_loaded"] = lambda: naive(False)
        variants["ours"] = lambda: list(labeler.label_many(paths, prompts, prefetch=2))
        ours_records: list[Any] = []
        for name, fn in variants.items():
            seconds, cpu_seconds, out = _timed_cpu(fn)
            if name == "ours":
                ours_records = out
            result[name] = {
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2),
                "images_per_s": round(len(paths) / seconds, 4),
                "s_per_image_prompt": round(seconds / n_labels, 2),
            }
        for name in ("naive_rebuild", "naive_loaded"):
            if name in result:
                result[f"speedup_ours_vs_{name}"] = round(
                    result[name]["seconds"] / result["ours"]["seconds"], 2
                )
                result[f"cpu_speedup_ours_vs_{name}"] = round(
                    result[name]["cpu_seconds"] / result["ours"]["cpu_seconds"], 2
                )

        # (c) a new prompt over the same images: no cache vs the cache filled by "ours"
        new_prompt = args.second_prompt
        cold = labeler.with_options(embedding_cache=None)
        cold_s, cold_cpu, cold_records = _timed_cpu(
            lambda: [cold.label(p, new_prompt) for p in _read_all(paths)]
        )
        hits_before = cache.hits
        warm_s, warm_cpu, warm_records = _timed_cpu(
            lambda: [labeler.label(p, new_prompt) for p in _read_all(paths)]
        )
        result["second_prompt"] = {
            "prompt": new_prompt,
            "cold_s": round(cold_s, 2),
            "warm_s": round(warm_s, 2),
            "speedup": round(cold_s / warm_s, 2),
            "cpu_speedup": round(cold_cpu / warm_cpu, 2),
            "cache_hits": cache.hits - hits_before,
            "same_masks": all(
                np.array_equal(a.mask, b.mask) for a, b in zip(cold_records, warm_records, strict=True)
            ),
        }
        # sanity: the single-prompt labeler agrees with the demo loop (same boxes; batched vs per-box
        # decoding)
        images = _read_all(paths)
        agreement = [
            _iou(labeler.label(images[i], prompts[0]).mask, naive_unions[(i, prompts[0])])
            for i in range(len(paths))
        ]
        result["agreement_iou_ours_single_prompt_vs_naive"] = [round(a, 6) for a in agreement]
        result["ours_instances_per_prompt"] = {
            p: [r[p].num_instances for r in ours_records] for p in prompts
        }  # fmt: skip
    result["peak_rss_mb"] = round(_vm_kb("VmHWM") / 1024, 1)
    result["loadavg_end"] = list(os.getloadavg())
    return result


def _read_all(paths: list[Path]) -> list[np.ndarray]:
    from addclass.models.labelers.grounded_sam import load_image_rgb

    return [load_image_rgb(p) for p in paths]


def run_rss_4k(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of labelling one 2160 x 3840 image (random weights)."""
    labeler = GroundedSamLabeler(
        sam_variant=args.sam, dino_config=args.dino, random_weights=True, seed=args.seed,
        dino_image_size=args.dino_size, max_boxes=args.max_boxes,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat((rng.random((135, 240, 3)) * 255).astype(np.uint8), 16, axis=0), 16, axis=1)
    assert image.shape == (2160, 3840, 3)
    after_build = _vm_kb("VmHWM")
    _reset_peak_rss()
    baseline = _vm_kb("VmRSS")
    seconds, record = _timed(lambda: labeler.label(image, "car"))
    peak = _vm_kb("VmHWM")
    out: dict[str, Any] = {
        "image": [2160, 3840], "sam": args.sam, "dino": args.dino, "dino_size": args.dino_size,
        "boxes": record.num_instances, "seconds": round(seconds, 2),
        "rss_before_label_mb": round(baseline / 1024, 1), "peak_rss_during_label_mb": round(peak / 1024, 1),
        "peak_minus_before_mb": round((peak - baseline) / 1024, 1),
        "peak_rss_build_mb": round(after_build / 1024, 1),
        "instance_masks_mb": round(record.instance_masks.nbytes / 2**20, 1),
    }  # fmt: skip
    if args.naive_postprocess:
        # The mask stage, step by step: SAM's decoder for all boxes (resolution-independent) ...
        from addclass.models.labelers.grounded_sam_ops import upsample_mask_logits

        boxes_px = torch.from_numpy(record.boxes)
        del record
        _reset_peak_rss()
        baseline = _vm_kb("VmRSS")
        low_res, _ = labeler.segment_boxes(boxes_px)
        out["decoder_all_boxes_peak_minus_before_mb"] = round((_vm_kb("VmHWM") - baseline) / 1024, 1)
        # ... our upsampling (chunks of boxes, bool masks) ...
        _reset_peak_rss()
        baseline = _vm_kb("VmRSS")
        instances, union = upsample_mask_logits(
            low_res, input_size=labeler.engine.input_size(image.shape[:2]), original_size=image.shape[:2]
        )
        out["upsample_ours_peak_minus_before_mb"] = round((_vm_kb("VmHWM") - baseline) / 1024, 1)
        del instances, union
        # ... vs Sam.postprocess_masks + threshold, as predict_torch does: all boxes at once as float masks.
        _reset_peak_rss()
        baseline = _vm_kb("VmRSS")
        sam: Any = labeler.sam  # SAM's own postprocessing (the sam family)
        masks = sam.postprocess_masks(low_res, labeler.engine.input_size(image.shape[:2]), image.shape[:2]) > 0
        out["upsample_predict_torch_style_peak_minus_before_mb"] = round(
            (_vm_kb("VmHWM") - baseline) / 1024, 1
        )
        del masks
    return out


OPTIONS = ("tiles", "cleanup", "refine", "phrases", "negatives", "mask_models")


def run_options_4k(args: argparse.Namespace) -> dict[str, Any]:
    """The cost of the labeler's options on one 2160 x 3840 image (random weights), as ratios to the plain
    path measured in the same run (``--options``): detection tiles (``--tile-size``), mask clean-up
    (``--min-region-area``), per-box refinement (one encoder pass per refined box), three phrases for the class
    (``"car . van . truck"``), a negative phrase, and the other mask models (``--mask-models``, each with the
    same GroundingDINO). Each variant labels the image once to warm up, then ``--repeats`` times (the median
    counts); the embedding is not cached, so every call pays the image encoder."""
    base = GroundedSamLabeler(
        sam_variant=args.sam, dino_config=args.dino, random_weights=True, seed=args.seed,
        dino_image_size=args.dino_size, max_boxes=args.max_boxes, box_threshold=args.box_threshold,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat((rng.random((135, 240, 3)) * 255).astype(np.uint8), 16, axis=0), 16, axis=1)
    variants: dict[str, tuple[GroundedSamLabeler, str]] = {"plain": (base, "car")}
    if "tiles" in args.options:
        variants[f"tiles_{args.tile_size}"] = (
            base.with_options(tile_size=args.tile_size, tile_overlap=args.tile_overlap), "car")
    if "cleanup" in args.options:
        variants[f"min_region_area_{args.min_region_area}"] = (
            base.with_options(min_region_area=args.min_region_area), "car")
    if "refine" in args.options:
        # Random-weight boxes are mostly large (nothing to refine): both rows get the same car-sized boxes.
        def car_boxes(image: np.ndarray, phrases: Any) -> list[dict[str, Any]]:
            xs = np.linspace(100, 3300, args.max_boxes)
            boxes = torch.tensor([[x, 1500, x + 400, 1750] for x in xs], dtype=torch.float32)
            return [{"boxes": boxes, "scores": torch.full((len(xs),), 0.5), "phrases": ["car"] * len(xs)}
                    for _ in phrases]

        for refine in (False, True):
            fixed = base.with_options(refine=refine)
            fixed.detect = car_boxes  # type: ignore[method-assign,assignment]
            variants[f"{'refine' if refine else 'plain'}_car_boxes_400x250"] = (fixed, "car")
    if "phrases" in args.options:
        variants["phrases_car_van_truck"] = (base, "car . van . truck")
    if "negatives" in args.options:
        variants["negative_toy_car"] = (base.with_options(negative_phrases=("toy car",)), "car")
    if "mask_models" in args.options:
        for name in args.mask_models:
            other = GroundedSamLabeler(
                sam_variant=name, dino_config=args.dino, random_weights=True, seed=args.seed,
                dino_image_size=args.dino_size, max_boxes=args.max_boxes, box_threshold=args.box_threshold,
            )  # fmt: skip
            other.dino = base.dino  # the same detector weights: only the mask model differs
            variants[f"mask_model_{name}"] = (other, "car")
    out: dict[str, Any] = {"image": [2160, 3840], "sam": args.sam, "dino": args.dino, "dino_size": args.dino_size,
                           "box_threshold": args.box_threshold, "max_boxes": args.max_boxes,
                           "repeats": args.repeats, "variants": {}}
    for name, (labeler, prompt) in variants.items():
        labeler.label(image, prompt)  # warm-up
        _reset_peak_rss()
        times, boxes, refined = [], 0, 0
        for _ in range(args.repeats):
            seconds, record = _timed(lambda labeler=labeler, prompt=prompt: labeler.label(image, prompt))
            times.append(seconds)
            boxes, refined = record.num_instances, int(sum(record.extra.get("refined", [])))
        out["variants"][name] = {"seconds": round(float(np.median(times)), 2), "boxes": boxes, "refined": refined,
                                 "peak_rss_mb": round(_vm_kb("VmHWM") / 1024, 1)}
    plain = out["variants"]["plain"]
    for v in out["variants"].values():
        v["time_ratio_to_plain"] = round(v["seconds"] / plain["seconds"], 2)
        v["peak_rss_ratio_to_plain"] = round(v["peak_rss_mb"] / plain["peak_rss_mb"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sam", default="vit_b", choices=list(SAM_VARIANTS))
    parser.add_argument("--dino", default="test", choices=["test", "swint_ogc", "swinb"])
    parser.add_argument(
        "--dino-size", type=int, default=256, help="GroundingDINO input short side (reference 800)"
    )
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", default="480x640", help="HxW of the benchmark images")
    parser.add_argument("--prompts", default="car,bicycle")
    parser.add_argument("--second-prompt", default="person")
    parser.add_argument("--max-boxes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--skip-rebuild", action="store_true", help="skip the naive loop that rebuilds the models"
    )
    parser.add_argument("--rss-4k", action="store_true", help="only measure peak RSS on one 2160x3840 image")
    parser.add_argument(
        "--naive-postprocess", action="store_true", help="with --rss-4k: also predict_torch at once"
    )
    parser.add_argument("--options-4k", action="store_true",
                        help="only the cost of --tile-size and --min-region-area on one 2160x3840 image, as ratios")
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS),
                        help="with --options-4k: which options to measure against the plain path")
    parser.add_argument("--mask-models", nargs="+", default=["hq_vit_b", "sam2.1_hiera_t"],
                        choices=list(SAM_VARIANTS), help="with --options mask_models")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--tile-overlap", type=int, default=128)
    parser.add_argument("--min-region-area", type=int, default=100)
    parser.add_argument("--box-threshold", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.options_4k:
        if args.dino_size == 256:
            args.dino_size = 800
        print(json.dumps(run_options_4k(args), indent=1))
    elif args.rss_4k:
        if args.max_boxes == 5:
            args.max_boxes = 20
        if args.dino_size == 256:
            args.dino_size = 800
        print(json.dumps(run_rss_4k(args), indent=1))
    else:
        print(json.dumps(run_benchmark(args), indent=1))


if __name__ == "__main__":
    main()
