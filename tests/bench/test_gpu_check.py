"""bench/gpu_check.py --cpu: the GPU check's dry run, end to end on the CPU, so the script is known to work before
GPU time is spent on it (docs/gpu_check.md). No wall-time asserts: the figures are checked for presence and
sense, not speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CHECKS = {"train", "resume", "ddp", "labeler", "predict", "evaluate", "efficiency"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    """(stdout's JSON, --out's JSON, stderr) of one dry run."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "result" / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(out),
         "--work-dir", str(tmp / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout), json.loads(out.read_text()), proc.stderr


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_check(dry_run: tuple[dict, dict, str]) -> None:
    doc, written, _ = dry_run
    assert written == doc  # --out holds the document stdout printed (stdout holds nothing else)
    assert doc["mode"] == "cpu" and doc["complete"] is True and doc["ok"] is True and doc["failed"] == []
    assert set(doc["checks"]) == CHECKS
    for name, check in doc["checks"].items():
        assert check["ok"] is True, (name, check.get("error"))
        assert check["seconds"] >= 0
    # GPU-only figures are null, each with its reason
    env = doc["env"]
    assert env["peak_bf16_tflops"] is None and "no GPU" in env["null_reasons"]["peak_bf16_tflops"]

    rows = doc["checks"]["train"]["rows"]
    ran = [r for r in rows if "skipped" not in r]
    assert {(r["variant"], r["precision"]) for r in rows} == {
        (v, p) for v in ("tiny", "lite_r18", "r50") for p in ("fp32", "bf16")}
    assert {r["variant"] for r in ran} == {"tiny", "lite_r18", "r50"} and ("tiny", "bf16") in {
        (r["variant"], r["precision"]) for r in ran}
    for r in ran:
        assert r["loss_finite"] and r["losses"] and all(math.isfinite(x) for x in r["losses"])
        assert r["steps_per_s"] > 0 and r["macs_g_per_image"] > 0 and r["achieved_tflops"] > 0
        assert r["amp_active"] is False  # bf16 autocast is CUDA-only
        assert r["peak_gpu_mem_gb"] is None and r["mfu"] is None
        assert {"peak_gpu_mem_gb", "mfu"} <= set(r["null_reasons"])


@pytest.mark.slow
def test_the_resumed_run_matches_the_uninterrupted_one(dry_run: tuple[dict, dict, str]) -> None:
    resume = dry_run[0]["checks"]["resume"]
    assert [leg["device"] for leg in resume["legs"]] == ["cpu", "cpu", "cpu"]  # the GPU leg runs on the CPU here
    assert resume["steps"] == [1, 2, 3] and resume["lr_equal"]
    for mine, theirs in zip(resume["losses_resumed"], resume["losses_straight"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)  # as tests/tasks/test_train.py
    assert resume["cuda_rng_roundtrip"] is None and "cuda_rng_roundtrip" in resume["null_reasons"]


@pytest.mark.slow
def test_the_other_checks_report_their_figures(dry_run: tuple[dict, dict, str]) -> None:
    checks = dry_run[0]["checks"]
    ddp = checks["ddp"]
    assert ddp["backend"] == "gloo" and ddp["nccl"] is None and "nccl" in ddp["null_reasons"]
    assert ddp["nccl_attempt"]["ok"] is False  # NCCL without a GPU: the one-GPU fallback path ran
    assert len(ddp["losses_two_processes"]) == ddp["steps"] == len(ddp["losses_one_process"])
    assert all(math.isfinite(x) for x in ddp["losses_two_processes"])
    assert ddp["losses_two_processes"][0] == pytest.approx(ddp["losses_one_process"][0], rel=1e-5)

    labeler = checks["labeler"]["rows"]
    assert [r["sam"] for r in labeler] == ["tiny", "hq_tiny", "sam2_tiny"]  # SAM, HQ-SAM, SAM 2.1 stand-ins
    for r in labeler:
        assert r["loop_s"] > 0 and r["label_many_s"] > 0 and r["loop_over_label_many"] > 0
        assert all(b == r["max_boxes"] for per in r["boxes_per_image_and_prompt"] for b in per)

    predict = checks["predict"]["rows"]
    assert [r["mode"] for r in predict] == ["whole", "slide"]
    assert all(r["scores_finite"] and r["seconds"] > 0 and r["estimate_gb"] > 0 for r in predict)

    evaluate = checks["evaluate"]
    assert set(evaluate["splits"]) == {"val", "test"} and evaluate["label_agreement_vs_cpu"] == 1.0

    efficiency = checks["efficiency"]
    assert len(efficiency["sizes"]) == 2
    for size in efficiency["sizes"]:
        assert set(size["rows"]) == {"massformer", "mask2former"}
        assert size["time_ratio_massformer_over_mask2former"] > 0 and size["macs_ratio_massformer_over_mask2former"] > 0
    assert efficiency["mask2former_backward"]["grads_finite"]


def test_a_failing_check_is_recorded_and_the_others_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process, with stand-in checks: the error is recorded (type and message), the next check runs, and the
    exit code is 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)

    def broken(ctx: object) -> dict:
        raise ValueError("boom")

    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "train", broken)
    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "predict", lambda ctx: {"ok": True, "figure": float("nan")})
    out = tmp_path / "check.json"
    code = gpu_check.main(["--cpu", "--checks", "train", "predict", "--out", str(out), "--work-dir",
                           str(tmp_path / "work")])
    doc = json.loads(out.read_text())
    assert code == 1 and doc["ok"] is False and doc["failed"] == ["train"]
    assert doc["checks"]["train"]["error"]["type"] == "ValueError" and doc["checks"]["train"]["error"]["message"] == "boom"
    assert doc["checks"]["predict"] == {"ok": True, "figure": None, "seconds": doc["checks"]["predict"]["seconds"]}
