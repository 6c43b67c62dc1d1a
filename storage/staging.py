"""Build a folder next to its destination and swap it into place only when complete.

A failure (or kill -9) midway leaves the destination as it was; what remains is a hidden `.NAME.tmp-*` folder,
marked with the process that built it, which the next attempt removes once that process is gone. Used for new label stores (ingest) and for exports. `check_overwrite` and
`record_written` guard files written into a user's folder (predicted label PNGs): only what addclass wrote
there, and listed, is ever replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
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
    remove_dead_stagings(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
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
        (final / OWNER_FILE).unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


OWNER_FILE = ".addclass-staging.json"  # in a staging folder while it is built: the process building it


def remove_dead_stagings(final: Path) -> list[Path]:
    """Removes the staging folders of `final` that a killed process left beside it: those whose owner
    (`OWNER_FILE`) is a process of this host that no longer runs. Folders of live or other hosts' processes, and
    anything without an owner file (e.g. a ``.trash-*`` folder, which holds the replaced destination), are left
    alone. Returns what was removed."""
    removed = []
    for folder in final.parent.glob(f".{final.name}.tmp-*"):
        owner = _owner(folder)
        pid = owner.get("pid") if owner is not None else None
        if not isinstance(pid, int) or owner is None or owner.get("host") != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _owner(folder: Path) -> dict[str, object] | None:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


WRITTEN_MANIFEST = ".addclass-written.json"


def refuse_store_overlap(folder: Path, store_path: Path, *, what: str) -> None:
    """Refuses an output `folder` that is the label store, lies inside it or holds it.

    Raises:
        FileExistsError: naming `what` (the parameter), the folder and the store.
    """
    here, src = folder.resolve(), store_path.resolve()
    if here == src or src in here.parents or here in src.parents:
        raise FileExistsError(f"{what} {folder} is, holds or lies inside the label store {src}.")


def _listed(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / WRITTEN_MANIFEST).read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_overwrite(folder: Path, relpaths: Iterable[str], *, overwrite: bool, what: str) -> None:
    """Refuses, before anything is written, to replace a file in `folder`: always without `overwrite`, and
    with it unless addclass wrote that file there (it is listed in the folder's `WRITTEN_MANIFEST`).

    Raises:
        FileExistsError: naming the first such file.
    """
    existing = [r for r in relpaths if (folder / r).exists()]
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(f"{folder / existing[0]} exists ({len(existing)} of the {what} to write are there); "
                              f"pass --overwrite to replace {what} addclass wrote, or pick another folder.")
    listed = _listed(folder)
    foreign = [r for r in existing if r not in listed]
    if foreign:
        raise FileExistsError(f"{folder / foreign[0]} was not written by addclass ({len(foreign)} such files); "
                              f"--overwrite only replaces addclass's own {what}. Pick another folder.")


def record_written(folder: Path, relpaths: Iterable[str]) -> None:
    """Adds `relpaths` to `folder`'s `WRITTEN_MANIFEST` (atomic replace)."""
    paths = sorted(_listed(folder) | set(relpaths))
    tmp = folder / f"{WRITTEN_MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"paths": paths}) + "\n")
    os.replace(tmp, folder / WRITTEN_MANIFEST)
