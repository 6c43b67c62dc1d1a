"""What a flow run shows in Prefect's UI: training progress, scores, pictures, outputs, the registry decision.

The builders here are plain functions of the run's results (tested without an API); the `publish_*` functions
and `ProgressArtifact` hand their output to Prefect's artifact API. The UI serves artifacts, not the
worker's files, so pictures travel inside the markdown as downscaled data URIs (``report.md`` on disk keeps
its relative links, which work there).
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging.handlers import APILogHandler

from addclass.tasks.evaluation.evaluate import SPLIT_ORDER
from addclass.tasks.evaluation.evaluation_results import ModelEvaluation, PseudoEvaluation
from addclass.tasks.evaluation.report import format_fraction, format_percent
from addclass.tasks.model_files.model_registry import list_models, score_terms
from addclass.tasks.training.train import StepInfo

log = logging.getLogger(__name__)

PROGRESS_LOG_LINES = 20  # log lines per training run (plus the first step and the last)
PROGRESS_MIN_SECONDS = 2.0  # artifact updates at most this often ...
PROGRESS_MIN_PERCENT = 1.0  # ... and only once the run moved on by this much
IMAGE_MAX_CHARS = 200_000  # one embedded picture (its data URI)
IMAGES_MAX_CHARS = 900_000  # all pictures of one markdown artifact: with the text, about 1 MB
IMAGE_MAX_WIDTH = 1200  # px; the UI's artifact pane is about that wide
_IMAGE_LINK = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")


# ---------------------------------------------------------------------------- names
def artifact_key(*parts: str) -> str:
    """An artifact key from free text: lowercase letters, digits and single dashes (Prefect's rule)."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    if not key:
        raise ValueError(f"Expected some letters or digits for an artifact key. Got {parts!r} instead.")
    return key


def plain_str(value: str) -> str:
    """A new string equal to ``value``.

    Prefect links a run's return value to that run by ``id()``; a task that receives the very object a subflow
    returned records the input as ``{"input_type": "flow_run"}``, which the UI cannot draw (blank task page).
    A copy is a plain value again. (One-character strings are shared by Python and cannot be copied.)
    """
    return value.encode().decode()


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``232`` -> ``"3m52s"``, ``7.4`` -> ``"7s"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


# ---------------------------------------------------------------------------- training progress
class TrainProgress:
    """The ``on_step`` hook of `tasks.training.train.train` in a flow: a log line every ``iters / lines`` steps (step,
    loss, lr, it/s, ETA) and a throttled progress report (percent, one-line description).

    Rates count the steps of this process only (a resumed run starts its clock at its first new step), on the
    wall clock, so validation and checkpoints are part of the ETA. A failing ``publish`` is logged once and
    then skipped: progress reporting never stops a training run.
    """

    def __init__(
        self,
        *,
        log: Callable[[str], None],
        publish: Callable[[float, str], None] | None = None,
        lines: int = PROGRESS_LOG_LINES,
        min_seconds: float = PROGRESS_MIN_SECONDS,
        min_percent: float = PROGRESS_MIN_PERCENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._publish, self._lines, self._clock = log, publish, max(1, lines), clock
        self._min_seconds, self._min_percent = min_seconds, min_percent
        self._t0 = math.nan  # when this process's first step began
        self._first = 0  # steps done before this process (a resume)
        self._published_at = -math.inf
        self._published_percent = -math.inf
        self.last: StepInfo | None = None

    def __call__(self, info: StepInfo) -> None:
        now = self._clock()
        if self.last is None:
            self._t0, self._first = now - info.seconds, info.step - 1
        self.last = info
        percent = 100.0 * info.step / info.iters
        every = max(1, math.ceil(info.iters / self._lines))
        if info.step % every == 0 or info.step == info.iters or info.step == self._first + 1:
            self._log(self.log_line(info, now))
        if info.step == info.iters or (now - self._published_at >= self._min_seconds
                                       and percent - self._published_percent >= self._min_percent):
            self._send(percent, self.description(info, now), now)

    def rate(self, info: StepInfo, now: float) -> float:
        """Steps per second in this process so far (NaN before the clock has moved)."""
        elapsed = now - self._t0
        return (info.step - self._first) / elapsed if elapsed > 0 else math.nan

    def eta(self, info: StepInfo, now: float) -> float:
        rate = self.rate(info, now)
        return (info.iters - info.step) / rate if rate > 0 else math.nan

    def log_line(self, info: StepInfo, now: float) -> str:
        """``train 15/300 (5 %): loss 2.3451, lr 2.91e-04, 1.23 it/s, ETA 3m52s``."""
        percent = 100 * info.step / info.iters
        return (f"train {info.step}/{info.iters} ({percent:.0f} %): loss {info.total:.4f}, lr {info.lr:.2e}, "
                f"{self.rate(info, now):.2f} it/s, ETA {format_duration(self.eta(info, now))}")

    def description(self, info: StepInfo, now: float) -> str:
        if info.step >= info.iters:
            return f"Training done: {info.iters} steps, last loss {info.total:.4f}"
        return (f"Training step {info.step}/{info.iters}, loss {info.total:.4f}, "
                f"ETA {format_duration(self.eta(info, now))}")

    def finish(self, iters: int) -> None:
        """Reports 100 % if no step did (a run that was already complete)."""
        if self._published_percent < 100.0:
            self._send(100.0, f"Training done: {iters} steps", self._clock())

    def _send(self, percent: float, description: str, now: float) -> None:
        self._published_at, self._published_percent = now, percent
        if self._publish is None:
            return
        try:
            self._publish(percent, description)
        except Exception as e:  # the UI is a view: a lost update must not cost the run
            self._log(f"progress artifact not updated ({type(e).__name__}: {e}); training goes on without it")
            self._publish = None


class ProgressArtifact:
    """A Prefect progress artifact, created on the first report and updated afterwards."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.artifact_id: Any = None

    def __call__(self, percent: float, description: str) -> None:
        percent = min(100.0, max(0.0, percent))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


@contextmanager
def logs_to_run(name: str = "addclass.tasks") -> Iterator[None]:
    """Sends the records of logger ``name`` (and its children) to the current run's logs in the API.

    The addclass CLI does that through ``PREFECT_LOGGING_EXTRA_LOGGERS=tasks``; a deployment's worker may not
    set it. Loggers that already have an API handler (that setting) are left alone, so nothing is sent twice.
    """
    source = logging.getLogger(name)
    if _has_api_handler(source, stop=None):
        yield
        return
    handler = _RunLogHandler(source)
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)


def _has_api_handler(logger: logging.Logger | None, *, stop: logging.Logger | None) -> bool:
    """Whether an API handler sees ``logger``'s records before they reach ``stop`` (None: the root)."""
    while logger is not None and logger is not stop:
        if any(isinstance(h, APILogHandler) and not isinstance(h, _RunLogHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


class _RunLogHandler(APILogHandler):
    def __init__(self, owner: logging.Logger) -> None:
        super().__init__()
        self._owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        if not _has_api_handler(logging.getLogger(record.name), stop=self._owner):  # a child's own handler
            super().emit(record)


# ---------------------------------------------------------------------------- scores
def _ordered(splits: Sequence[str] | Mapping[str, Any]) -> list[str]:
    return sorted(splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))


def _evaluations(results: Mapping[str, Any]) -> tuple[ModelEvaluation | None, PseudoEvaluation | None]:
    """(model, pseudo) of an evaluation's results (``{"model": ModelEvaluation, "pseudo": PseudoEvaluation}``;
    either may be missing or None)."""
    return results.get("model"), results.get("pseudo")


def metrics_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """The table artifact: per new class and split, pseudo labels and model side by side, formatted as in
    ``report.md`` (IoU and BIoU in % with 2 decimals, BF1 as a fraction; ``n/a`` where a side has no score,
    e.g. test, which is never pseudo-labelled)."""
    model, pseudo = _evaluations(results)
    model_splits = {} if model is None else model.splits
    pseudo_classes = {} if pseudo is None else pseudo.classes
    classes = [] if model is None else list(model.new_classes)
    classes += [c for c in pseudo_classes if c not in classes]
    rows = []
    for name in classes:
        splits = {s for s, r in model_splits.items() if name in r.new_classes}
        splits |= set(pseudo_classes.get(name, {}))
        for split in _ordered(list(splits)):
            p = pseudo_classes.get(name, {}).get(split)
            ps = None if p is None else p.scores
            m = model_splits[split].new_classes.get(name) if split in model_splits else None
            pi, pb, pf = (None, None, None) if ps is None else (ps.iou, ps.biou, ps.bf1)
            mi, mb, mf = (None, None, None) if m is None else (m.iou, m.biou, m.bf1)
            rows.append({
                "Class": name, "Split": split,
                "Pseudo IoU (%)": format_percent(pi), "Model IoU (%)": format_percent(mi),
                "Pseudo BIoU (%)": format_percent(pb), "Model BIoU (%)": format_percent(mb),
                "Pseudo BF1": format_fraction(pf), "Model BF1": format_fraction(mf),
            })
    return rows


def score_lines(results: Mapping[str, Any]) -> list[str]:
    """One log line per evaluated split: each new class (model, and pseudo labels where scored) and the
    7-class mIoU, e.g. ``val: car IoU 81.23 % BIoU 40.12 % BF1 0.5593 (pseudo labels IoU 79.00 %), 7-class
    mIoU 77.01 %``."""
    model, pseudo = _evaluations(results)
    if model is None:
        return []
    pseudo_classes = {} if pseudo is None else pseudo.classes
    lines = []
    for split in _ordered(model.splits):
        block = model.splits[split]
        parts = []
        for name, m in block.new_classes.items():
            part = f"{name} IoU {format_percent(m.iou)} % BIoU {format_percent(m.biou)} % BF1 {format_fraction(m.bf1)}"
            p = pseudo_classes.get(name, {}).get(split)
            if p is not None:
                part += f" (pseudo labels IoU {format_percent(p.scores.iou)} %)"
            parts.append(part)
        parts.append(f"7-class mIoU {format_percent(block.precise.miou)} %")
        lines.append(f"{split} ({block.num_images} images): " + ", ".join(parts))
    return lines


# ---------------------------------------------------------------------------- pictures
def image_data_uri(path: str | Path, *, max_chars: int = IMAGE_MAX_CHARS,
                   max_width: int = IMAGE_MAX_WIDTH) -> str | None:
    """The picture at ``path`` as a ``data:`` URI of at most ``max_chars`` characters: downscaled to
    ``max_width`` and further by 3/4 steps, as PNG (plots) or JPEG (photos), whichever fits first; None if
    even a 160 px wide JPEG does not fit or the file is not an image."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # H x W x 3 (BGR)
    if image is None:
        return None
    width = min(image.shape[1], max_width)
    while True:
        height = max(1, round(image.shape[0] * width / image.shape[1]))
        small = image if width == image.shape[1] else cv2.resize(image, (width, height),
                                                                 interpolation=cv2.INTER_AREA)
        for ext, params, mime in ((".png", [cv2.IMWRITE_PNG_COMPRESSION, 6], "image/png"),
                                  (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 85], "image/jpeg"),
                                  (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 70], "image/jpeg"),
                                  (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 55], "image/jpeg")):
            ok, buf = cv2.imencode(ext, small, params)
            if ok:
                uri = f"data:{mime};base64,{base64.b64encode(np.asarray(buf).tobytes()).decode('ascii')}"
                if len(uri) <= max_chars:
                    return uri
        if width <= 160:
            return None
        width = max(160, width * 3 // 4)


def embed_images(markdown: str, base_dir: str | Path, *, max_each: int = IMAGE_MAX_CHARS,
                 max_total: int = IMAGES_MAX_CHARS, max_width: int = IMAGE_MAX_WIDTH) -> str:
    """``markdown`` with its relative image links (``![alt](overlays/car/x.png)``) replaced by data URIs of
    the files under ``base_dir``, in order, each within ``max_each`` characters and all within ``max_total``
    (a fair share of what is left per remaining picture). A picture that is missing or does not fit becomes
    a line naming its file on disk."""
    links = [m for m in _IMAGE_LINK.finditer(markdown) if _is_relative(m["src"])]
    left = max_total
    out, pos = [], 0
    for i, m in enumerate(links):
        path = Path(base_dir) / m["src"]
        uri = image_data_uri(path, max_chars=min(max_each, left // (len(links) - i)), max_width=max_width)
        out.append(markdown[pos:m.start()])
        if uri is None:
            why = "not found" if not path.is_file() else "too large to embed"
            out.append(f"*(picture {m['alt'] or m['src']} {why}: `{path}`)*")
        else:
            left -= len(uri)
            out.append(f"![{m['alt']}]({uri})")
        pos = m.end()
    out.append(markdown[pos:])
    return "".join(out)


def _is_relative(src: str) -> bool:
    return not (src.startswith("/") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", src))


# ---------------------------------------------------------------------------- outputs and registry
def outputs_markdown(*, run_dir: str, checkpoint: str, report: Mapping[str, str], store: str,
                     label_version: str) -> str:
    """Where the run's files are on the worker's disk (the UI cannot serve them)."""
    rows = [("Run folder", run_dir), ("Model (load with `addclass predict --model`)", checkpoint),
            ("Report", report.get("report.md", "")), ("Metrics", report.get("metrics.json", "")),
            ("Training log", str(Path(run_dir) / "train_log.jsonl")), ("Store", store),
            ("Label version", label_version)]
    body = "\n".join(f"| {what} | `{path}` |" for what, path in rows if path)
    return f"# Outputs\n\nOn the worker's disk:\n\n| What | Path |\n|---|---|\n{body}\n"


def registry_markdown(reg: Mapping[str, Any], *, promote: str, challenger_terms: Mapping[str, float],
                      champion_terms: Mapping[str, float]) -> str:
    """The registry decision: promoted or not, and the validation scores that were compared.

    Args:
        reg: `tasks.model_files.model_registry.register_model`'s answer.
        promote: The policy (if-better, always, never).
        challenger_terms, champion_terms: `tasks.model_files.model_registry.score_terms` of both models (champion: the
            previous one; empty when there was none).
    """
    model_id, prev = reg["model_id"], reg.get("previous_champion")
    if reg["promoted"]:
        head = f"**Promoted**: `{model_id}` is the champion now"
        head += f" (was `{prev}`)." if prev and prev != model_id else "."
    else:
        head = f"**Not promoted**: the champion stays `{reg['champion']}`."
    compared = list(reg.get("compared_on") or [])
    why = {"always": "policy `always`", "never": "policy `never`"}.get(promote)
    if why is None:
        why = ("policy `if-better`: no champion to beat" if not prev
               else "policy `if-better`: the mean of the compared terms on val decides")
    lines = [f"# Model registry\n\n{head}\n\nDecision by {why}.\n"]
    names = [*challenger_terms] + [t for t in champion_terms if t not in challenger_terms]
    if names:
        lines.append(f"\n| Score on val (%) | `{model_id}` | `{prev or 'none'}` | compared |\n"
                     "|---|---:|---:|:---:|\n")
        for t in names:
            label = "7-class mIoU" if t == "precise" else f"{t} IoU"
            lines.append(f"| {label} | {format_percent(challenger_terms.get(t))} | "
                         f"{format_percent(champion_terms.get(t))} | {'yes' if t in compared else ''} |\n")
        if compared:
            lines.append(f"| **mean of the compared terms** | "
                         f"{format_percent(_mean(challenger_terms, compared))} | "
                         f"{format_percent(_mean(champion_terms, compared))} | |\n")
    lines.append(f"\nSelection score (mean of all its terms): {format_percent(reg.get('score'))} % "
                 f"(previous champion: {format_percent(reg.get('previous_score'))} %).\n")
    return "".join(lines)


def _mean(terms: Mapping[str, float], names: Sequence[str]) -> float | None:
    values = [terms[n] for n in names if n in terms]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- publishing
def publish_results(prefix: str, *, title: str, results: Mapping[str, Any], run_dir: str, checkpoint: str,
                    store: str, label_version: str) -> None:
    """The evaluation's artifacts: ``PREFIX-metrics`` (table), ``PREFIX-report`` (markdown, pictures
    embedded) and ``PREFIX-outputs`` (markdown: file paths)."""
    create_table_artifact(key=artifact_key(prefix, "metrics"), table=metrics_rows(results),
                          description=f"{title}: pseudo labels vs model against hand masks (IoU, BIoU in %)")
    report = Path(results["report"]["report.md"])
    create_markdown_artifact(key=artifact_key(prefix, "report"),
                             markdown=embed_images(report.read_text(), report.parent),
                             description=f"{title}: evaluation report (on disk: {report})")
    create_markdown_artifact(
        key=artifact_key(prefix, "outputs"),
        markdown=outputs_markdown(run_dir=run_dir, checkpoint=checkpoint, report=results["report"],
                                  store=store, label_version=label_version),
        description=f"{title}: run folder, report and model paths")


def publish_registry(prefix: str, *, store: str, reg: Mapping[str, Any], results: Mapping[str, Any],
                     promote: str) -> None:
    """The ``PREFIX-registry`` markdown artifact (`registry_markdown`)."""
    prev = reg.get("previous_champion")
    entry = (list_models(store) or {}).get("models", {}).get(prev) if prev else None
    champion_terms = score_terms(entry.get("metrics", {})) if entry else {}
    markdown = registry_markdown(reg, promote=promote, challenger_terms=score_terms(results["model"]),
                                 champion_terms=champion_terms)
    decision = "promoted" if reg["promoted"] else "not promoted"
    create_markdown_artifact(key=artifact_key(prefix, "registry"), markdown=markdown,
                             description=f"{decision}: {reg['model_id']}")
