"""bench/camvid_seeds.py: mean and sd per row over runs of the CamVid experiment."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location("camvid_seeds", REPO / "bench" / "camvid_seeds.py")
assert _SPEC is not None and _SPEC.loader is not None
seeds = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("camvid_seeds", seeds)
_SPEC.loader.exec_module(seeds)


def _run(seed: int, rows: dict[str, tuple[float, float, float, float | None]]) -> dict:
    return {"settings": {"seed": seed}, "rows": [
        {"id": rid, "name": rid.upper(), "scores": {
            "val": {"car": {"iou": iou, "biou": biou, "bf1": bf1}, "miou7": miou7},
            "test": {"car": {"iou": 0.0, "biou": 0.0, "bf1": 0.0}, "miou7": 0.0}}}
        for rid, (iou, biou, bf1, miou7) in rows.items()]}


def test_seed_spread_means_and_sds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run(0, {"a": (0.5, 0.1, 0.3, 0.4), "b": (0.2, 0.05, 0.1, None)}),
            _run(1, {"a": (0.7, 0.3, 0.5, 0.6)})]
    spread = seeds.seed_spread(runs, split="val")
    assert [(r["id"], r["n"], r["seeds"]) for r in spread] == [("a", 2, [0, 1]), ("b", 1, [0])]
    a = spread[0]["stats"]
    assert a["iou"]["mean"] == pytest.approx(0.6) and a["iou"]["sd"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert a["biou"]["values"] == [0.1, 0.3]
    b = spread[1]["stats"]
    assert b["iou"]["sd"] is None and b["miou7"] == {"values": [None], "mean": None, "sd": None}
    table = seeds.markdown(spread, split="val").splitlines()
    assert table[2] == "| A | 2 | 60.00 ± 14.14 | 20.00 ± 14.14 | 0.4000 ± 0.1414 | 50.00 ± 14.14 |"
    assert table[3] == "| B | 1 | 20.00 | 5.00 | 0.1000 | n/a |"

    for i, run in enumerate(runs):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(run))
    seeds.main([str(tmp_path / "r0"), str(tmp_path / "r1")])
    out = capsys.readouterr().out
    assert "| A | 2 | 60.00 ± 14.14 |" in out
    with pytest.raises(SystemExit, match="nowhere/results.json not found"):
        seeds.main([str(tmp_path / "nowhere")])
