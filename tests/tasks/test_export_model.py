"""Model export: ONNX and torch.export agree with PyTorch at sizes that are not multiples of 256, the sidecar,
and the refusals (an existing output, a missing model folder).

One tiny model, trained for 2 steps on 64 x 64 crops of 3 synthetic scenes, is shared by the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.model_files.export_model import DEFAULT_ATOL, export_model, load_exported, sidecar_path
from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config
from addclass.tasks.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    store = ingest_synthetic(root / "scenes.zarr", images=3, size=(96, 128), seed=0, progress=False)
    config = TrainConfig(
        store=str(store), out_dir=str(root / "run"), variant="tiny", iters=2, batch_size=2, crop_size=(64, 64),
        num_points=64, num_workers=0, device="cpu", val_every=0, seed=0,
    )
    return train(config, progress=False).parent  # the run folder; export_model finds its final/


# torch-export: ~30 s to export the tiny model and ~20 s to load the .pt2 (sympy parses its symbolic shapes)
@pytest.mark.parametrize(
    "format, suffix", [("onnx", ".onnx"), pytest.param("torch-export", ".pt2", marks=pytest.mark.slow)]
)
def test_export_matches_pytorch(run_dir: Path, tmp_path: Path, format: str, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    info = export_model(run_dir, out, format=format)  # type: ignore[arg-type]

    assert out.is_file() and Path(info["sidecar"]) == sidecar_path(out)
    sidecar = json.loads(sidecar_path(out).read_text())
    config = read_model_config(run_dir / "final")
    assert sidecar["class_names"] == config["class_names"]
    assert sidecar["store_class_ids"] == config["store_class_ids"]
    assert sidecar["format"] == format and sidecar["torch_version"] == torch.__version__
    checks = sidecar["verification"]["checks"]
    assert len({tuple(c["shape"][2:]) for c in checks}) == 2
    assert all(c["max_abs_diff"] < DEFAULT_ATOL for c in checks)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left

    if format == "onnx":  # an independent run at a third size, batch 2 (a .pt2 takes ~20 s more to load)
        model = load_trained_model(run_dir)
        images = torch.rand(2, 3, 200, 520, generator=torch.Generator().manual_seed(3)) * 255
        expected = model.semantic_probs(images, scale=1.0)
        got = load_exported(out, format="onnx")(images)
        assert got.shape == expected.shape == (2, model.num_classes, 200, 520)
        assert float((got - expected).abs().max()) < DEFAULT_ATOL


def test_refuses_existing_output(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(run_dir, out, format="onnx")
    assert out.read_bytes() == b"keep me"

    sidecar_path(out).write_text("{}")
    out.unlink()
    with pytest.raises(FileExistsError, match=str(sidecar_path(out))):
        export_model(run_dir, out, format="onnx")


def test_missing_model_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        export_model(missing, tmp_path / "model.onnx", format="onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_unknown_format_is_an_input_error(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torchscript"):
        export_model(run_dir, tmp_path / "model.pt", format="torchscript")  # type: ignore[arg-type]


def test_cli_export_model(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from addclass.cli.main import main

    out = tmp_path / "m.onnx"
    assert main(["export-model", str(run_dir), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "onnx" and out.is_file()
    assert main(["export-model", str(run_dir), str(out)]) == 2  # never replaced without --overwrite
    assert "overwrite" in capsys.readouterr().err
