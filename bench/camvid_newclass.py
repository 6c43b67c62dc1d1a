"""The new-class experiment on real hand labels (issue #9): CamVid "car" learnt from pseudo labels.

MaSS13K (Tab. 3) claims that a model trained on precise labels + pseudo labels of a new class ("car") with
inverse edge reweighting segments that class better than the pseudo labels themselves, while mixing without
reweighting hurts. This script reproduces the *shape* of that experiment on CamVid, whose hand labels give
an exact car mask for every frame:

1. **Ingest** CamVid (`tasks.data.ingest.ingest_camvid`): car is hidden inside "others" (0) of the 7 precise
   classes; the car hand masks go to ``reference/car`` (train, val) and ``eval/car`` (test). val is the tail
   of the train sequence (``--val-fraction``), so nothing is tuned on test.
2. **Pseudo-label** "car" on train and val (`tasks.labels.pseudo_label`). The default ``simulated`` labeler
   degrades the hand masks like Grounded-SAM (`models.labelers.simulated_labeler`); it needs the hand masks,
   so it never runs on test. ``--labeler grounded-sam`` runs the real detector + SAM (weights from
   ``--sam-checkpoint`` / ``--dino-checkpoint`` or their environment variables) on train, val **and** test.
3. **Merge** (`tasks.labels.merge`, ``carve-others``): car is written only where the precise label is "others", so
   the precise classes keep their own boundaries. This is the *mixed* label version.
4. **Pseudo-only** label version (built here with the store's draft/publish API): the model sees the
   pseudo masks alone, i.e. car where the (raw, uncarved) pseudo mask is set and "others" everywhere else; no
   precise class and no ignore pixel. It has the same 8 class ids as the mixed version, so the same model and
   evaluation apply, but only ids 0 and 7 occur in its training labels; its 7-class mIoU is therefore only a
   sanity number (it can only predict "others"). It trains without reweighting (the plain baseline).
5. **Train** one ``massformer_tiny`` per row, sequentially, from the same store, seed, initialisation and data
   order (`tasks.training.train`), and **evaluate** it (`tasks.evaluation.evaluate.evaluate_model`) on val and test: car
   class-vs-rest against the hand masks (IoU, BIoU, BF1) and the 7-class mIoU against v1 (car folded into
   "others").

Rows (``--rows``, ids in brackets):

- Pseudo Label [``pseudo_label``]: the stored pseudo masks against the hand masks (`evaluate_pseudo`); on
  train and val (and test with a real labeler). The like-for-like comparison with the models is on **val**.
- Merged label [``merged_label``, diagnostic]: the car pixels of the mixed version against the hand masks:
  what carving the pseudo masks into "others" already fixes before any training (and ``outline``: what the
  car outline borders on; next to a precise class it is a precise boundary).
- Pseudo only [``pseudo_only``]; Mixed, no reweight [``mixed_none``]; Mixed + edge reweight [``mixed_edge``,
  ``1 + 5W`` for every class]; Mixed + inverse reweight [``mixed_inverse``, docs/design.md §2.8: ``1 - W`` on
  car masks and on the 2-px band of precise masks next to car]; Mixed + inverse w/o band
  [``mixed_inverse_noband``]; Mixed + inverse, top 10 % reviewed [``mixed_inverse_reviewed``: the mixed version
  after a person reviewed the 10 % of train images the labeler was least sure of (lowest detection score):
  their car hand masks replace the pseudo masks inside "others" with provenance ``reviewed``, as ``addclass
  review import`` writes them, and training gives them the precise classes' edge weights].

Outputs in ``--out`` (default ``runs/camvid_newclass``): ``results.md`` (the table), ``results.json`` (every
number, the settings, the per-row wall times and the machine), ``store/`` (the label store) and
``runs/<row>/`` (each training run and its ``eval.json``). A rerun with the same data settings reuses the
store; each row retrains unless ``--reuse-runs`` finds its finished run with the same training settings.

Defaults (CPU, 2 cores, <= 60 min): the add-class use case. A 7-class ``tiny`` model is trained from scratch
on the precise labels (v1, edge reweight, ``DEFAULT_BASE_ITERS`` steps: the "Base" row, the user's existing
model), and every model row fine-tunes it for ``DEFAULT_ITERS`` steps (`TrainConfig.init_model`: all weights
kept, the car row of the class head starts untrained). ``--base-iters 0`` trains every row from scratch
instead; ``--base-model DIR`` fine-tunes a given model (e.g. the base of an earlier run, for more seeds).
256 x 256 crops, batch 2, lr 1e-3, scale 0.75-1.5, 4096 points, 2 threads with ``OMP_WAIT_POLICY=PASSIVE``.
Measured on the 2-core machine at load 1-1.7 (short test runs beside it): 39.5 min in all (base 13.6 min at
~0.66 s per step; each model row 4-5 min including ~20 s to evaluate 60 images). A full run on a GPU
(``GPU_EXAMPLE``) uses the Lite model with an ImageNet ResNet-18, 512 crops, batch 8, a 10k-step base and 10k
steps per row (not run yet: no GPU was available when this was written). Under heavy sharing (load ~5)
OpenMP's default (active) waiting made a step 4-25 s instead of ~1 s; passive waiting fixes it.

Examples::

    .venv/bin/python bench/camvid_newclass.py                      # the full CPU experiment
    .venv/bin/python bench/camvid_newclass.py --quick              # ~3-minute smoke run
    .venv/bin/python bench/camvid_newclass.py --rows pseudo_label,mixed_none,mixed_inverse --iters 100
    # investigation: val only (never tune on test), another training seed on the same pseudo labels
    .venv/bin/python bench/camvid_newclass.py --out runs/s1 --rows mixed_inverse --splits val --seed 1 \\
        --labeler-seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# A shared CPU: OpenMP threads that busy-wait for each other while other processes hold the cores made a
# training step 5-20x slower (measured: 4-25 s instead of 1.3 s per step with 2 threads); passive waiting
# fixes it. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from addclass.models.metrics import binary_counts, class_vs_rest, metrics_from_counts  # noqa: E402
from addclass.models.training.optim import RECIPE_CHOICES  # noqa: E402
from addclass.storage.pseudo import read_pseudo_mask  # noqa: E402
from addclass.storage.registry import PROV_PRECISE, PROV_PSEUDO  # noqa: E402
from addclass.storage.store import LabelStore, open_label_store  # noqa: E402
from addclass.tasks.data.ingest import ingest_camvid  # noqa: E402
from addclass.tasks.evaluation.evaluate import evaluate_model, evaluate_pseudo, hand_mask_kinds  # noqa: E402
from addclass.tasks.evaluation.evaluation_results import ClassResult, ModelEvaluation  # noqa: E402
from addclass.tasks.evaluation.report import format_fraction, format_percent  # noqa: E402
from addclass.tasks.labels.merge import merge  # noqa: E402
from addclass.tasks.labels.pseudo_label import LabelerConfig, pseudo_label, validate_labeler  # noqa: E402
from addclass.tasks.labels.review import rank_images, reviewed_labels  # noqa: E402
from addclass.tasks.training.train import TrainConfig, train  # noqa: E402
from addclass.tasks.training.validation import read_log  # noqa: E402

CLASS = "car"
DEFAULT_CAMVID = REPO.parent / "shared" / "data" / "camvid"
DEFAULT_OUT = REPO / "runs" / "camvid_newclass"
DEFAULT_ITERS = 400
DEFAULT_BASE_ITERS = 1200
# The simulated labeler's degradations (models.labelers.simulated_labeler). SAM predicts 256 x 256 logits for
# its 1024 input: at MaSS13K's ~4000 px images a logit cell is ~16 px, about 3x the 5 px BIoU band. At
# CamVid's 480 px the same relative coarseness is a grid of ~128 cells (3.75 px cells against a 1 px band).
# Instances bleed 3 px with probability 0.5. On train/val this gives pseudo labels of car IoU ~86 % and BIoU
# ~20 %, close to the paper's pseudo-label row (BIoU 20.44).
SIMULATED_DEFAULTS: dict[str, Any] = {"low_res": 128, "bleed_prob": 0.5, "bleed_px": 3, "miss_prob": 0.05,
                                      "min_area_frac": 3e-4}
GPU_EXAMPLE = ("bench/camvid_newclass.py --device cuda --variant lite_r18 --backbone-checkpoint "
               "resnet18-f37072fd.pth --crop 512 --batch-size 8 --base-iters 10000 --iters 10000 --lr 3e-4 "
               "--scale 0.5 2.0 --num-points 12544 --threads 8 --num-workers 4")


@dataclass(frozen=True)
class Row:
    """One row of the table: the pseudo labels themselves, or a model trained on a label version."""

    id: str
    name: str
    kind: str  # "pseudo" (stored pseudo masks), "merged" (car pixels of the mixed version), "train"
    version: str | None = None  # "mixed" or "pseudo_only" for kind "train"
    reweight: str = "none"
    inverse_weight_near_pseudo: bool = True


ROWS: dict[str, Row] = {r.id: r for r in (
    Row("pseudo_label", "Pseudo Label", "pseudo"),
    Row("merged_label", "Merged label (carve-others)", "merged"),
    Row("pseudo_only", "Pseudo only (no precise labels)", "train", "pseudo_only", "none"),
    Row("mixed_none", "Mixed, no reweight", "train", "mixed", "none"),
    Row("mixed_edge", "Mixed + edge reweight", "train", "mixed", "edge"),
    Row("mixed_inverse", "Mixed + inverse reweight", "train", "mixed", "inverse", True),
    Row("mixed_inverse_noband", "Mixed + inverse w/o band", "train", "mixed", "inverse", False),
    Row("mixed_inverse_reviewed", "Mixed + inverse, top 10 % reviewed", "train", "reviewed", "inverse", True),
    Row("hand_car", "Hand-labelled car (oracle)", "train", "hand_car", "none"),
)}
REVIEW_SHARE = 0.1  # of the train images, the labeler's least sure first (`tasks.labels.review.rank_images`, by score)


# ----------------------------------------------------------------------------------------------------------
# Data: ingest, pseudo labels, merge, the pseudo-only version
# ----------------------------------------------------------------------------------------------------------


def prepare_camvid(
    src: Path, dst: Path, *, max_train: int | None, max_test: int | None, downscale: int
) -> Path:
    """The CamVid folder to ingest: the first ``max_train`` train and ``max_test`` test frames, optionally
    downscaled by an integer factor (images: area averaging; hand labels: nearest neighbour). ``src`` itself
    when nothing changes; otherwise a folder of symlinks (no downscale) or of resized PNGs."""
    if max_train is None and max_test is None and downscale == 1:
        return src
    shutil.rmtree(dst, ignore_errors=True)
    for split, limit in (("train", max_train), ("test", max_test)):
        files = sorted(p for p in (src / split).iterdir() if p.suffix.lower() == ".png")[:limit]
        for folder in (split, f"{split}annot"):
            (dst / folder).mkdir(parents=True)
            for f in files:
                target = dst / folder / f.name
                if downscale == 1:
                    target.symlink_to((src / folder / f.name).resolve())
                    continue
                annot = folder.endswith("annot")
                flag = cv2.IMREAD_UNCHANGED if annot else cv2.IMREAD_COLOR
                img = cv2.imread(str(src / folder / f.name), flag)
                if img is None:
                    raise FileNotFoundError(f"Cannot read {src / folder / f.name}.")
                size = (img.shape[1] // downscale, img.shape[0] // downscale)
                small = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if annot else cv2.INTER_AREA)
                if not cv2.imwrite(str(target), small):
                    raise OSError(f"Cannot write {target}.")
    return dst


def simulated_defaults(downscale: int) -> dict[str, Any]:
    """`SIMULATED_DEFAULTS` (set for CamVid's native 360 x 480) with its pixel sizes scaled to the input."""
    d = dict(SIMULATED_DEFAULTS)
    d["low_res"] = max(1, round(d["low_res"] / downscale))
    d["bleed_px"] = max(1, round(d["bleed_px"] / downscale))
    return d


def labeler_config(args: argparse.Namespace) -> LabelerConfig:
    if args.labeler == "simulated":
        given = {"low_res": args.sim_low_res, "bleed_prob": args.sim_bleed_prob,
                 "bleed_px": args.sim_bleed_px, "miss_prob": args.sim_miss_prob,
                 "min_area_frac": args.sim_min_area_frac}
        sim = {**simulated_defaults(args.downscale), **{k: v for k, v in given.items() if v is not None}}
        return LabelerConfig(kind="simulated", seed=args.labeler_seed, simulated=sim)
    return LabelerConfig(kind="grounded-sam", sam_variant=args.sam_variant,
                         sam_checkpoint=args.sam_checkpoint, dino_config=args.dino_config,
                         dino_checkpoint=args.dino_checkpoint,
                         device=args.labeler_device, box_threshold=args.box_threshold,
                         text_threshold=args.text_threshold, seed=args.labeler_seed,
                         random_weights=args.random_weights)


Relabel = Callable[[LabelStore, str, str, int], tuple[np.ndarray, np.ndarray]]


def publish_derived_version(store_path: Path, *, parent: str, policy: str, relabel: Relabel) -> str:
    """Publish a version with the class ids of ``parent`` plus car, whose (labels, provenance) per image are
    ``relabel(store, split, image_id, car_id)``; drafted, written and published under the store lock."""
    store = open_label_store(store_path, mode="a")
    with store.lock(purpose=f"bench: {policy} version of {CLASS}"):
        car = store.class_by_name(CLASS).id
        version = store.next_version_name()
        class_ids = sorted(set(store.versions()[parent].class_ids) | {car})
        store.begin_version(version, parent=parent, class_ids=class_ids, policy=policy,
                            spec={"bench": "camvid_newclass", policy: CLASS})
        for split in store.splits():
            for image_id in store.image_ids(split):
                labels, prov = relabel(store, split, image_id, car)
                store.write_version_labels(version, split, image_id, labels, prov)
        store.publish_version(version)
    return version


def build_pseudo_only_version(store_path: Path, *, parent: str) -> str:
    """Publish a version whose labels are the raw pseudo masks alone: car (its id) / others (0).

    Splits without pseudo labels (test, with the simulated labeler) keep the parent's labels and provenance;
    they are never trained on.
    """

    def relabel(store: LabelStore, split: str, image_id: str, car: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            pseudo = read_pseudo_mask(store, CLASS, split, image_id)
        except KeyError:
            return store.read_labels_and_provenance(split, image_id, version=parent)
        return (np.where(pseudo, car, 0).astype(np.uint8),
                np.where(pseudo, PROV_PSEUDO, PROV_PRECISE).astype(np.uint8))

    return publish_derived_version(store_path, parent=parent, policy="pseudo-only", relabel=relabel)


def build_hand_car_version(store_path: Path, *, parent: str) -> str:
    """Publish the oracle version: the car *hand* masks carved into "others" of ``parent`` (train and val;
    test keeps the parent's labels and is never trained on). Same class ids as the mixed version, so a model
    trained on it shows what the model and schedule reach with perfect car labels."""

    st = open_label_store(store_path)
    reference = {split: set(st.hand_mask_ids("reference", CLASS, split)) for split in st.splits()}

    def relabel(store: LabelStore, split: str, image_id: str, car: int) -> tuple[np.ndarray, np.ndarray]:
        labels, prov = store.read_labels_and_provenance(split, image_id, version=parent)
        if image_id in reference[split]:
            hand = store.read_hand_mask("reference", CLASS, image_id).astype(bool)
            labels = np.where(hand & (labels == 0), car, labels).astype(np.uint8)
        return labels, prov

    return publish_derived_version(store_path, parent=parent, policy="hand-car", relabel=relabel)


def build_reviewed_version(store_path: Path, *, parent: str, share: float = REVIEW_SHARE) -> str:
    """Publish the mixed version after a person reviewed the ``share`` of the train images the labeler was
    least sure of (`tasks.labels.review.rank_images`, by score): on those, the car hand mask replaces the pseudo mask
    inside "others" with provenance ``reviewed`` (`tasks.labels.review.reviewed_labels`, as ``addclass review import``
    writes it); every other image keeps ``parent``'s labels."""
    st = open_label_store(store_path)
    ranked = rank_images(st, CLASS, version=parent, by="score", splits=("train",))
    chosen = {image_id for _, image_id, _ in ranked[:max(1, math.ceil(share * len(ranked)))]}

    def relabel(store: LabelStore, split: str, image_id: str, car: int) -> tuple[np.ndarray, np.ndarray]:
        labels, prov = store.read_labels_and_provenance(split, image_id, version=parent)
        if split != "train" or image_id not in chosen:
            return labels, prov
        hand = store.read_hand_mask("reference", CLASS, image_id).astype(bool)
        return reviewed_labels(store.read_labels(split, image_id, version="v1"), labels, prov, hand, car)

    return publish_derived_version(store_path, parent=parent, policy="reviewed", relabel=relabel)


def prepare_store(args: argparse.Namespace, out: Path, labeler: LabelerConfig) -> dict[str, Any]:
    """Ingest, pseudo-label, merge and build the pseudo-only version; reused when the data settings match."""
    data_settings = {
        "camvid": str(Path(args.camvid).resolve()), "val_fraction": args.val_fraction,
        "max_train": args.max_train, "max_test": args.max_test, "downscale": args.downscale,
        "labeler": labeler.to_dict(),
    }
    store = out / "store"
    marker = out / "store_settings.json"
    if store.exists() and marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("data") == data_settings:
            print(f"reusing the label store {store} (same data settings)", flush=True)
            if "reviewed" not in saved["versions"]:  # a store made before the reviewed row
                saved["versions"]["reviewed"] = build_reviewed_version(store, parent=saved["versions"]["mixed"])
                marker.write_text(json.dumps(saved, indent=2) + "\n")
            return saved
    validate_labeler(labeler)  # a missing checkpoint fails here, before the old store is removed
    shutil.rmtree(store, ignore_errors=True)
    marker.unlink(missing_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    src = prepare_camvid(Path(args.camvid), out / "camvid_input", max_train=args.max_train,
                         max_test=args.max_test, downscale=args.downscale)
    ingest_camvid(src, store, val_fraction=args.val_fraction, progress=args.progress)
    times["ingest_s"] = time.perf_counter() - t
    splits = ["train", "val"] + (["test"] if labeler.kind != "simulated" else [])
    t = time.perf_counter()
    for split in splits:
        if split in open_label_store(store).splits():
            pseudo_label(store, prompt=CLASS, split=split, labeler=labeler, batch_size=8,
                         progress=args.progress)
    times["pseudo_label_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mixed = merge(store, classes=CLASS, parent="v1", policy="carve-others", allow_partial=True,
                  progress=args.progress)
    pseudo_only = build_pseudo_only_version(store, parent=mixed)
    hand_car = build_hand_car_version(store, parent="v1")
    reviewed = build_reviewed_version(store, parent=mixed)
    times["merge_s"] = time.perf_counter() - t
    st = open_label_store(store)
    info = {
        "data": data_settings,
        "store": str(store),
        "versions": {"mixed": mixed, "pseudo_only": pseudo_only, "hand_car": hand_car, "reviewed": reviewed},
        "images": {s: len(st.image_ids(s)) for s in st.splits()},
        "pseudo_labelled_splits": splits,
        "times": {k: round(v, 2) for k, v in times.items()},
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def car_scores(result: ClassResult | None) -> dict[str, float | None] | None:
    """The car numbers of a class-vs-rest result (``evaluate_model`` / ``evaluate_pseudo``)."""
    if result is None:
        return None
    out: dict[str, Any] = {"iou": _finite(result.iou), "biou": _finite(result.biou), "bf1": _finite(result.bf1)}
    out |= {k: _finite(v) for k, v in result.binary.items()}
    out["num_images"] = result.summary.num_images
    return out


def outline_neighbours(labels: np.ndarray, class_id: int) -> dict[str, int]:
    """Pixels of the 1-px outer ring of a class (8-neighbourhood) by what they are: a precise class 1..6,
    "others" (0) or ignore (255). After carve-others, the ring next to a precise class is a precise
    boundary; next to others or ignore it is the pseudo mask's own boundary."""
    mask = (labels == class_id).astype(np.uint8)
    ring = (cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0) & (mask == 0)
    around = labels[ring]
    return {"precise": int(((around >= 1) & (around < class_id)).sum()), "others": int((around == 0).sum()),
            "ignore": int((around == 255).sum())}


def merged_label_scores(store_path: Path, version: str) -> dict[str, Any]:
    """The car pixels of the merged version against the hand masks, per split with pseudo labels, and what
    their outline borders on (``outline``: ring pixel counts, ``outline_precise_frac``)."""
    store = open_label_store(store_path)
    car = store.class_by_name(CLASS).id
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        if split not in store.splits():
            continue
        kinds = hand_mask_kinds(store, CLASS, split)
        has_car = False
        total: dict[str, np.ndarray] | None = None
        ring = {"precise": 0, "others": 0, "ignore": 0}
        for image_id in store.image_ids(split):
            if image_id not in kinds:
                continue
            labels = store.read_labels(split, image_id, version=version)
            has_car |= bool((labels == car).any())
            for k, v in outline_neighbours(labels, car).items():
                ring[k] += v
            hand = store.read_hand_mask(kinds[image_id], CLASS, image_id)  # type: ignore[arg-type]
            c = binary_counts(labels == car, hand)
            total = c if total is None else {k: total[k] + c[k] for k in total}
        if total is not None and has_car:  # a split without pseudo labels keeps v1: no car pixel at all
            s = class_vs_rest(metrics_from_counts(total))
            out[split] = {**{k: _finite(v) for k, v in s.items()}, "num_images": len(kinds), "outline": ring,
                          "outline_precise_frac": round(ring["precise"] / max(1, sum(ring.values())), 4)}
    return out


def model_scores(result: ModelEvaluation) -> dict[str, Any]:
    """Car class-vs-rest and the 7-class means per split of an ``evaluate_model`` result."""
    out = {}
    for split, r in result.splits.items():
        out[split] = {
            "car": car_scores(r.new_classes.get(CLASS)),
            "miou7": _finite(r.precise.miou),
            "mbiou7": _finite(r.precise.means.get("mbiou")),
            "num_images": r.num_images,
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def train_config(
    args: argparse.Namespace, row: Row, store: Path, version: str, out_dir: Path, *, init_model: str | None = None
) -> TrainConfig:
    return TrainConfig(
        store=str(store), out_dir=str(out_dir), version=version, variant=args.variant, iters=args.iters,
        batch_size=args.batch_size, crop_size=(args.crop, args.crop), scale_range=tuple(args.scale),
        recipe=args.recipe, lr=args.lr, test_scale=args.test_scale,
        reweight=row.reweight, inverse_weight_near_pseudo=row.inverse_weight_near_pseudo,
        num_points=args.num_points, checkpoint_every=args.iters, keep_checkpoints=1, seed=args.seed,
        device=args.device, num_workers=args.num_workers,
        backbone_checkpoint=None if init_model else args.backbone_checkpoint, init_model=init_model,
    )


BASE_ROW = Row("base", "Base: 7 precise classes (v1)", "base", "v1", "edge")


def saved_row(
    config: TrainConfig, info: dict[str, Any], *, splits: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """The row record of a finished run with the same training config and data (and scored ``splits``, when
    given), or None."""
    run_dir = Path(config.out_dir)
    eval_file = run_dir / "eval.json"
    if not eval_file.is_file() or not (run_dir / "final").is_dir():
        return None
    saved = json.loads(eval_file.read_text())
    if saved.get("train_config") != config.to_dict() or saved.get("store_data") != info["data"]:
        return None
    if splits is not None and set(saved["row"]["scores"]) != set(splits):
        return None
    print(f"[{saved['row']['id']}] reusing {run_dir}", flush=True)
    return {**saved["row"], "reused": True}


def train_base(args: argparse.Namespace, info: dict[str, Any], out: Path) -> tuple[str, dict[str, Any]]:
    """The user's existing model: trained on the 7 precise classes (v1, edge reweight) for ``--base-iters``;
    every model row then fine-tunes it (`TrainConfig.init_model`). Reused when its settings match."""
    store = Path(info["store"])
    run_dir = out / "runs" / BASE_ROW.id
    config = replace(train_config(args, BASE_ROW, store, "v1", run_dir), iters=args.base_iters,
                     checkpoint_every=args.base_iters)
    saved = saved_row(config, info)  # rows fine-tune it, so it is reused whatever splits were scored
    if saved is not None:
        return str(run_dir / "final"), saved
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[base] training {args.variant} on v1 (7 precise classes), {args.base_iters} iters", flush=True)
    rec = _train_and_evaluate(args, BASE_ROW, config, store, info)
    return str(run_dir / "final"), rec


def run_train_row(
    args: argparse.Namespace, row: Row, info: dict[str, Any], out: Path, *, init_model: str | None = None
) -> dict[str, Any]:
    store = Path(info["store"])
    version = info["versions"][row.version]
    run_dir = out / "runs" / row.id
    config = train_config(args, row, store, version, run_dir, init_model=init_model)
    saved = saved_row(config, info, splits=args.splits) if args.reuse_runs else None
    if saved is not None:
        return saved
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"[{row.id}] training {args.variant} on {version} ({row.version}), reweight={row.reweight}, "
          f"band={row.inverse_weight_near_pseudo}, {args.iters} iters"
          + (f", from {init_model}" if init_model else ""), flush=True)
    return _train_and_evaluate(args, row, config, store, info)


def _train_and_evaluate(
    args: argparse.Namespace, row: Row, config: TrainConfig, store: Path, info: dict[str, Any]
) -> dict[str, Any]:
    run_dir = Path(config.out_dir)
    t0 = time.perf_counter()
    final = train(config, progress=args.progress)
    t1 = time.perf_counter()
    result = evaluate_model(store, final, splits=args.splits, device=args.device, progress=args.progress)
    t2 = time.perf_counter()
    log, _ = read_log(run_dir)  # the training lines (validation lines hold "val" instead of "total")
    tail = log[-max(1, len(log) // 10):]
    rec: dict[str, Any] = {
        "id": row.id, "name": row.name, "kind": row.kind, "label_version": config.version,
        "labels": row.version, "reweight": row.reweight,
        "inverse_weight_near_pseudo": row.inverse_weight_near_pseudo, "init_model": config.init_model,
        "iters": config.iters, "scores": model_scores(result),
        "train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1), "wall_s": round(t2 - t0, 1),
        "s_per_iter": round((t1 - t0) / config.iters, 3),
        "final_loss": round(float(np.mean([r["total"] for r in tail])), 4),
        "run_dir": str(run_dir),
    }
    evaluation = result.to_dict()
    for r in evaluation["splits"].values():
        del r["per_image"]
    (run_dir / "eval.json").write_text(json.dumps(
        {"row": rec, "train_config": config.to_dict(), "store_data": info["data"], "evaluation": evaluation},
        indent=2, allow_nan=False) + "\n")
    car = rec["scores"].get("val", {}).get("car") or {}
    print(f"[{row.id}] done in {rec['wall_s']} s: val car IoU {format_percent(car.get('iou'))} "
          f"BIoU {format_percent(car.get('biou'))}", flush=True)
    return rec


def label_row(row: Row, info: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    store = Path(info["store"])
    if row.kind == "pseudo":
        res = evaluate_pseudo(store, classes=[CLASS])
        per_split = {s: {"car": car_scores(v.scores), "miou7": None, "mbiou7": None,
                         "num_images": v.scores.summary.num_images}
                     for s, v in res.classes[CLASS].items()}
        note = res.skipped[CLASS]
    else:
        per_split = {s: {"car": v, "miou7": None, "mbiou7": None, "num_images": v["num_images"]}
                     for s, v in merged_label_scores(store, info["versions"]["mixed"]).items()}
        note = {}
    return {"id": row.id, "name": row.name, "kind": row.kind, "scores": per_split, "skipped": note,
            "wall_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The paper-style table: car IoU / BIoU / BF1 on val and test, 7-class mIoU, wall time."""
    header = ["Row", "car IoU val", "car BIoU val", "car BF1 val", "car IoU test", "car BIoU test",
              "car BF1 test", "7-cls mIoU val", "7-cls mIoU test", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for r in rows:
        cells = [r["name"]]
        for split in ("val", "test"):
            car = (r["scores"].get(split) or {}).get("car") or {}
            cells += [format_percent(car.get("iou")), format_percent(car.get("biou")),
                      format_fraction(car.get("bf1"))]
        for split in ("val", "test"):
            cells.append(format_percent((r["scores"].get(split) or {}).get("miou7")))
        cells.append(f"{r['wall_s']:.0f}" if r["kind"] in ("train", "base") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> str:
    s = results["settings"]
    lab = results["store"]["data"]["labeler"]
    pseudo_test = "test" in results["store"]["pseudo_labelled_splits"]
    lines = [
        "",
        "IoU and BIoU of car (class vs rest, against the CamVid hand masks) in %, BF1 as a fraction; "
        "7-class mIoU in % against the precise labels with car folded into others. Images: "
        + ", ".join(f"{k} {v}" for k, v in results["store"]["images"].items()) + ".",
        f"Models: {s['variant']}, {s['iters']} iters, batch {s['batch_size']}, crop {s['crop']}, "
        f"recipe {s.get('recipe')}, lr {s['lr'] or 'of the recipe'}, test scale {s.get('test_scale')}, scale {s['scale'][0]}-{s['scale'][1]}, {s['num_points']} points, seed {s['seed']}, "
        f"device {s['device']}, {s['threads']} threads"
        + (f", CamVid downscaled {s['downscale']}x" if s["downscale"] != 1 else "")
        + f". Labeler: {json.dumps(lab)}.",
    ]
    if s.get("base_model"):
        lines.append(f"Every model row fine-tunes {s['base_model']} for {s['iters']} iters; car starts "
                     "untrained.")
    elif s.get("base_iters"):
        lines.append(f"Every model row fine-tunes the base model (7 precise classes, v1, edge reweight, "
                     f"{s['base_iters']} iters) for {s['iters']} iters; car starts untrained.")
    lines.append("Hand-labelled car (oracle): the CamVid car hand masks carved into others, trained like "
                 "'Mixed, no reweight': what this model and schedule reach with perfect car labels.")
    if not pseudo_test:
        lines.append("The simulated labeler needs the hand masks, which are never used on test, so the "
                     "pseudo labels have no test row: compare them with the models on val.")
    lines.append("Pseudo only: the model's training labels have only car and others, so its 7-class mIoU is "
                 "a sanity number. Wall time = training + evaluation of that row.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camvid", default=str(DEFAULT_CAMVID),
                    help="CamVid folder (train/, trainannot/, test/, testannot/)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (store, runs, results.md/json)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 24 train/val and 8 test frames, 20 iters, 1024 points (~3 min, 2 cores)")
    ap.add_argument("--iters", type=int, default=None,
                    help=f"training steps per row (default {DEFAULT_ITERS})")
    ap.add_argument("--crop", type=int, default=256,
                    help="square training crop (the model pads to multiples of 256)")
    ap.add_argument("--variant", default="tiny", help="model: tiny, lite_r18, r50")
    ap.add_argument("--base-iters", type=int, default=None,
                    help="first train a 7-class model on the precise labels (v1) for N steps and fine-tune it "
                         f"in every model row, the add-class use case (default {DEFAULT_BASE_ITERS}); 0: every "
                         "row from scratch")
    ap.add_argument("--base-model", default=None,
                    help="fine-tune this trained model folder (e.g. runs/camvid_newclass/runs/base/final of an "
                         "earlier run) in every model row instead of training a base model here")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--recipe", default="scratch", choices=RECIPE_CHOICES,
                    help="training recipe of the base and of every row (models.training.optim); scratch: the "
                         "CPU-sized models here start from random weights or a briefly trained base")
    ap.add_argument("--lr", type=float, default=None, help="base lr (default: the recipe's)")
    ap.add_argument("--test-scale", type=float, default=2.0,
                    help="inference scale of the trained models (MaSSFormer.test_scale): 2 puts the 1/2-resolution "
                         "masks on CamVid's pixel grid")
    ap.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.5), help="random resize ratio range")
    ap.add_argument("--num-points", type=int, default=None, help="sampled points per mask (default 4096)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init, data order and loss points")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--backbone-checkpoint", default=None,
                    help="torchvision ImageNet ResNet weights (lite_r18: resnet18, r50: resnet50)")
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="tail of the train sequence held out as val")
    ap.add_argument("--downscale", type=int, default=1,
                    help="shrink CamVid (images and hand labels) by this integer factor before ingest")
    ap.add_argument("--max-train", type=int, default=None,
                    help="use the first N CamVid train frames (train + val)")
    ap.add_argument("--max-test", type=int, default=None, help="use the first N CamVid test frames")
    ap.add_argument("--splits", default="val,test",
                    help="splits the models are scored on (investigations: val only, never tune on test)")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="skip rows whose finished run has the same settings")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    lab = ap.add_argument_group("labeler")
    lab.add_argument("--labeler", choices=("simulated", "grounded-sam"), default="simulated")
    lab.add_argument("--labeler-seed", type=int, default=None, help="seed of the labeler (default: --seed)")
    sim = SIMULATED_DEFAULTS
    lab.add_argument("--sim-low-res", type=int, default=None,
                     help=f"default {sim['low_res']} at the native size, divided by --downscale")
    lab.add_argument("--sim-bleed-prob", type=float, default=None, help=f"default {sim['bleed_prob']}")
    lab.add_argument("--sim-bleed-px", type=int, default=None,
                     help=f"default {sim['bleed_px']} at the native size, divided by --downscale")
    lab.add_argument("--sim-miss-prob", type=float, default=None, help=f"default {sim['miss_prob']}")
    lab.add_argument("--sim-min-area-frac", type=float, default=None, help=f"default {sim['min_area_frac']}")
    lab.add_argument("--sam-variant", default="vit_b")
    lab.add_argument("--sam-checkpoint", default=None, help="SAM weights (default: its environment variable)")
    lab.add_argument("--dino-config", default="swint_ogc")
    lab.add_argument("--dino-checkpoint", default=None,
                     help="GroundingDINO weights (default: its environment variable)")
    lab.add_argument("--random-weights", action="store_true",
                     help="grounded-sam with random weights: a smoke test of the plumbing, meaningless numbers")
    lab.add_argument("--labeler-device", default="cpu")
    lab.add_argument("--box-threshold", type=float, default=0.35)
    lab.add_argument("--text-threshold", type=float, default=0.25)
    args = ap.parse_args(argv)
    if args.quick:
        args.iters = 20 if args.iters is None else args.iters
        args.num_points = 1024 if args.num_points is None else args.num_points
        args.max_train = 24 if args.max_train is None else args.max_train
        args.max_test = 8 if args.max_test is None else args.max_test
    args.iters = DEFAULT_ITERS if args.iters is None else args.iters
    args.base_iters = (20 if args.quick else DEFAULT_BASE_ITERS) if args.base_iters is None else args.base_iters
    args.labeler_seed = args.seed if args.labeler_seed is None else args.labeler_seed
    args.num_points = 4096 if args.num_points is None else args.num_points
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    args.rows = [r for r in ROWS if r in rows]  # table order
    args.splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not args.splits or not set(args.splits) <= {"train", "val", "test"}:
        ap.error(f"--splits: expected a subset of train,val,test. Got {args.splits}.")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the experiment; returns the results dict (also written to ``--out``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    labeler = labeler_config(args)
    t = time.perf_counter()
    info = prepare_store(args, out, labeler)
    setup_s = time.perf_counter() - t
    keys = ("variant", "iters", "base_iters", "base_model", "crop", "batch_size", "recipe", "lr", "test_scale",
            "num_points", "seed",
            "device", "threads", "num_workers", "backbone_checkpoint", "quick", "splits")
    settings: dict[str, Any] = {k: getattr(args, k) for k in keys}
    settings["scale"] = list(args.scale)
    settings["downscale"] = args.downscale
    settings["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    results: dict[str, Any] = {
        "experiment": "camvid_newclass", "class": CLASS, "settings": settings, "store": info,
        "setup_s": round(setup_s, 1), "rows": [],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_avg_start": list(os.getloadavg()), "platform": platform.platform()},
        "command": " ".join(["bench/camvid_newclass.py", *(argv if argv is not None else sys.argv[1:])]),
        "gpu_example": GPU_EXAMPLE,
    }
    init_model = args.base_model
    if args.base_iters and not args.base_model and any(ROWS[r].kind == "train" for r in args.rows):
        init_model, base = train_base(args, info, out)
        if not base.get("reused"):
            args.reuse_runs = False  # rows fine-tuned from an older base model are stale
        results["rows"].append(base)
        write_results(out, results)
    for row_id in args.rows:
        row = ROWS[row_id]
        if row.kind == "train":
            rec = run_train_row(args, row, info, out, init_model=init_model)
        else:
            rec = label_row(row, info)
        results["rows"].append(rec)
        write_results(out, results)  # partial results survive a crash
    close_results(results, t_start=t_start)
    write_results(out, results)
    return results


def close_results(results: dict[str, Any], *, t_start: float) -> None:
    """Total wall time and the machine's load at the end (the start's is recorded with the settings)."""
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["load_avg_end"] = list(os.getloadavg())


def write_results(out: Path, results: dict[str, Any]) -> None:
    table = markdown_table(results["rows"])
    (out / "results.md").write_text(f"# CamVid new class: {CLASS}\n\n" + table + notes(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    results = run(argv)
    print()
    print(markdown_table(results["rows"]) + notes(results))
    print(json.dumps({k: v for k, v in results.items() if k != "store"} | {"store": {
        k: v for k, v in results["store"].items() if k != "data"}}, indent=2, allow_nan=False))
    print(f"total {results['total_s']} s; results in {Path(results['store']['store']).parent}")


if __name__ == "__main__":
    main()
