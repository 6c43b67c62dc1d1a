"""bench/model.py: its rows and ratios, on tiny stand-ins at 64 x 64 (a smoke test of the code, not a timing)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

_SPEC = importlib.util.spec_from_file_location("bench_model", REPO / "bench" / "model.py")
assert _SPEC is not None and _SPEC.loader is not None
bench_model = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("bench_model", bench_model)
_SPEC.loader.exec_module(bench_model)


def test_rows_ratios_and_paper_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = {"massformer": ("tiny", "hr"), "fpn_ablation": ("tiny", "fpn"),
            "mask2former": ("mask2former_tiny", None), "maskformer": ("maskformer_tiny", None)}
    monkeypatch.setattr(bench_model, "ROWS", tiny)
    # no --threads: it would set torch's thread count for the rest of the test session
    result = bench_model.main(["--macs-size", "512", "512", "--size", "64", "64", "--repeats", "1"])
    assert set(result["rows"]) == set(tiny)
    m2f = result["rows"]["mask2former"]
    assert m2f["variant"] == "mask2former_tiny" and m2f["pixel_decoder"] == "msdeform"
    assert m2f["macs"]["grid_sample_macs_g"] > 0 and "macs_ratio_to_paper" in m2f
    assert set(result["macs_ratio_massformer_over"]) == {"fpn_ablation", "mask2former", "maskformer"}
    (timing,) = result["timing"]
    assert timing["input_hw"] == [64, 64] and set(timing["forward_s"]) == set(tiny)
    assert set(timing["time_ratio_massformer_over"]) == {"fpn_ablation", "mask2former", "maskformer"}
    assert '"rows"' in capsys.readouterr().out
