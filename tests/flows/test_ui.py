"""What a run shows in Prefect's UI (`flows.ui`), without an API: the training hook and its progress/log
throttling, the score table and log lines (formatted as in report.md), pictures as bounded data URIs, the
outputs and registry markdown, and the bridge of the `tasks` loggers to the run's logs."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from prefect.logging.handlers import APILogHandler

from addclass.flows import ui
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.training.train import StepInfo, TrainConfig, train
from tests.evaluations import class_result, model_evaluation, pseudo_evaluation


def step(n: int, iters: int = 300, *, total: float = 1.5, seconds: float = 0.5) -> StepInfo:
    return StepInfo(step=n, iters=iters, losses={"ce": total / 2, "mask": total / 2}, total=total, lr=3e-4,
                    seconds=seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_steps(progress: ui.TrainProgress, clock: Clock, steps: range, iters: int, dt: float) -> None:
    for n in steps:
        clock.now += dt
        progress(step(n, iters, seconds=dt))


# ---------------------------------------------------------------------------- training progress
def test_progress_logs_about_twenty_lines_and_throttles_the_artifact() -> None:
    clock, lines, published = Clock(), [], []
    progress = ui.TrainProgress(log=lines.append, publish=lambda p, d: published.append((clock.now, p, d)),
                                clock=clock)
    run_steps(progress, clock, range(1, 301), 300, dt=0.5)

    assert 20 <= len(lines) <= 22  # every 15 steps, plus the first
    assert lines[0].startswith("train 1/300 (0 %): loss 1.5000, lr 3.00e-04, 2.00 it/s, ETA 2m30s")
    assert lines[-1].startswith("train 300/300 (100 %)") and lines[-1].endswith("ETA 0s")
    assert "train 150/300 (50 %)" in "\n".join(lines) and "ETA 1m15s" in "\n".join(lines)
    times = [t for t, _, _ in published]
    percents = [p for _, p, _ in published]
    # at most every 2 s and every 1 % (the last step is always reported)
    assert all(b - a >= 2.0 for a, b in zip(times[:-2], times[1:-1], strict=True))
    assert all(b - a >= 1.0 for a, b in zip(percents[:-2], percents[1:-1], strict=True))
    assert 60 <= len(published) <= 76 and percents[-1] == 100.0
    assert published[0][2].startswith("Training step 1/300, loss 1.5000, ETA 2m30s")
    assert published[-1][2] == "Training done: 300 steps, last loss 1.5000"
    before = len(published)
    progress.finish(300)  # already at 100 %: nothing more
    assert len(published) == before


def test_progress_of_a_resumed_run_counts_its_own_steps() -> None:
    clock, lines = Clock(), []
    progress = ui.TrainProgress(log=lines.append, clock=clock)
    run_steps(progress, clock, range(201, 211), 300, dt=2.0)  # resumed at step 200, 0.5 it/s
    assert lines[0].startswith("train 201/300 (67 %)") and "0.50 it/s, ETA 3m18s" in lines[0]
    assert progress.rate(progress.last, clock.now) == pytest.approx(0.5)  # type: ignore[arg-type]
    assert progress.eta(progress.last, clock.now) == pytest.approx(180.0)  # type: ignore[arg-type]


def test_short_runs_log_every_step_and_a_done_run_still_reaches_100_percent() -> None:
    clock, lines, published = Clock(), [], []
    progress = ui.TrainProgress(log=lines.append, publish=lambda p, d: published.append(p), clock=clock)
    run_steps(progress, clock, range(1, 4), 3, dt=0.1)
    assert [line.split(" (")[0] for line in lines] == ["train 1/3", "train 2/3", "train 3/3"]
    assert published == [pytest.approx(100 / 3), 100.0]  # step 2 came 0.1 s after step 1
    done: list[float] = []
    nothing_to_do = ui.TrainProgress(log=lines.append, publish=lambda p, d: done.append(p), clock=clock)
    nothing_to_do.finish(3)  # a rerun of a finished run makes no step
    assert done == [100.0]


def test_a_failing_artifact_update_is_logged_once_and_training_goes_on() -> None:
    clock, lines, calls = Clock(), [], []

    def publish(percent: float, description: str) -> None:
        calls.append(percent)
        raise RuntimeError("API down")

    progress = ui.TrainProgress(log=lines.append, publish=publish, clock=clock)
    run_steps(progress, clock, range(1, 101), 100, dt=3.0)
    assert len(calls) == 1
    assert sum("progress artifact not updated (RuntimeError: API down)" in line for line in lines) == 1


def test_train_calls_the_hook_after_every_step_and_a_resume_only_for_new_steps(tmp_path: Path) -> None:
    store = ingest_synthetic(tmp_path / "s.zarr", images=4, size=(64, 96), seed=3, progress=False)
    config = TrainConfig(store=str(store), out_dir=str(tmp_path / "run"), version="v1", variant="tiny",
                         iters=3, batch_size=2, crop_size=(64, 64), num_points=64, checkpoint_every=2,
                         keep_checkpoints=0, seed=0, device="cpu", num_workers=0, val_every=0)
    seen: list[StepInfo] = []

    def stop_after_two(info: StepInfo) -> None:
        seen.append(info)
        if info.step == 2:  # after step 2's checkpoint: an exception from the hook stops the run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, on_step=stop_after_two)
    train(config, resume=True, progress=False, on_step=seen.append)

    assert [(i.step, i.iters) for i in seen] == [(1, 3), (2, 3), (3, 3)]
    for info in seen:
        assert info.total == pytest.approx(sum(info.losses.values()), rel=1e-5)
        assert info.lr > 0 and info.seconds > 0 and set(info.losses) and "total" not in info.losses


# ---------------------------------------------------------------------------- names and formats
def test_keys_durations_and_plain_strings() -> None:
    assert ui.artifact_key("add-class", "traffic_light") == "add-class-traffic-light"
    assert ui.artifact_key("train-progress", "v2-Tiny-s0.i300") == "train-progress-v2-tiny-s0-i300"
    with pytest.raises(ValueError, match="artifact key"):
        ui.artifact_key("__")
    durations = [ui.format_duration(s) for s in (7.4, 232, 3725, float("nan"), -1)]
    assert durations == ["7s", "3m52s", "1h02m", "?", "?"]
    version = "".join(["v", "2"])
    copy = ui.plain_str(version)
    assert copy == version and copy is not version


RESULTS = {
    "model": model_evaluation({"test": (0.5, [class_result("car", 0.7, 0.3, 0.44444444)]),
                               "val": (0.770123456789012, [class_result("car", 0.882141234567891, 0.401234,
                                                                          0.559312)])},
                              num_images={"test": 5, "val": 4}),
    "pseudo": pseudo_evaluation({"car": {"val": class_result("car", 0.79, 0.35, 0.5)}}),
    "report": {"report.md": "/runs/x/report/report.md", "metrics.json": "/runs/x/report/metrics.json"},
}


def test_metrics_rows_are_formatted_as_in_the_report_with_both_sides_per_split() -> None:
    rows = ui.metrics_rows(RESULTS)
    assert [(r["Class"], r["Split"]) for r in rows] == [("car", "val"), ("car", "test")]
    assert rows[0] == {"Class": "car", "Split": "val", "Pseudo IoU (%)": "79.00", "Model IoU (%)": "88.21",
                       "Pseudo BIoU (%)": "35.00", "Model BIoU (%)": "40.12", "Pseudo BF1": "0.5000",
                       "Model BF1": "0.5593"}
    assert rows[1]["Pseudo IoU (%)"] == "n/a" and rows[1]["Model IoU (%)"] == "70.00"
    for row in rows:  # nothing with 15 digits
        assert all(re.fullmatch(r"n/a|\d+\.\d{2}|0\.\d{4}|[a-z]+", v) for v in row.values())


def test_score_lines_name_every_split_in_order() -> None:
    assert ui.score_lines(RESULTS) == [
        "val (4 images): car IoU 88.21 % BIoU 40.12 % BF1 0.5593 (pseudo labels IoU 79.00 %), "
        "7-class mIoU 77.01 %",
        "test (5 images): car IoU 70.00 % BIoU 30.00 % BF1 0.4444, 7-class mIoU 50.00 %",
    ]


# ---------------------------------------------------------------------------- pictures
def decode(uri: str) -> np.ndarray:
    head, data = uri.split(",", 1)
    assert re.fullmatch(r"data:image/(png|jpeg);base64", head)
    image = cv2.imdecode(np.frombuffer(base64.b64decode(data, validate=True), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


@pytest.fixture()
def report_dir(tmp_path: Path) -> Path:
    """A report folder with 6 noisy 4-panel overlays (4096 x 1024: they do not compress) and a plot."""
    rng = np.random.default_rng(0)
    (tmp_path / "overlays" / "car").mkdir(parents=True)
    for i in range(6):
        noise = rng.integers(0, 256, (1024, 4096, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "overlays" / "car" / f"worst_{i:02d}_img{i}.png"), noise)
    plot = np.full((324, 900, 3), 255, np.uint8)
    cv2.line(plot, (50, 300), (850, 30), (200, 120, 30), 2)
    cv2.imwrite(str(tmp_path / "learning_curve.png"), plot)
    return tmp_path


def test_report_pictures_become_bounded_data_uris(report_dir: Path) -> None:
    md = "# report\n\n![learning curve](learning_curve.png)\n" + "".join(
        f"\nworst `val/img{i}`\n\n![worst_{i:02d}](overlays/car/worst_{i:02d}_img{i}.png)\n" for i in range(6)
    ) + "\n![gone](overlays/car/missing.png)\n![web](https://example.org/a.png)\n"

    out = ui.embed_images(md, report_dir)

    uris = re.findall(r"!\[[^\]]*\]\((data:[^)]+)\)", out)
    assert len(uris) == 7
    assert all(len(u) <= ui.IMAGE_MAX_CHARS for u in uris) and sum(map(len, uris)) <= ui.IMAGES_MAX_CHARS
    assert len(out) <= 1_000_000
    images = [decode(u) for u in uris]
    assert uris[0].startswith("data:image/png") and images[0].shape == (324, 900, 3)  # the plot stays sharp
    for image in images[1:]:
        assert image.shape[1] <= ui.IMAGE_MAX_WIDTH
        assert image.shape[1] / image.shape[0] == pytest.approx(4, rel=0.02)  # the aspect ratio is kept
    assert f"*(picture gone not found: `{report_dir / 'overlays/car/missing.png'}`)*" in out
    assert "![web](https://example.org/a.png)" in out and "# report\n\n" in out and "worst `val/img5`" in out


def test_a_picture_that_cannot_fit_is_named_instead(report_dir: Path) -> None:
    path = report_dir / "overlays" / "car" / "worst_00_img0.png"
    assert ui.image_data_uri(path, max_chars=300) is None
    small = ui.image_data_uri(path, max_chars=40_000)
    assert small is not None and len(small) <= 40_000 and decode(small).shape[1] >= 160
    out = ui.embed_images("![w](overlays/car/worst_00_img0.png)", report_dir, max_total=300)
    assert out == f"*(picture w too large to embed: `{path}`)*"


# ---------------------------------------------------------------------------- outputs and registry
def test_outputs_markdown_lists_the_paths_on_disk() -> None:
    md = ui.outputs_markdown(run_dir="/runs/x", checkpoint="/runs/x/final", report=RESULTS["report"],
                             store="data/store.zarr", label_version="v2")
    for path in ("/runs/x", "/runs/x/final", "/runs/x/report/report.md", "/runs/x/report/metrics.json",
                 "/runs/x/train_log.jsonl", "data/store.zarr", "v2"):
        assert f"`{path}`" in md


def test_registry_markdown_says_what_was_decided_and_on_which_scores() -> None:
    reg = {"model_id": "v2-new", "score": 0.6, "champion": "v2-new", "promoted": True,
           "previous_champion": "v1-old", "previous_score": 0.5, "compared_on": ["precise"]}
    md = ui.registry_markdown(reg, promote="if-better", challenger_terms={"precise": 0.7, "car": 0.5},
                              champion_terms={"precise": 0.5})
    assert "**Promoted**: `v2-new` is the champion now (was `v1-old`)." in md
    assert "| 7-class mIoU | 70.00 | 50.00 | yes |" in md and "| car IoU | 50.00 | n/a |  |" in md
    assert "| **mean of the compared terms** | 70.00 | 50.00 | |" in md
    assert "Selection score (mean of all its terms): 60.00 % (previous champion: 50.00 %)" in md

    kept = {**reg, "champion": "v1-old", "promoted": False}
    md = ui.registry_markdown(kept, promote="never", challenger_terms={"precise": 0.7}, champion_terms={})
    assert "**Not promoted**: the champion stays `v1-old`." in md and "policy `never`" in md
    first = {"model_id": "v1-a", "score": 0.4, "champion": "v1-a", "promoted": True,
             "previous_champion": None, "previous_score": None, "compared_on": []}
    md = ui.registry_markdown(first, promote="if-better", challenger_terms={"precise": 0.4},
                              champion_terms={})
    assert "no champion to beat" in md and "(previous champion: n/a %)" in md


# ---------------------------------------------------------------------------- logs
def test_tasks_logs_reach_the_run_unless_prefect_already_sends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(APILogHandler, "emit", lambda self, record: sent.append(record.getMessage()))
    parent, child = logging.getLogger("uitest"), logging.getLogger("uitest.child")
    parent.setLevel(logging.INFO)
    try:
        with ui.logs_to_run("uitest"):
            child.info("step %d/%d", 5, 10)
        child.info("after")  # the bridge is gone
        assert sent == ["step 5/10"] and not parent.handlers

        own = APILogHandler()  # PREFECT_LOGGING_EXTRA_LOGGERS=uitest.child: the child sends its own
        child.addHandler(own)
        with ui.logs_to_run("uitest"):
            child.info("once")
        assert sent == ["step 5/10", "once"]

        parent.addHandler(own)  # PREFECT_LOGGING_EXTRA_LOGGERS=uitest: nothing added
        with ui.logs_to_run("uitest"):
            assert parent.handlers == [own]
    finally:
        parent.handlers.clear()
        child.handlers.clear()
        parent.setLevel(logging.NOTSET)
