"""The project's error type: `UserError` is what the user caused (a parameter, a file, a store, a checkpoint, a
machine too small), with a message that names the culprit; the `addclass` CLI prints it on one line and exits 2.
Every other exception is a bug or an environment failure and keeps its traceback.

Each concrete type also derives from the built-in exception a caller would expect (``except ValueError`` still
catches a bad parameter), so the API stays idiomatic Python.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave or asked for is wrong; the message names it and says what to do."""


class InputError(UserError, ValueError):
    """A bad parameter value or a malformed input file."""


class UnknownNameError(UserError, KeyError):
    """A name that does not exist: a class, a label version, an image id, a model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StateError(UserError, RuntimeError):
    """The store or a run is in a state the request does not fit (another writer, an unfinished step)."""


class InsufficientMemoryError(UserError, MemoryError):
    """The request cannot fit in the device's memory."""
