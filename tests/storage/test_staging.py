"""Staged folders (storage/staging.py): a kill midway leaves the destination as it was, and the staging folder a
killed build left behind is removed by the next build, never one of a live process or one without an owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from addclass.storage.staging import OWNER_FILE, remove_dead_stagings, staged_dir

REPO = Path(__file__).resolve().parents[2]


def test_a_killed_build_leaves_the_destination_and_the_next_build_removes_its_staging(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    code = (f"import time; from pathlib import Path; from addclass.storage.staging import staged_dir\n"
            f"with staged_dir(Path({str(final)!r})) as tmp:\n"
            f"    (tmp / 'new.txt').write_text('new'); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = list(tmp_path.glob(".out.tmp-*"))
    assert len(left) == 1 and (left[0] / "new.txt").is_file()
    assert (final / "old.txt").read_text() == "old"  # the destination is untouched

    with staged_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not left[0].exists()  # the dead build's staging is gone
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]  # no owner file in the result
    assert list(tmp_path.glob(".out.tmp-*")) == []


def test_stagings_of_live_processes_and_without_owner_stay(tmp_path: Path) -> None:
    final = tmp_path / "out"
    live, unowned = tmp_path / ".out.tmp-live", tmp_path / ".out.tmp-none"
    live.mkdir()
    unowned.mkdir()
    import socket

    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    other_host = tmp_path / ".out.tmp-elsewhere"
    other_host.mkdir()
    (other_host / OWNER_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "another-machine"}))
    assert remove_dead_stagings(final) == []
    assert live.is_dir() and unowned.is_dir() and other_host.is_dir()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"pid": "x", "host": "%s"}', '{"host": "%s"}'])
def test_odd_owner_files_are_left_alone(tmp_path: Path, content: str) -> None:
    import socket

    folder = tmp_path / ".out.tmp-odd"
    folder.mkdir()
    (folder / OWNER_FILE).write_text(content.replace("%s", socket.gethostname()))
    assert remove_dead_stagings(tmp_path / "out") == []
    assert folder.is_dir()
