from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from addclass.storage.pseudo import missing_pseudo, pseudo_runs, read_pseudo_mask, read_pseudo_record
from addclass.storage.store import open_label_store
from addclass.tasks.labels.pseudo_label import LabelerConfig, import_pseudo, plan_pseudo_label, pseudo_label
from tests.crash import die_after_writes

REPO = Path(__file__).resolve().parents[2]
SIM = LabelerConfig(kind="simulated")


def test_simulated_run_writes_every_image_and_resumes(fresh_store: Path) -> None:
    out = pseudo_label(fresh_store, prompt="car", split="train", labeler=SIM, progress=False)
    st = open_label_store(fresh_store)
    ids = st.image_ids("train")
    assert out["already_done"] == 0 and missing_pseudo(st, "car", "train") == []
    for image_id in ids:
        mask = read_pseudo_mask(st, "car", "train", image_id)
        ref = st.read_hand_mask("reference", "car", image_id) == 1
        assert mask.shape == ref.shape
        if ref.sum() > 50:  # a degraded copy of the hand mask, not something unrelated
            assert (mask & ref).sum() / max((mask | ref).sum(), 1) > 0.3
        rec = read_pseudo_record(st, "car", "train", image_id)
        assert len(rec["boxes"]) == len(rec["scores"]) == len(rec["instances"])
    run = pseudo_runs(st)["car"]
    assert run["labeler"]["simulated"] is True and run["splits"]["train"]["images"] == len(ids)
    total = sum(len(read_pseudo_record(st, "car", "train", i)["instances"]) for i in ids)
    assert out["detections"] == out["detections_new"] == total == run["splits"]["train"]["detections"]
    again = pseudo_label(fresh_store, prompt="car", split="train", labeler=SIM, progress=False)
    assert again["already_done"] == len(ids) and again["detections_new"] == 0
    assert again["detections"] == total  # a resumed run records the split's detections, not only its new ones
    assert pseudo_runs(open_label_store(fresh_store))["car"]["splits"]["train"]["detections"] == total
    other = plan_pseudo_label(fresh_store, prompt="car", labeler=LabelerConfig(kind="simulated", seed=1))
    assert sum(len(b) for b in other.batches) == len(ids)  # other settings relabel everything
    first = read_pseudo_mask(st, "car", "train", ids[0])
    with pytest.raises(ValueError, match="names class 'car', whose pseudo labels .* come from prompt 'car'"):
        pseudo_label(fresh_store, prompt="CAR!!", split="train", labeler=SIM, progress=False)
    assert np.array_equal(read_pseudo_mask(open_label_store(fresh_store), "car", "train", ids[0]), first)


def test_simulated_is_deterministic(tmp_path: Path) -> None:
    from addclass.tasks.data.ingest import ingest_synthetic

    masks = []
    for name in ("a", "b"):
        p = ingest_synthetic(tmp_path / f"{name}.zarr", images=4, size=(64, 80), seed=2, progress=False)
        pseudo_label(p, prompt="car", labeler=SIM, progress=False)
        st = open_label_store(p)
        masks.append([read_pseudo_mask(st, "car", "train", i) for i in st.image_ids("train")])
    assert all(np.array_equal(x, y) for x, y in zip(*masks, strict=True))


_CRASHER = die_after_writes("addclass.tasks.labels.pseudo_label", "write_pseudo_result", 2) + """
import sys
import addclass.tasks.labels.pseudo_label as pl
pl.pseudo_label(sys.argv[1], prompt="car", labeler=pl.LabelerConfig(kind="simulated"), batch_size=1, progress=False)
"""


def test_kill_9_then_rerun_finishes_without_redoing_work(tmp_path: Path) -> None:
    from addclass.tasks.data.ingest import ingest_synthetic

    store = ingest_synthetic(tmp_path / "s.zarr", images=8, size=(64, 80), seed=4, progress=False)
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(store)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9
    st = open_label_store(store)
    n = len(st.image_ids("train"))
    assert len(missing_pseudo(st, "car", "train")) == n - 2  # two finished, nothing half-written counted
    out = pseudo_label(store, prompt="car", labeler=SIM, progress=False, batch_size=1)
    assert out["already_done"] == 2
    assert missing_pseudo(open_label_store(store), "car", "train") == []


