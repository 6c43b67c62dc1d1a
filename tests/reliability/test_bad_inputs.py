"""Bad inputs, as data: each case is a command line that must fail with one line naming the culprit (exit 2, no
traceback) and leave the label store byte-identical (v1 and every published version).

The cases are the hostile run's findings that the narrower tests of each stage do not already cover through the
CLI; add a row for every new refusal.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from addclass.cli.main import main


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # formatted with {store}, {run}, {tmp}, {files}
    culprit: str  # the message must contain it (a file, a parameter, an image id)


SMALL_TRAIN = "--variant tiny --device cpu --iters 1 --batch-size 2 --crop-size 64 --points 64 --quiet"
CASES = [
    Case("backbone checkpoint is garbage",
         f"train {{store}} {SMALL_TRAIN} --backbone-checkpoint {{files}}/garbage.pth --out {{tmp}}/r",
         "garbage.pth"),
    Case("backbone checkpoint with no matching tensor",
         f"train {{store}} {SMALL_TRAIN} --backbone-checkpoint {{files}}/foreign.pth --out {{tmp}}/r",
         "No tensor of"),
    Case("run whose final model lost its weights",
         "evaluate {store} --checkpoint {files}/damaged_run --out {tmp}/report --quiet",
         "final/model.safetensors is missing"),
    Case("evaluate-masks prediction outside the classes",
         "evaluate-masks --pred {files}/pred --gt {files}/gt --num-classes 3 --quiet",
         "a.png' holds values [9]"),
    Case("evaluate-masks ground truth outside the classes",
         "evaluate-masks --pred {files}/gt --gt {files}/pred --num-classes 3 --quiet",
         "holds values [9]"),
    Case("training run too big for the machine",
         "train {store} --variant r50 --batch-size 64 --crop-size 4096 --device cpu --out {tmp}/r --quiet",
         "--batch-size"),
    Case("init model that is not a model",
         f"train {{store}} {SMALL_TRAIN} --init-model {{files}} --out {{tmp}}/r", "is not a trained model folder"),
]


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes (the store's lock file excluded: it is not data)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store with v1 (precise) and v2 (car merged), a trained run, and the bad files of the cases."""
    root = tmp_path_factory.mktemp("reliability")
    store, run, files = root / "s.zarr", root / "run", root / "files"
    assert main(["ingest", "synthetic", str(store), "--images", "6", "--size", "64", "80", "--quiet"]) == 0
    assert main(["pseudo-label", str(store), "--prompt", "car", "--labeler", "simulated", "--quiet"]) == 0
    assert main(["merge", str(store), "--classes", "car", "--allow-partial", "--quiet"]) == 0
    assert main(["train", str(store), *SMALL_TRAIN.split(), "--out", str(run)]) == 0
    files.mkdir()
    (files / "garbage.pth").write_bytes(b"\x80\x04not a pickle at all")
    torch.save({"foo.weight": torch.zeros(3)}, files / "foreign.pth")
    shutil.copytree(run, files / "damaged_run")
    (files / "damaged_run" / "final" / "model.safetensors").unlink()
    for folder, value in (("pred", 9), ("gt", 1)):
        (files / folder).mkdir()
        cv2.imwrite(str(files / folder / "a.png"), np.full((4, 4), value, np.uint8))
    return {"store": store, "run": run, "files": files}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit_and_loses_nothing(
    case: Case, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(world["store"])
    argv = case.argv.format(store=world["store"], run=world["run"], files=world["files"], tmp=tmp_path).split()
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("addclass: error:") and "Traceback" not in err, err
    assert case.culprit in err, err
    assert tree_digest(world["store"]) == before
