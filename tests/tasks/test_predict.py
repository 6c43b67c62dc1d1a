"""`addclass predict` (tasks/prediction/predict.py): label PNGs of new images from a trained model, in every mode."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config
from addclass.tasks.prediction.predict import PredictConfig, find_images, image_scores, predict_images
from addclass.tasks.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from addclass.tasks.data.ingest import ingest_synthetic

    root = tmp_path_factory.mktemp("predict")
    store = root / "s.zarr"
    ingest_synthetic(store, images=4, size=(64, 80), seed=1, progress=False)
    cfg = TrainConfig(store=str(store), out_dir=str(root / "run"), variant="tiny", iters=2, batch_size=2,
                      crop_size=(64, 64), num_points=64, num_workers=0, device="cpu", val_every=0)
    return train(cfg, progress=False)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "a.jpg"), rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "sub" / "b.png"), rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    return folder


def test_whole_mode_writes_palette_pngs_of_class_ids_and_resumes(model_dir: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = predict_images(model_dir, [images], out)
    assert len(res["written"]) == 2 and res["failed"] == {} and res["skipped"] == []
    model = load_trained_model(model_dir)
    ids = read_model_config(model_dir)["store_class_ids"]
    with Image.open(out / "a.png") as im:
        assert im.mode == "P" and im.size == (90, 70)
        labels = np.asarray(im)
    rgb = cv2.cvtColor(cv2.imread(str(images / "a.jpg")), cv2.COLOR_BGR2RGB)
    expected = model.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0].numpy()
    assert (labels == np.array(ids, np.uint8)[expected]).mean() > 0.999  # the model's own prediction
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["id"] for c in classes] == ids
    again = predict_images(model_dir, [images], out)
    assert again["written"] == [] and len(again["skipped"]) == 2  # a rerun resumes
    forced = predict_images(model_dir, [images], out, config=PredictConfig(overwrite=True))
    assert len(forced["written"]) == 2


def test_slide_and_tta_give_normalised_scores_of_the_image_size(model_dir: Path) -> None:
    model = load_trained_model(model_dir)
    image = np.random.default_rng(1).integers(0, 255, (72, 100, 3), dtype=np.uint8)
    whole = image_scores(model, image, PredictConfig(mode="whole"))
    big_window = image_scores(model, image, PredictConfig(mode="slide", window=128))  # one tile: same as whole
    torch.testing.assert_close(whole, big_window)
    auto = image_scores(model, image, PredictConfig())  # the model's own tiles (its training crop)
    window = model.default_window(image.shape[:2])
    assert model.test_window == 64 and window == 64  # the run's 64 x 64 crops (TrainConfig.test_window None)
    expected = model.sliding_probs(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), window=64)[0]
    torch.testing.assert_close(auto, expected / expected.sum(0, keepdim=True))
    for cfg in (PredictConfig(mode="slide", window=48, stride=32), PredictConfig(tta=True, tta_scales=(0.75, 1.0))):
        scores = image_scores(model, image, cfg)
        assert scores.shape == (model.num_classes, 72, 100)
        torch.testing.assert_close(scores.sum(0), torch.ones(72, 100))


def test_a_bad_image_is_named_and_the_others_go_on(model_dir: Path, images: Path, tmp_path: Path) -> None:
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"mine")  # a file predict did not write is never replaced
    res = predict_images(model_dir, [images], out, config=PredictConfig(overlays=True, scores=True))
    assert set(res["failed"]) == {str((images / "broken.jpg").resolve()), str((images / "a.jpg").resolve())}
    assert "Cannot decode image" in res["failed"][str((images / "broken.jpg").resolve())]
    assert (out / "a.png").read_bytes() == b"mine"
    assert (out / "b.png").is_file() and (out / "overlays" / "b.jpg").is_file()
    scores = np.load(out / "scores" / "b.npz")["scores"]
    assert scores.dtype == np.uint8 and scores.shape[1:] == (50, 60)


def test_inputs_are_files_folders_or_globs(images: Path, tmp_path: Path) -> None:
    assert [p.name for p in find_images([images])] == ["a.jpg", "b.png"]
    assert [p.name for p in find_images([str(images / "**" / "*.png")])] == ["b.png"]
    assert [p.name for p in find_images([images / "a.jpg", images])] == ["a.jpg", "b.png"]  # once each
    with pytest.raises(FileNotFoundError, match="No image at .*nothing"):
        find_images([tmp_path / "nothing"])
    cv2.imwrite(str(images / "sub" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png would both write a\.png"):
        find_images([images])


@pytest.mark.parametrize("config", [PredictConfig(), PredictConfig(mode="slide", window=256, stride=192),
                                    PredictConfig(tta=True, tta_scales=(0.5, 1.0)),
                                    PredictConfig(mode="slide", window=256, tta=True, tta_scales=(1.0,))],
                         ids=["whole", "slide", "tta", "slide-tta"])
def test_every_mode_labels_odd_sizes_at_the_input_size(model_dir: Path, tmp_path: Path, config: PredictConfig) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    # odd on both sides, and wider than the sliding window (256), so "slide" takes several windows
    cv2.imwrite(str(folder / "odd.png"), np.random.default_rng(2).integers(0, 255, (131, 385, 3), dtype=np.uint8))
    res = predict_images(model_dir, [folder], tmp_path / "out", config=config)
    assert res["failed"] == {}
    with Image.open(tmp_path / "out" / "odd.png") as im:
        assert im.size == (385, 131)
        assert set(np.unique(np.asarray(im))) <= set(read_model_config(model_dir)["store_class_ids"])


def test_flip_tta_of_a_mirror_symmetric_image_is_mirror_symmetric(model_dir: Path) -> None:
    model = load_trained_model(model_dir)
    half = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 64 x 96, left-right symmetric
    scores = image_scores(model, image, PredictConfig(tta=True, tta_scales=(1.0,)))
    torch.testing.assert_close(scores, scores.flip(-1))


def test_predictions_score_with_evaluate_masks(model_dir: Path, images: Path, tmp_path: Path) -> None:
    from addclass.tasks.evaluation.evaluate_masks import evaluate_mask_folders

    out = tmp_path / "out"
    predict_images(model_dir, [images], out)
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("a", "b"):
        with Image.open(out / f"{name}.png") as im:
            cv2.imwrite(str(gt / f"{name}.png"), np.asarray(im))  # the same ids, as a grey PNG
    res = evaluate_mask_folders(out, gt, num_classes=8)
    assert res["means"]["aAcc"] == 1.0  # palette indices read as class ids, not colours


def test_cli_predict_exit_codes(model_dir: Path, images: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from addclass.cli.main import main

    out = tmp_path / "out"
    assert main(["predict", str(model_dir.parent), str(images), "--out", str(out), "--quiet"]) == 0
    assert "2 predicted, 0 already done, 0 failed" in capsys.readouterr().out
    (images / "broken.jpg").write_bytes(b"\xff\xd8 cut")
    assert main(["predict", str(model_dir), str(images), "--out", str(out), "--quiet"]) == 1  # named, not fatal
    captured = capsys.readouterr()
    assert "0 predicted, 2 already done, 1 failed" in captured.out and "broken.jpg: Cannot decode" in captured.err
    assert main(["predict", "champion", str(images), "--out", str(out)]) == 2
    assert "needs --store" in capsys.readouterr().err


def test_whole_images_that_would_not_fit_are_refused_before_any_prediction(
        model_dir: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import addclass.tasks.prediction.predict_memory as pm

    big = tmp_path / "big"
    big.mkdir()
    cv2.imwrite(str(big / "wide.png"), np.zeros((300, 2000, 3), np.uint8))
    cv2.imwrite(str(big / "small.png"), np.zeros((40, 50, 3), np.uint8))
    whole = pm.estimate_predict_bytes(variant="tiny", height=300, width=2000, num_classes=7, scale=1.0, window=None)
    tiled = pm.estimate_predict_bytes(variant="tiny", height=300, width=2000, num_classes=7, scale=1.0, window=128)
    assert tiled < whole
    monkeypatch.setattr(pm, "available_bytes", lambda device: (whole + tiled) // 2)
    with pytest.raises(MemoryError, match=r"wide\.png \(2000x300\) with tiny in whole mode .* use --mode slide"):
        predict_images(model_dir, [big], tmp_path / "out", config=PredictConfig(mode="whole"))
    assert not (tmp_path / "out").exists()  # refused before anything was written
    res = predict_images(model_dir, [big], tmp_path / "out", config=PredictConfig(mode="slide", window=128))
    assert len(res["written"]) == 2
    monkeypatch.setenv("ADDCLASS_MEMORY_CHECK", "0")  # the user's override
    assert len(predict_images(model_dir, [big], tmp_path / "out2", config=PredictConfig(mode="whole"))["written"]) == 2
