"""An exclusive, crash-safe writer lock for a label store.

`fcntl.flock` locks are released by the kernel when the holding process dies (kill -9 included), so a crashed
writer never leaves a stale lock behind. The lock file also records who holds it, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from addclass.common.errors import StateError

LOCK_NAME = ".addclass.lock"


class StoreLockedError(StateError):
    """Another process is writing the store."""


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('purpose') or 'unknown purpose'})"


@contextmanager
def store_lock(
    store_path: str | os.PathLike[str],
    *,
    wait: bool = False,
    timeout: float | None = None,
    purpose: str = "",
) -> Iterator[None]:
    """Hold the exclusive writer lock of the store at `store_path`.

    Args:
        store_path: the store directory (must exist).
        wait: if False, fail at once when another process holds the lock; if True, wait for it.
        timeout: with `wait=True`, the most seconds to wait (None: forever).
        purpose: a short text shown to a second writer ("merge v2", "add-class car", ...).

    Raises:
        StoreLockedError: the lock is held elsewhere (and `wait` is False or `timeout` passed).
    """
    lock_path = Path(store_path) / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() >= deadline):
                    raise StoreLockedError(
                        f"Store {os.fspath(store_path)!r} is locked by {_holder(lock_path)}. "
                        "Wait for it to finish (or pass wait=True / --wait)."
                    ) from None
                time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "argv": sys.argv[:4]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