@pytest.mark.parametrize(
    ("prompt", "split", "message"),
    [("", "train", "non-empty"), ("sky", "train", "already exists"), ("Sky", "train", "already exists"),
     ("car", "test", "evaluation masks never feed"), ("car", "nope", "split"), ("bus", "train", "reference/bus")],
)
def test_bad_requests_are_refused(synthetic_store: Path, prompt: str, split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_pseudo_label(synthetic_store, prompt=prompt, split=split, labeler=SIM)


def test_prompt_cannot_escape_the_store(fresh_store: Path) -> None:
    plan = plan_pseudo_label(fresh_store, prompt="../../car", labeler=SIM)
    assert plan.class_name == "car"


def test_import_pseudo_validates_then_writes(fresh_store: Path, tmp_path: Path) -> None:
    st = open_label_store(fresh_store)
    ids = st.image_ids("train")[:2]
    folder = tmp_path / "masks"
    folder.mkdir()
    m = np.zeros((64, 80), np.uint8)
    m[10:20, 5:30] = 255
    m[40:50, 60:70] = 255
    cv2.imwrite(str(folder / f"{ids[0]}.png"), m)
    cv2.imwrite(str(folder / "unknown_id.png"), m)
    with pytest.raises(ValueError, match="unknown_id"):
        import_pseudo(fresh_store, class_name="car", masks_dir=folder)
    assert missing_pseudo(open_label_store(fresh_store), "car", "train") == st.image_ids("train")  # nothing written
    (folder / "unknown_id.png").unlink()
    cv2.imwrite(str(folder / f"{ids[1]}.png"), np.full((10, 10), 255, np.uint8))
    with pytest.raises(ValueError, match=f"{ids[1]}.*10x10"):
        import_pseudo(fresh_store, class_name="car", masks_dir=folder)
    cv2.imwrite(str(folder / f"{ids[1]}.png"), np.full((64, 80), 7, np.uint8))
    with pytest.raises(ValueError, match=r"values \[7\]"):
        import_pseudo(fresh_store, class_name="car", masks_dir=folder)
    (folder / f"{ids[1]}.png").unlink()
    out = import_pseudo(fresh_store, class_name="car", masks_dir=folder)
    assert out["images"] == {"train": 1}
    st = open_label_store(fresh_store)
    assert np.array_equal(read_pseudo_mask(st, "car", "train", ids[0]), m > 0)
    rec = read_pseudo_record(st, "car", "train", ids[0])
    assert sorted(map(tuple, rec["boxes"])) == [(5.0, 10.0, 30.0, 20.0), (60.0, 40.0, 70.0, 50.0)]


def test_grounded_sam_random_weights_through_the_task(tmp_path: Path) -> None:
    """Tiny SAM + the small GroundingDINO test config with random weights, over 3 images, twice."""
    from addclass.storage.embedding_cache import StoreEmbeddingCache
    from addclass.tasks.data.ingest import ingest_synthetic
    from addclass.tasks.labels.pseudo_label import _BUILT, build_labeler

    store = ingest_synthetic(tmp_path / "g.zarr", images=5, size=(72, 96), seed=6, progress=False)
    cfg = LabelerConfig(kind="grounded-sam", sam_variant="tiny", dino_config="test", random_weights=True,
                        dino_image_size=256, max_boxes=3, box_threshold=0.0)
    out = pseudo_label(store, prompt="car", labeler=cfg, progress=False)
    st = open_label_store(store)
    ids = st.image_ids("train")
    assert out["labeler"]["random_weights"] is True  # flagged in the registry
    assert pseudo_runs(st)["car"]["labeler"]["random_weights"] is True
    for image_id in ids:
        rec = read_pseudo_record(st, "car", "train", image_id)
        boxes = np.array(rec["boxes"], np.float32).reshape(-1, 4)
        assert 1 <= len(boxes) <= 3
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 72).all()
        assert read_pseudo_mask(st, "car", "train", image_id).shape == (72, 96)
    # a second prompt over the same images reads the SAM embeddings from the store cache
    built = len(_BUILT)
    labeler = build_labeler(cfg, store_path=store)  # the process's labeler of this store and config
    assert len(_BUILT) == built  # reused, not built anew (other tests may have left other labelers)
    cache = labeler.embedding_cache
    assert isinstance(cache, StoreEmbeddingCache) and cache.misses == len(ids) and cache.hits == 0
    calls = []
    hook = labeler.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        pseudo_label(store, prompt="truck", labeler=cfg, progress=False)
    finally:
        hook.remove()
    assert cache.hits == len(ids) and calls == []
    # the device is not part of the resume key: the run is done, whatever device finishes it
    on_gpu = plan_pseudo_label(store, prompt="car", labeler=replace(cfg, device="cuda"))
    assert on_gpu.batches == [] and on_gpu.already_done == len(ids)
    stricter = plan_pseudo_label(store, prompt="car", labeler=replace(cfg, box_threshold=0.5))
    assert stricter.already_done == 0  # a setting that changes the labels does relabel
    # an image file replaced after ingest (same size) is refused, not labelled from its stale cached embedding
    path = st.image_path(st.image_record("train", ids[0]))
    assert cv2.imwrite(str(path), 255 - cv2.imread(str(path)))
    with pytest.raises(ValueError, match=f"id '{ids[0]}'.*changed since ingest"):
        pseudo_label(store, prompt="bus", labeler=cfg, progress=False)


def test_a_partial_import_merged_with_allow_partial_can_be_completed(fresh_store: Path, tmp_path: Path) -> None:
    from addclass.tasks.labels.merge import merge

    st = open_label_store(fresh_store)
    ids = {s: st.image_ids(s) for s in st.splits()}
    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir()
    rest.mkdir()
    m = np.zeros((64, 80), np.uint8)
    m[10:20, 5:30] = 255
    all_ids = [i for s in ids for i in ids[s]]
    for i in all_ids[:1]:
        cv2.imwrite(str(first / f"{i}.png"), m)
    for i in all_ids:  # the rest, and again the first image with another mask: the first import's is kept
        cv2.imwrite(str(rest / f"{i}.png"), 255 - m)
    import_pseudo(fresh_store, class_name="car", masks_dir=first)
    partial = merge(fresh_store, classes=["car"], parent="v1", allow_partial=True)
    out = import_pseudo(fresh_store, class_name="car", masks_dir=rest)
    assert out["kept"] == 1 and sum(out["images"].values()) == len(all_ids) - 1
    st = open_label_store(fresh_store)
    assert np.array_equal(read_pseudo_mask(st, "car", next(s for s in ids if all_ids[0] in ids[s]), all_ids[0]), m > 0)
    assert all(missing_pseudo(st, "car", s) == [] for s in ids)
    complete = merge(fresh_store, classes=["car"], parent="v1")  # no allow_partial needed now
    assert complete != partial
    with pytest.raises(ValueError, match="'sky'.*already exists"):
        import_pseudo(fresh_store, class_name="sky", masks_dir=rest)  # a precise class is never imported into
