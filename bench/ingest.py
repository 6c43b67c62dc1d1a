"""Ingest throughput: 100 synthetic 2160x3840 label maps written into a label store vs a plain numpy copy.

Prints JSON. The anchor (numpy copy of the same arrays) is the physical bound of moving the bytes.
Run: .venv/bin/python bench/ingest.py [--images 100] [--size 2160 3840]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from addclass.storage.registry import ImageRecord  # noqa: E402
from addclass.storage.store import build_label_store, open_label_store  # noqa: E402
from addclass.tasks.data.synthetic_scenes import make_scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, nargs=2, default=(2160, 3840))
    ap.add_argument("--distinct", type=int, default=4, help="distinct scenes generated (reused cyclically)")
    a = ap.parse_args()
    h, w = a.size
    scenes = [make_scene(height=h, width=w, seed=k).labels for k in range(a.distinct)]
    maps = [scenes[k % a.distinct] for k in range(a.images)]
    mb = sum(m.nbytes for m in maps) / 1e6

    t = time.perf_counter()
    copies = [m.copy() for m in maps]
    t_copy = time.perf_counter() - t
    del copies

    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter()
        with build_label_store(tmp / "b.zarr", name="bench", source="bench") as st:
            for k, m in enumerate(maps):
                st.write_precise_labels("train", f"i{k:04d}", m)
            st.write_image_records("train", [ImageRecord(id=f"i{k:04d}", path="x", sha256="0", height=h, width=w)
                                             for k in range(a.images)])
        t_store = time.perf_counter() - t
        t = time.perf_counter()
        st2 = open_label_store(tmp / "b.zarr")
        for k in range(a.images):
            st2.read_labels("train", f"i{k:04d}")
        t_read = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in (tmp / "b.zarr").rglob("*") if f.is_file()) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "images": a.images, "size": [h, w], "raw_mb": round(mb, 1),
        "store_write_mb_s": round(mb / t_store, 1), "store_read_mb_s": round(mb / t_read, 1),
        "numpy_copy_mb_s": round(mb / t_copy, 1), "write_vs_copy_ratio": round(t_copy / t_store, 4),
        "on_disk_mb": round(disk, 2), "compression_ratio": round(mb / disk, 1),
        "store_write_s": round(t_store, 2), "numpy_copy_s": round(t_copy, 3),
    }))


if __name__ == "__main__":
    main()
