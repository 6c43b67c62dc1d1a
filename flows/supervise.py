"""Whatever an in-process flow command starts ends with it.

`addclass demo`, `add-class` and `retrain` run a flow in-process, and Prefect starts a temporary API server
(uvicorn) as a child process for it. Killed from outside (a timeout, SIGKILL, a closed terminal), the command
would leave that server behind, reparented to init. So on Linux the console script runs such a command as a
supervised child in its own process group:

- the supervisor (the process the user started) forwards SIGINT, SIGTERM and SIGHUP to the group, waits, and
  removes whatever is left of the group when the child ends;
- the child asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), and on SIGTERM ends its
  whole group (the server included) at once.

Elsewhere (or when ``ADDCLASS_SUPERVISE=0``) the command runs as is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

CHILD_ENV = "ADDCLASS_SUPERVISOR_PID"  # set in the child: the supervisor's pid
SWITCH_ENV = "ADDCLASS_SUPERVISE"
PR_SET_PDEATHSIG = 1
GRACE_S = 5.0


def supervise(argv: Sequence[str]) -> int | None:
    """In the user's process: run ``addclass ARGV`` as a supervised child; returns its exit code. In the child
    (or where supervision is off): arms the child's side and returns None, so the caller runs the command."""
    supervisor = os.environ.get(CHILD_ENV)
    if supervisor is not None:
        _arm_child(int(supervisor))
        return None
    if not sys.platform.startswith("linux") or os.environ.get(SWITCH_ENV) == "0":
        return None
    env = {**os.environ, CHILD_ENV: str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-m", "addclass.cli.main", *argv], env=env, start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        _signal_group(child.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        return child.wait()
    finally:
        _end_group(child.pid)


def _arm_child(supervisor: int) -> None:
    """Die with the supervisor, and take the process group down on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(os.getpgrp(), signal.SIGKILL))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # the supervisor died before the signal was armed
        os.killpg(os.getpgrp(), signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _end_group(pgid: int) -> None:
    """SIGTERM what is left of the child's group, then SIGKILL after `GRACE_S`."""
    import time

    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
