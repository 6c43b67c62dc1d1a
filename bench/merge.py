"""Merge throughput: 100 synthetic 2160x3840 label maps merged with a pseudo class vs plain copies.

One run builds a store (v1 labels + one pseudo class, "car"), then times, over the same images:
- `numpy_copy`: copying the label maps in memory (the physical bound of moving the bytes);
- `zarr_copy`: reading each label map and pseudo mask from the store and writing two arrays (labels,
  provenance) with the store's codec and sharding, no merge logic (the storage bound);
- `merge` with 1 worker (carve-others) and with `--workers` processes (overwrite: another version).
Prints JSON; ratios are `bound_s / merge_s` (1.0 = as fast as the bound).
Run: .venv/bin/python bench/merge.py [--images 100] [--size 2160 3840] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from addclass.models.labelers.label_record import LabelRecord
from addclass.storage.pseudo import read_pseudo_mask, record_pseudo_run, write_pseudo_result
from addclass.storage.registry import ImageRecord
from addclass.storage.store import build_label_store, open_label_store
from addclass.tasks.data.synthetic_scenes import make_scene
from addclass.tasks.labels.merge import merge
from addclass.tasks.labels.pseudo_label import settings_key


def pseudo_record(car: np.ndarray, *, seed: int) -> LabelRecord:
    """A Grounded-SAM-like record: the car mask grown by a few pixels (spilling over boundaries), one instance
    per connected component, with scores."""
    grown = cv2.dilate(car.astype(np.uint8), np.ones((9, 9), np.uint8))
    n, comp = cv2.connectedComponents(grown)
    rng = np.random.default_rng(seed)
    masks = np.stack([comp == k for k in range(1, n)]) if n > 1 else np.zeros((0, *car.shape), bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return LabelRecord.from_instances(instance_masks=masks, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                                      scores=rng.uniform(0.3, 0.95, len(masks)).astype(np.float32),
                                      phrases=["car"] * len(masks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, nargs=2, default=(2160, 3840))
    ap.add_argument("--distinct", type=int, default=4, help="distinct scenes generated (reused cyclically)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    h, w = a.size
    t = time.perf_counter()
    scenes = [make_scene(height=h, width=w, seed=k) for k in range(a.distinct)]
    records = [pseudo_record(s.car, seed=k) for k, s in enumerate(scenes)]
    rec_dicts = [r.to_dict() for r in records]
    ids = [f"i{k:04d}" for k in range(a.images)]
    maps = [scenes[k % a.distinct].labels for k in range(a.images)]
    mb = sum(m.nbytes for m in maps) / 1e6
    t_gen = time.perf_counter() - t

    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "merge-bench.zarr"
    try:
        t = time.perf_counter()
        with build_label_store(path, name="bench", source="bench", overwrite=True) as st:
            for image_id, m in zip(ids, maps, strict=True):
                st.write_precise_labels("train", image_id, m)
            st.write_image_records("train", [ImageRecord(id=i, path="x.png", sha256="0", height=h, width=w)
                                             for i in ids])
        st = open_label_store(path, mode="a")
        key = settings_key({"bench": True})
        for k, image_id in enumerate(ids):
            rec = records[k % a.distinct]
            write_pseudo_result(st, "car", "train", image_id, mask=rec.mask, record=rec_dicts[k % a.distinct],
                                key=key)
        record_pseudo_run(st, "car", prompt="car", labeler={"name": "bench"}, key=key, split="train",
                          images=a.images, detections=sum(records[k % a.distinct].num_instances
                                                          for k in range(a.images)))
        t_setup = time.perf_counter() - t

        # physical bound: copy the label maps in memory
        buf = np.empty((h, w), np.uint8)
        t = time.perf_counter()
        for m in maps:
            np.copyto(buf, m)
        t_numpy = time.perf_counter() - t

        # storage bound: the same reads and writes as a merge, without the merge rule
        scratch = tmp / "copy-bench.zarr"
        shutil.rmtree(scratch, ignore_errors=True)
        with build_label_store(scratch, name="copy", source="bench") as cp:
            ro = open_label_store(path)
            t = time.perf_counter()
            for image_id in ids:
                labels = ro.read_labels("train", image_id)
                mask = read_pseudo_mask(ro, "car", "train", image_id)
                cp.write_precise_labels("train", image_id, labels)
                cp._write_array(f"provenance/v1/train/{image_id}", mask.astype(np.uint8), attrs={},
                                overwrite=True)
            t_zarr = time.perf_counter() - t
            cp.write_image_records("train", [ImageRecord(id=i, path="x", sha256="0", height=h, width=w)
                                             for i in ids])
        shutil.rmtree(scratch, ignore_errors=True)

        t = time.perf_counter()
        v_serial = merge(path, classes="car", parent="v1", policy="carve-others", progress=False)
        t_merge1 = time.perf_counter() - t
        t = time.perf_counter()
        v_parallel = merge(path, classes="car", parent="v1", policy="overwrite", workers=a.workers,
                           progress=False)
        t_merge_n = time.perf_counter() - t
        ro = open_label_store(path)
        car_px = sum(int(np.count_nonzero(ro.read_labels("train", i, version=v_serial) == 7))
                     for i in ids[:4])
        disk = {f"{kind}/{v}": round(sum(f.stat().st_size for f in (path / kind / v).rglob("*")
                                         if f.is_file()) / 1e6, 2)
                for kind, v in (("labels", "v1"), ("labels", v_serial), ("provenance", v_serial))}
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "images": a.images, "size": [h, w], "raw_mb": round(mb, 1), "workers": a.workers,
        "instances_per_image": [r.num_instances for r in records],
        "generate_s": round(t_gen, 2), "setup_s": round(t_setup, 2),
        "numpy_copy_s": round(t_numpy, 3), "zarr_copy_s": round(t_zarr, 2),
        "merge_1_worker_s": round(t_merge1, 2), f"merge_{a.workers}_workers_s": round(t_merge_n, 2),
        "numpy_copy_mb_s": round(mb / t_numpy, 1), "zarr_copy_mb_s": round(mb / t_zarr, 1),
        "merge_1_worker_mb_s": round(mb / t_merge1, 1),
        f"merge_{a.workers}_workers_mb_s": round(mb / t_merge_n, 1),
        "merge_1_worker_s_per_image": round(t_merge1 / a.images, 3),
        "ratio_numpy_copy_vs_merge_1": round(t_numpy / t_merge1, 4),
        "ratio_zarr_copy_vs_merge_1": round(t_zarr / t_merge1, 3),
        f"ratio_zarr_copy_vs_merge_{a.workers}": round(t_zarr / t_merge_n, 3),
        f"speedup_{a.workers}_workers": round(t_merge1 / t_merge_n, 2),
        "versions": [v_serial, v_parallel], "car_pixels_first4": car_px, "on_disk_mb": disk,
    }))


if __name__ == "__main__":
    main()
