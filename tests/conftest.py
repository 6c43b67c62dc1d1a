"""Shared fixtures. Tests that need ../shared data skip with a reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADDCLASS_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "data" / "camvid"

needs_camvid = pytest.mark.skipif(
    not (CAMVID / "train").is_dir(), reason=f"needs the CamVid sample from ../shared at {CAMVID} (not present)"
)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small read-only synthetic store (8 images of 96 x 128). Tests must not modify it."""
    from addclass.tasks.data.ingest import ingest_synthetic

    path = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
    ingest_synthetic(path, images=8, size=(96, 128), seed=3, progress=False)
    return path


@pytest.fixture()
def fresh_store(tmp_path: Path) -> Path:
    """A small synthetic store the test may modify."""
    from addclass.tasks.data.ingest import ingest_synthetic

    path = tmp_path / "fresh.zarr"
    ingest_synthetic(path, images=5, size=(64, 80), seed=5, progress=False)
    return path


# mypy takes about a minute of one core. When the session includes tests/test_static_checks.py::test_mypy, it
# starts at collection in the background at the lowest CPU priority, so it runs in the time the other tests
# leave idle (server starts, subprocess waits) and hardly slows them; test_mypy then waits for its result.
MYPY_KEY = pytest.StashKey[dict[str, Any]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(item.nodeid.endswith("test_static_checks.py::test_mypy") for item in session.items):
        return
    cache = tempfile.mkdtemp(prefix="addclass-mypy-")  # a fresh cache, as on CI
    proc = subprocess.Popen([sys.executable, "-m", "mypy", "--cache-dir", cache], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.nice(19))
    session.config.stash[MYPY_KEY] = {"proc": proc, "cache": cache}


def background_mypy(config: pytest.Config, *, timeout: float) -> tuple[int, str, str] | None:
    """(exit code, stdout, stderr) of the background mypy, waiting for it; None when none was started."""
    started = config.stash.get(MYPY_KEY, None)
    if started is None:
        return None
    out, err = started["proc"].communicate(timeout=timeout)
    return started["proc"].returncode, out, err


def pytest_sessionfinish(session: pytest.Session) -> None:
    started = session.config.stash.get(MYPY_KEY, None)
    if started is not None:
        if started["proc"].poll() is None:  # the session stopped before test_mypy (-x, a deselection)
            started["proc"].kill()
            started["proc"].wait()
        shutil.rmtree(started["cache"], ignore_errors=True)
