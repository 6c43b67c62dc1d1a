"""Crash injection for kill -9 tests: a Python preamble that makes a subprocess SIGKILL itself mid-work."""

from __future__ import annotations


def die_after_writes(module: str, function: str, n: int) -> str:
    """Source that patches `module.function` so the process kills itself (-9) right after its `n`-th call."""
    return f"""
import os, signal
import {module} as _m
_real, _calls = _m.{function}, [0]
def _dying(*a, **k):
    out = _real(*a, **k)
    _calls[0] += 1
    if _calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
_m.{function} = _dying
"""
