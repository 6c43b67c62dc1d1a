from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main


def test_cli_ingest_and_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.zarr"
    assert main(["ingest", "synthetic", str(store), "--images", "4", "--size", "40", "56", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert list(summary["versions"]) == ["v1"]
    assert summary["hand_masks"]["eval"] == {"car": {"test": 1}}
    assert main(["inspect", str(store)]) == 0
    assert "lineage v1" in capsys.readouterr().out


def test_cli_overlay_png(tmp_path: Path, synthetic_store: Path) -> None:
    from storage.store import open_label_store

    image_id = open_label_store(synthetic_store).image_ids("val")[0]
    out = tmp_path / "o.png"
    assert main(["inspect", str(synthetic_store), "--image", image_id, "--png", str(out)]) == 0
    import cv2

    assert cv2.imread(str(out)).shape == (96, 128 * 3, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/missing.zarr"], "No label store"),
        (["ingest", "camvid", "{tmp}/nothing", "{tmp}/x.zarr"], "Missing image folder"),
        (["inspect", "{store}", "--image", "nope", "--png", "{tmp}/o.png"], "Unknown image id 'nope'"),
        (["discard-draft", "{store}", "v1"], "'v1' of"),
        (["discard-draft", "{store}", "v9"], "No draft version 'v9'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, synthetic_store: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, store=synthetic_store) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("addclass: error:") and message in err and "Traceback" not in err
