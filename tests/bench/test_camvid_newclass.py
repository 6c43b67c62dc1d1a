"""Smoke test of bench/camvid_newclass.py (issue #9): the whole pipeline on a few CamVid frames.

Ingest -> simulated pseudo labels -> carve-others merge -> pseudo-only version -> one training step per
model row -> evaluation, then the table and JSON structure. The numbers of a one-step model mean nothing;
the test checks that every row is scored with finite numbers and that the two training label versions
are what the rows claim (the mixed one carves car into "others" only, the pseudo-only one is car/others).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CAMVID, REPO, needs_camvid

_SPEC = importlib.util.spec_from_file_location("camvid_newclass", REPO / "bench" / "camvid_newclass.py")
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("camvid_newclass", bench)
_SPEC.loader.exec_module(bench)

TRAIN_ROWS = ("pseudo_only", "mixed_inverse", "hand_car")
ROWS = ("pseudo_label", "merged_label", *TRAIN_ROWS)


def test_parse_args_defaults_and_rows() -> None:
    args = bench.parse_args([])
    assert args.rows == list(bench.ROWS)
    assert (args.iters, args.crop, args.variant, args.num_points) == (bench.DEFAULT_ITERS, 256, "tiny", 4096)
    assert args.base_iters == bench.DEFAULT_BASE_ITERS and bench.parse_args(["--base-iters", "0"]).base_iters == 0
    quick = bench.parse_args(["--quick", "--rows", "mixed_inverse,pseudo_label"])
    assert quick.rows == ["pseudo_label", "mixed_inverse"]  # table order, not command-line order
    assert quick.iters < args.iters and quick.max_train is not None and quick.max_test is not None
    assert quick.base_iters < args.base_iters
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "pseudo_label,bogus"])


def test_simulated_labeler_flags_override_defaults() -> None:
    cfg = bench.labeler_config(bench.parse_args(["--sim-low-res", "64", "--seed", "3"]))
    assert cfg.kind == "simulated" and cfg.seed == 3
    assert cfg.simulated == {**bench.SIMULATED_DEFAULTS, "low_res": 64}


def test_markdown_table_formats_missing_values() -> None:
    rows = [
        {"name": "Pseudo Label", "kind": "pseudo", "wall_s": 0.1,
         "scores": {"val": {"car": {"iou": 0.5, "biou": 0.25, "bf1": 0.75}, "miou7": None}}},
        {"name": "Mixed", "kind": "train", "wall_s": 12.4,
         "scores": {"val": {"car": {"iou": 0.1, "biou": 0.2, "bf1": 0.3}, "miou7": 0.4},
                    "test": {"car": {"iou": 0.0, "biou": 0.0, "bf1": 0.0}, "miou7": 0.5}}},
    ]
    lines = bench.markdown_table(rows).strip().splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 11
    assert lines[2] == "| Pseudo Label | 50.00 | 25.00 | 0.7500 | n/a | n/a | n/a | n/a | n/a | - |"
    assert lines[3] == "| Mixed | 10.00 | 20.00 | 0.3000 | 0.00 | 0.00 | 0.0000 | 40.00 | 50.00 | 12 |"


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


@pytest.mark.shared_data
@needs_camvid
def test_pipeline_on_a_few_frames(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = bench.run([
        "--camvid", str(CAMVID), "--out", str(out), "--rows", ",".join(ROWS), "--max-train", "5",
        "--max-test", "1", "--iters", "1", "--num-points", "256", "--threads", "2", "--base-iters", "0",
    ])

    # files: the markdown table and the JSON, with one table line per row, in table order
    md = (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [bench.ROWS[r].name for r in ROWS]
    assert [r["id"] for r in results["rows"]] == list(ROWS)
    assert results["store"]["images"] == {"train": 4, "val": 1, "test": 1}
    assert results["store"]["pseudo_labelled_splits"] == ["train", "val"]

    for row in results["rows"]:
        if row["kind"] == "train":
            assert set(row["scores"]) == {"val", "test"}, row["id"]
            for split, s in row["scores"].items():
                assert all(_finite(s["car"][k]) for k in ("iou", "biou", "bf1")), (row["id"], split, s)
                assert _finite(s["miou7"]) and 0.0 <= s["miou7"] <= 1.0, (row["id"], split)
            assert _finite(row["train_s"]) and _finite(row["eval_s"]) and row["wall_s"] > 0
            assert _finite(row["final_loss"])
            assert (Path(row["run_dir"]) / "final" / "model.safetensors").is_file()
        else:  # the labels themselves: train and val have pseudo labels, test does not (simulated labeler)
            assert set(row["scores"]) == {"train", "val"}, row["id"]
            for s in row["scores"].values():
                assert all(_finite(s["car"][k]) for k in ("iou", "biou", "bf1")), (row["id"], s)
                assert 0.0 < s["car"]["iou"] <= 1.0
    by_id = {r["id"]: r for r in results["rows"]}
    assert "test" in by_id["pseudo_label"]["skipped"]
    assert by_id["pseudo_only"]["labels"] == "pseudo_only" and by_id["mixed_inverse"]["reweight"] == "inverse"

    # the label versions the rows trained on
    from addclass.storage.pseudo import read_pseudo_mask
    from addclass.storage.store import open_label_store

    store = open_label_store(results["store"]["store"])
    mixed, pseudo_only = results["store"]["versions"]["mixed"], results["store"]["versions"]["pseudo_only"]
    hand_car = results["store"]["versions"]["hand_car"]
    car = store.class_by_name("car").id
    versions = store.versions()
    assert versions[pseudo_only].class_ids == versions[mixed].class_ids == tuple(range(car + 1))
    assert versions[hand_car].class_ids == versions[mixed].class_ids
    for image_id in store.image_ids("train"):
        v1 = store.read_labels("train", image_id, version="v1")
        pseudo = read_pseudo_mask(store, "car", "train", image_id)
        m = store.read_labels("train", image_id, version=mixed)
        np.testing.assert_array_equal(m == car, pseudo & (v1 == 0))  # carve-others
        np.testing.assert_array_equal(np.where(m == car, 0, m), v1)
        p = store.read_labels("train", image_id, version=pseudo_only)
        np.testing.assert_array_equal(p, np.where(pseudo, car, 0))  # pseudo masks alone
        hand = store.read_hand_mask("reference", "car", image_id).astype(bool)
        h = store.read_labels("train", image_id, version=hand_car)
        np.testing.assert_array_equal(h, np.where(hand & (v1 == 0), car, v1))  # the oracle: hand car carved
    # the reviewed version: the one least sure train image of 4 (10 %, at least one) has its hand car mask,
    # with provenance reviewed; every other image is the mixed version's
    from addclass.storage.registry import PROV_REVIEWED
    from addclass.tasks.labels.review import rank_images

    reviewed = results["store"]["versions"]["reviewed"]
    worst = rank_images(store, "car", version=mixed, by="score", splits=("train",))[0][1]
    for split in store.splits():
        for image_id in store.image_ids(split):
            r, r_prov = store.read_labels_and_provenance(split, image_id, version=reviewed)
            m, m_prov = store.read_labels_and_provenance(split, image_id, version=mixed)
            if image_id != worst:
                assert np.array_equal(r, m) and np.array_equal(r_prov, m_prov), image_id
                continue
            v1 = store.read_labels(split, image_id, version="v1")
            hand = store.read_hand_mask("reference", "car", image_id).astype(bool)
            np.testing.assert_array_equal(r, np.where(hand & (v1 == 0), car, v1))
            np.testing.assert_array_equal(r_prov == PROV_REVIEWED, hand & (v1 == 0))
    for image_id in store.image_ids("test"):  # never trained on: the parent's labels
        np.testing.assert_array_equal(store.read_labels("test", image_id, version=pseudo_only),
                                      store.read_labels("test", image_id, version=mixed))

    # fine-tuning mode: a 7-class base model on v1 first, then every model row starts from it
    tuned = bench.run(["--camvid", str(CAMVID), "--out", str(out), "--rows", "mixed_inverse", "--max-train", "5",
                       "--max-test", "1", "--iters", "1", "--base-iters", "2", "--num-points", "256"])
    assert [r["id"] for r in tuned["rows"]] == ["base", "mixed_inverse"]
    base, row = tuned["rows"]
    assert base["iters"] == 2 and base["scores"]["val"]["car"] is None and _finite(base["scores"]["val"]["miou7"])
    assert row["init_model"] == str(Path(base["run_dir"]) / "final")
    assert "fine-tunes the base model" in (out / "results.md").read_text()
    rerun = bench.run(["--camvid", str(CAMVID), "--out", str(out), "--rows", "mixed_inverse", "--max-train", "5",
                       "--max-test", "1", "--iters", "1", "--base-iters", "2", "--num-points", "256",
                       "--reuse-runs"])  # nothing retrains: the base always, the row with --reuse-runs
    assert [r.get("reused") for r in rerun["rows"]] == [True, True]
    assert rerun["rows"][1]["scores"] == row["scores"]
    given = bench.run(["--camvid", str(CAMVID), "--out", str(tmp_path / "given"), "--rows", "mixed_none",
                       "--max-train", "5", "--max-test", "1", "--iters", "1", "--num-points", "256",
                       "--base-model", row["init_model"], "--splits", "val"])
    assert [r["id"] for r in given["rows"]] == ["mixed_none"]  # no base model trained here
    assert given["rows"][0]["init_model"] == row["init_model"]

    # a rerun with the same data settings reuses the store (no second ingest)
    again = bench.run(["--camvid", str(CAMVID), "--out", str(out), "--rows", "pseudo_label",
                       "--max-train", "5", "--max-test", "1"])
    assert again["store"]["versions"] == results["store"]["versions"]
    assert again["rows"][0]["scores"] == results["rows"][0]["scores"]


@pytest.mark.shared_data
@needs_camvid
def test_grounded_sam_labeler_runs_on_every_split(tmp_path: Path) -> None:
    """`--labeler grounded-sam` (random weights: the plumbing, not the numbers) labels train, val and test."""
    out = tmp_path / "gsam"
    common = ["--camvid", str(CAMVID), "--out", str(out), "--max-train", "3", "--max-test", "1",
              "--labeler", "grounded-sam", "--sam-variant", "tiny", "--dino-config", "test"]
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing.pth'}"):
        bench.run([*common, "--sam-checkpoint", str(tmp_path / "missing.pth"), "--dino-checkpoint",
                   str(tmp_path / "missing.pth"), "--rows", "pseudo_label"])
    assert not (out / "store").exists()  # nothing was built before the checkpoint check
    results = bench.run([*common, "--random-weights", "--box-threshold", "0.0", "--rows",
                         "pseudo_label,mixed_none", "--iters", "1", "--num-points", "256", "--base-iters", "0"])
    assert results["store"]["pseudo_labelled_splits"] == ["train", "val", "test"]
    assert results["store"]["data"]["labeler"]["random_weights"] is True
    pseudo_row, model_row = results["rows"]
    assert set(pseudo_row["scores"]) == {"train", "val", "test"}  # a real labeler never sees the hand masks
    assert set(model_row["scores"]) == {"val", "test"} and _finite(model_row["scores"]["val"]["miou7"])
