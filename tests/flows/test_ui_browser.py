"""The add-class run as Prefect users watch it: a real server with its web UI on, the add-class deployment run
by a real worker on a tiny store, and the run's pages opened in headless Chromium (Debian's ``chromium``, driven
by Playwright). Checks what the UI shows, not what the API stores: the images of every artifact load, the train
task's page and the run's Task Runs tab list the tasks, the progress artifact reached 100 % and the metrics
table shows percentages.

``ADDCLASS_UI_SCREENSHOTS=DIR`` also saves the run page and the report artifact there (docs/ holds the ones
docs/pipeline.md shows).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium on the PATH: Debian's `chromium` "
                                                "(apt-get install chromium) is not installed"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (scripts/setup.sh installs it)")

@pytest.fixture(scope="module")
def finished_run(deployment_run: dict[str, Any]) -> dict[str, Any]:
    """The session's add-class deployment run, by a worker, on the server whose UI is on
    (tests/flows/conftest.py)."""
    assert deployment_run["flow_run"]["state"]["type"] == "COMPLETED", deployment_run["flow_run"]["state"]
    return deployment_run


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """One browser tab that records failed responses (status >= 400)."""

    def __init__(self, browser: Any, base: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.base = base
        self.failed: list[tuple[int, str]] = []
        self.page.on("response", lambda r: self.failed.append((r.status, r.url)) if r.status >= 400 else None)

    def open(self, path: str, *, tab: str | None = None, wait_for: str | None = None) -> str:
        """Opens ``path`` (and clicks ``tab``), waits until the network is idle and ``wait_for`` shows;
        returns the page's text."""
        self.page.goto(self.base + path)
        self.page.wait_for_load_state("networkidle")
        if tab is not None:
            self.page.get_by_text(tab, exact=True).first.click()
            self.page.wait_for_load_state("networkidle")
        if wait_for is not None:
            self.page.get_by_text(wait_for).first.wait_for(timeout=30_000)
        return str(self.page.inner_text("body"))

    def images(self) -> list[dict[str, Any]]:
        """Every <img> of the page: its source (abridged), whether it finished loading, its natural width."""
        return list(self.page.evaluate(
            "Array.from(document.images).map(i => ({src: i.src.slice(0, 80), complete: i.complete, "
            "width: i.naturalWidth}))"))

    def failed_beyond_prefect_icons(self) -> list[tuple[int, str]]:
        # the UI itself asks for /ico/undefined.svg on some pages (an icon name it lacks): not ours
        return [(s, u) for s, u in self.failed if "/ico/" not in u]

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def page(browser: Any, finished_run: dict[str, Any]) -> Iterator[Page]:
    p = Page(browser, finished_run["base"])
    yield p
    p.close()


def _task_run(finished_run: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(t for t in finished_run["task_runs"] if t["name"].startswith(prefix))


def test_run_page_and_task_runs_tab_list_the_tasks(page: Page, finished_run: dict[str, Any]) -> None:
    fr = finished_run["flow_run"]
    text = page.open(f"/runs/flow-run/{fr['id']}", tab="Task Runs", wait_for=_task_run(finished_run, "train")["name"])
    assert "No task runs" not in text
    for name in (_task_run(finished_run, "train")["name"], _task_run(finished_run, "evaluate")["name"]):
        assert name in text
    assert page.failed_beyond_prefect_icons() == []
    if os.environ.get("ADDCLASS_UI_SCREENSHOTS"):
        page.open(f"/runs/flow-run/{fr['id']}", wait_for="Completed")
        page.page.wait_for_timeout(3000)  # the timeline is drawn on a canvas after the page settles
        page.page.screenshot(path=str(Path(os.environ["ADDCLASS_UI_SCREENSHOTS"]) / "prefect_run_page.png"))


def test_train_task_page_shows_its_logs_and_inputs(page: Page, finished_run: dict[str, Any]) -> None:
    train = _task_run(finished_run, "train")
    text = page.open(f"/runs/task-run/{train['id']}", wait_for="100 %")
    assert re.search(r"train \d+/20 \(\d+ %\): loss [\d.]+, lr [\d.e+-]+, [\d.]+ it/s, ETA", text), text[-2000:]
    assert "val (" in text  # the periodic validation's scores
    text = page.open(f"/runs/task-run/{train['id']}", tab="Task inputs", wait_for='"config"')
    assert '"launch"' in text and "Invalid" not in text
    assert page.failed_beyond_prefect_icons() == []


def test_every_artifact_renders_with_its_images(page: Page, finished_run: dict[str, Any]) -> None:
    artifacts = finished_run["artifacts"]
    assert {"add-class-car-report", "add-class-car-metrics", "add-class-car-outputs",
            "add-class-car-registry"} <= set(artifacts)
    for key, artifact in artifacts.items():
        page.open(f"/artifacts/artifact/{artifact['id']}", wait_for=key)
        images = page.images()
        if key == "add-class-car-report":
            assert len(images) >= 2, images  # the learning curve and the worst image's overlay at least
            if os.environ.get("ADDCLASS_UI_SCREENSHOTS"):  # the scores' end of the report and its first picture
                page.page.locator("img").first.scroll_into_view_if_needed()
                page.page.screenshot(path=str(Path(os.environ["ADDCLASS_UI_SCREENSHOTS"]) / "prefect_report.png"))
        broken = [i for i in images if not i["complete"] or i["width"] == 0]
        assert broken == [], (key, broken)
    assert page.failed_beyond_prefect_icons() == []


def test_progress_artifact_reached_100_percent(page: Page, finished_run: dict[str, Any]) -> None:
    progress = [a for k, a in finished_run["artifacts"].items() if k.startswith("train-progress-")]
    assert len(progress) == 1 and progress[0]["data"] == 100
    text = page.open(f"/artifacts/artifact/{progress[0]['id']}", wait_for="Progress")
    assert "Progress: 100%" in text and "Training done: 20 steps" in text


def test_metrics_table_shows_percentages(page: Page, finished_run: dict[str, Any]) -> None:
    table = finished_run["artifacts"]["add-class-car-metrics"]
    text = page.open(f"/artifacts/artifact/{table['id']}", wait_for="Pseudo IoU (%)")
    assert "Model BIoU (%)" in text
    cells = re.findall(r"(?m)^\s*(\d+\.\d+|n/a)\s*$", text)
    assert cells and all(c == "n/a" or re.fullmatch(r"\d{1,3}\.\d{2,4}", c) for c in cells), cells
    assert not re.search(r"\d\.\d{6,}", text)  # no raw fractions with many digits
