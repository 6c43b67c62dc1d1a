"""An in-process flow command killed from outside leaves nothing behind (flows/supervise.py): the temporary
Prefect server it started ends with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _group_members(pgid: int) -> list[str]:
    """Command lines of the live processes in process group `pgid`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and PR_SET_PDEATHSIG: Linux only")
@pytest.mark.timeout(300)
def test_sigkill_of_the_command_ends_its_prefect_server(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    subprocess.run([sys.executable, "-m", "addclass.cli.main", "ingest", "synthetic", str(store), "--images", "4", "--size",
                    "64", "80", "--quiet"], cwd=REPO, check=True, timeout=120)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    cmd = [sys.executable, "-c", "import sys; from addclass.cli.main import console_main; sys.exit(console_main())",
           "add-class", "--prompt", "car", "--store", str(store), "--labeler", "simulated", "--iters", "100000",
           "--crop-size", "64", "--points", "64", "--workers", "0", "--checkpoint-every", "100000"]
    supervisor = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        child = None
        while time.monotonic() < deadline:  # wait for the supervised child and its Prefect server
            kids = _children(supervisor.pid)
            child = kids[0] if kids else None
            if child is not None and any("uvicorn" in c for c in _group_members(child)):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Prefect server did not start; group: {child and _group_members(child)}")
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_members(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_members(child) == []  # the child, its server and everything else of the group are gone
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
