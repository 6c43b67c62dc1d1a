"""Build a folder next to its destination and swap it into place only when complete.

A failure (or kill -9) midway leaves the destination as it was; what remains is a hidden `.NAME.tmp-*` folder
that the next attempt ignores. Used for new label stores (ingest) and for exports.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path


@contextmanager
def staged_dir(final: Path, *, guard: Callable[[], AbstractContextManager[object]] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` (which may exist).

    Args:
        final: the destination folder.
        guard: a context manager held while the old `final` is moved away (e.g. the old store's lock).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            with (guard() if guard is not None else nullcontext()):
                os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
