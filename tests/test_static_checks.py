"""Static checks, run by the test suite because CI runs only the README's test command.

Their configuration is in pyproject.toml (`[tool.ruff.lint]`, `[tool.mypy]`): ruff's pyflakes, import order,
bugbear and pyupgrade rules over the whole tree; mypy over the packages and bench/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import background_mypy

REPO = Path(__file__).resolve().parents[1]


def _check(*args: str, timeout: float) -> None:
    p = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"


def test_ruff() -> None:
    _check("ruff", "check", "--no-cache", ".", timeout=120)


@pytest.mark.slow
def test_mypy(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    # a fresh cache each time, as on CI: a stale one from another mypy version can hide errors. Started in the
    # background at collection when the session includes this test (tests/conftest.py).
    result = background_mypy(pytestconfig, timeout=600)
    if result is None:
        _check("mypy", "--cache-dir", str(tmp_path / "mypy_cache"), timeout=600)
        return
    code, out, err = result
    assert code == 0, f"mypy exited {code}:\n{out[-6000:]}\n{err[-2000:]}"
