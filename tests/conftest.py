"""Shared fixtures. Tests that need ../shared data skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

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
    from tasks.ingest import ingest_synthetic

    path = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
    ingest_synthetic(path, images=8, size=(96, 128), seed=3, progress=False)
    return path


@pytest.fixture()
def fresh_store(tmp_path: Path) -> Path:
    """A small synthetic store the test may modify."""
    from tasks.ingest import ingest_synthetic

    path = tmp_path / "fresh.zarr"
    ingest_synthetic(path, images=5, size=(64, 80), seed=5, progress=False)
    return path
