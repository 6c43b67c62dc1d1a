"""The installed distribution is one package, ``addclass``: built as a wheel and installed in a fresh virtual
environment it imports as ``addclass.flows`` and friends, ships the demo's base model, and claims none of the
generic names (``models``, ``tasks``, ``flows``, ...) a user's own project may have."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("cli", "flows", "tasks", "models", "storage", "common")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    (path,) = out.glob("addclass-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_and_the_demo_model(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"addclass"}, tops
    for folder in FOLDERS:
        assert f"addclass/{folder}/__init__.py" in names, folder
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert f"addclass/models/pretrained/demo_tiny_7class/{name}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "addclass = addclass.cli.main:console_main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_imports_as_addclass_and_shadows_no_user_package(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv with the wheel unpacked into its site-packages (its dependencies come from this
    environment's site-packages, added by a .pth file, whose own .pth files are not run: no editable install of
    the checkout leaks in)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    zipfile.ZipFile(wheel).extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib.util, addclass.flows.add_class, addclass.cli.main\n"
            "from addclass.models.pretrained import DEMO_BASE\n"
            "assert (DEMO_BASE / 'model.safetensors').is_file(), DEMO_BASE\n"
            f"assert addclass.flows.add_class.__file__.startswith({str(site)!r}), addclass.flows.add_class.__file__\n"
            f"print([n for n in {FOLDERS!r} if importlib.util.find_spec(n) is not None])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"  # `import models` (and the others) find nothing of addclass
