"""Training: overfitting one image, exact resume after kill -9, checkpoint validation, config handling.

The store has 3 synthetic 256 x 256 scenes (1 train image) and a v2 where the exact car masks are a pseudo
class 7, so the inverse loss weights are exercised. 256 x 256 crops waste nothing (the model pads to
multiples of 256). The overfit test uses lr 5e-3 (~17x the recipe) and 512 points (MaSSFormer's default:
12544) to converge in few steps on the CPU, and the precise labels v1 (in v2 the cars leave only ~160 "others"
pixels in the training image, a class too small for a fair mIoU after a few dozen steps).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from addclass.models.metrics import MetricAccumulator
from addclass.models.training.optim import SCRATCH_RECIPE
from addclass.storage.registry import ClassInfo
from addclass.storage.store import open_label_store
from addclass.tasks.data.ingest import ingest_synthetic
from addclass.tasks.model_files.model_folder import (
    CheckpointError,
    build_model,
    init_from_model,
    load_trained_model,
    read_model_config,
    resolve_init_dir,
)
from addclass.tasks.training.dataset import LabelVersionDataset
from addclass.tasks.training.train import TrainConfig, model_config, resolve_train_config, run_name, train

REPO = Path(__file__).resolve().parents[2]
CAR = 7


@pytest.fixture(scope="module")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_train_store(tmp_path_factory.mktemp("train") / "scenes.zarr")


def make_train_store(path: Path) -> Path:
    """3 scenes of 256 x 256 (1 train); v2 adds the exact car masks as a pseudo class."""
    ingest_synthetic(path, images=3, size=(256, 256), seed=0, progress=False)
    st = open_label_store(path, mode="a")
    st.begin_version("v2", parent="v1", class_ids=list(range(8)), policy="test", spec={})
    for split in st.splits():
        kind = "eval" if split == "test" else "reference"
        for image_id in st.image_ids(split):
            labels = st.read_labels(split, image_id).copy()
            car = st.read_hand_mask(kind, "car", image_id).astype(bool)
            labels[car] = CAR
            st.write_version_labels("v2", split, image_id, labels, car.astype(np.uint8))
    st.publish_version("v2", new_classes=[ClassInfo(id=CAR, name="car", source="pseudo", prompt="car")])
    return path


def tiny_config(store: Path, out: Path, **overrides: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        store=str(store), out_dir=str(out), version="v2", variant="tiny", iters=3, batch_size=2,
        crop_size=(256, 256), scale_range=(0.75, 1.25), num_points=256, checkpoint_every=2,
        keep_checkpoints=0, seed=7, device="cpu", num_workers=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def straight_run(train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 uninterrupted steps (checkpoints at steps 2 and 3)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(train_store, out), progress=False)
    return out


@pytest.fixture(scope="module")
def straight_run_ema(train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `straight_run`, with a weight average."""
    out = tmp_path_factory.mktemp("straight_ema") / "run"
    train(tiny_config(train_store, out, ema_decay=0.9), progress=False)
    return out


def read_log(run: Path) -> list[dict[str, float]]:
    """The training lines of the log (validation lines hold "val" instead of "total")."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "total" in r]


def read_val_log(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "val" in r]


KILLER = """
import os, signal, sys
import addclass.tasks.training.train as tt
from addclass.tasks.training.train import TrainConfig, train

kill_at = int(sys.argv[2])
save = tt.save_checkpoint

def save_then_die(*args, **kwargs):
    folder = save(*args, **kwargs)
    if kwargs["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # right after the checkpoint and latest.json are written
    return folder

tt.save_checkpoint = save_then_die
train(TrainConfig.from_dict(__import__("json").loads(sys.argv[1])), progress=False)
"""


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["recipe", "weight-average"])
def test_resume_after_kill_matches_the_straight_run(
    train_store: Path, ema_decay: float | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    straight_run = request.getfixturevalue("straight_run" if ema_decay is None else "straight_run_ema")
    out = tmp_path / "run"
    config = tiny_config(train_store, out, ema_decay=ema_decay)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, json.dumps(config.to_dict()), "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert not (out / "final").exists()

    final = train(config, resume=True, progress=False)

    straight = load_file(straight_run / "final" / "model.safetensors")
    resumed = load_file(final / "model.safetensors")
    assert straight.keys() == resumed.keys()
    diff = max(float((straight[k].double() - resumed[k].double()).abs().max()) for k in straight)
    print(f"resume max |weight difference| = {diff:.3g}")
    assert diff <= 1e-6
    log, ref = read_log(out), read_log(straight_run)
    assert [r["step"] for r in log] == [1, 2, 3]
    for mine, theirs in zip(log, ref, strict=True):  # same losses step by step, incl. the step after the resume
        assert mine["total"] == pytest.approx(theirs["total"], rel=1e-5, abs=1e-6)
        assert mine["lr"] == pytest.approx(theirs["lr"])


def test_log_and_outputs(straight_run: Path) -> None:
    log = read_log(straight_run)
    assert [r["step"] for r in log] == [1, 2, 3]
    first = log[0]
    for key in ("lr", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_edge", "total", "seconds"):
        assert key in first and np.isfinite(first[key])
    terms = sum(v for k, v in first.items() if k.startswith("loss_"))
    assert first["total"] == pytest.approx(terms, rel=1e-5)
    # a random start takes the scratch recipe: its lr, no warm-up in 3 steps (10 % rounds to 0), then
    # per-iteration cosine: lr * 0.5 * (1 + cos(pi / 3))
    saved = json.loads((straight_run / "train_config.json").read_text())
    lr = SCRATCH_RECIPE.lr
    assert saved["recipe"] == "scratch" and saved["lr"] == lr and saved["backbone_lr_mult"] == 1.0
    assert saved["warmup_iters"] == 0 and saved["grad_clip"] == SCRATCH_RECIPE.grad_clip
    assert first["lr"] == pytest.approx(lr) and log[1]["lr"] == pytest.approx(lr * 0.75)
    # validation every step (10 per run, at least 1 step apart), drawn with the loss in learning_curve.png
    val = read_val_log(straight_run)
    assert saved["val_every"] == 1 and [r["step"] for r in val] == [1, 2, 3]
    for r in val:
        assert r["val"]["split"] == "val" and r["val"]["num_images"] == 1 and 0 <= r["val"]["miou7"] <= 1
        assert set(r["val"]["new_classes"]) == {"car"}
    assert (straight_run / "learning_curve.png").stat().st_size > 1000

    cfg = read_model_config(straight_run / "final")
    assert cfg["variant"] == "tiny" and cfg["num_classes"] == 8 and cfg["label_version"] == "v2"
    assert cfg["class_names"][CAR] == "car" and cfg["pseudo_classes"] == [CAR]
    assert json.loads((straight_run / "train_config.json").read_text())["num_classes"] == 8
    checkpoints = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]
    model = load_trained_model(straight_run)  # a run folder resolves to its final/
    assert model.num_classes == 8 and not model.training
    assert saved["ema_decay"] == SCRATCH_RECIPE.ema_decay == 0.0


def test_a_weight_average_is_what_checkpoints_and_final_hold(straight_run_ema: Path) -> None:
    """The training state keeps the trained weights a resume continues from."""
    assert json.loads((straight_run_ema / "train_config.json").read_text())["ema_decay"] == 0.9
    last = straight_run_ema / "checkpoints" / "step_00000003"
    kept = load_file(last / "model.safetensors")
    trained = torch.load(last / "training_state.pt", weights_only=True)["trained_weights"]
    final = load_file(straight_run_ema / "final" / "model.safetensors")
    assert kept.keys() == trained.keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in kept.items())
    assert any(not torch.equal(kept[k], trained[k]) for k in kept if kept[k].is_floating_point())


def test_corrupt_checkpoint_is_a_clear_error(straight_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    weights = run / "checkpoints" / "step_00000003" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    saved = json.loads((run / "train_config.json").read_text())
    config = TrainConfig.from_dict({**saved, "out_dir": str(run)})
    with pytest.raises(CheckpointError, match=str(weights)):
        train(config, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=str(weights)):
        load_trained_model(weights.parent)

    state = run / "checkpoints" / "step_00000002" / "training_state.pt"
    with open(state, "r+b") as f:
        f.truncate(100)
    (run / "latest.json").write_text(json.dumps({"step": 2, "path": "checkpoints/step_00000002"}))
    with pytest.raises(CheckpointError, match=str(state)):
        train(config, resume=True, progress=False)

    (run / "latest.json").write_text(json.dumps({"step": 9, "path": "checkpoints/step_00000009"}))
    with pytest.raises(CheckpointError, match="latest.json"):
        train(config, resume=True, progress=False)

    final = run / "final" / "model.safetensors"
    final.write_bytes(final.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=str(final)):
        load_trained_model(run)


def test_mismatched_checkpoint_is_a_clear_error(
    train_store: Path, straight_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    config_json = run / "checkpoints" / "step_00000003" / "config.json"
    base = tiny_config(train_store, run)
    variant = rf"(?s){config_json}.*variant: checkpoint 'tiny', this run 'lite_r18'"
    with pytest.raises(CheckpointError, match=variant):
        train(replace(base, variant="lite_r18"), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"(?s)num_classes: checkpoint 8, this run 7.*label_version"):
        train(replace(base, version="v1"), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"train_config.seed"):
        train(replace(base, seed=1), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(base, progress=False)


def test_config_validation_and_derivation(train_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size >= 2"):
        tiny_config(train_store, tmp_path, batch_size=1)
    with pytest.raises(ValueError, match="variant"):
        tiny_config(train_store, tmp_path, variant="r101")
    with pytest.raises(ValueError, match="reweight"):
        tiny_config(train_store, tmp_path, reweight="sideways")
    with pytest.raises(ValueError, match="seed >= 0"):
        tiny_config(train_store, tmp_path, seed=-1)
    with pytest.raises(ValueError, match="test_window >= 0"):
        tiny_config(train_store, tmp_path, test_window=-1)
    resolved = resolve_train_config(tiny_config(train_store, tmp_path, version="latest"))
    assert resolved.version == "v2" and resolved.num_classes == 8
    assert TrainConfig.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved
    with pytest.raises(ValueError, match="num_classes 8"):
        resolve_train_config(tiny_config(train_store, tmp_path, num_classes=9))


def test_a_version_with_a_class_id_gap_trains_on_model_indices(tmp_path: Path) -> None:
    """Store ids 0..6 and 8 (a name keeps one id store-wide): the dataset and the model use indices 0..7."""
    path = ingest_synthetic(tmp_path / "gap.zarr", images=3, size=(128, 128), seed=1, progress=False)
    st = open_label_store(path, mode="a")
    st.begin_version("v2", parent="v1", class_ids=[*range(7), 8], policy="test", spec={})
    car_masks = {}
    for split in st.splits():
        kind = "eval" if split == "test" else "reference"
        for image_id in st.image_ids(split):
            labels = st.read_labels(split, image_id).copy()
            car_masks[image_id] = car = st.read_hand_mask(kind, "car", image_id).astype(bool)
            labels[car] = 8
            st.write_version_labels("v2", split, image_id, labels, car.astype(np.uint8))
    st.publish_version("v2", new_classes=[ClassInfo(id=8, name="car", source="pseudo", prompt="car")])

    item = LabelVersionDataset(path, version="v2", augment=False)[0]
    assert car_masks[item["id"]].any() and int(item["labels"].max()) == CAR  # no 8 reaches the model
    assert torch.equal(item["labels"] == CAR, torch.from_numpy(car_masks[item["id"]]))
    config = resolve_train_config(tiny_config(path, tmp_path / "run", iters=2, crop_size=(128, 128)))
    cfg = model_config(config)
    assert config.num_classes == 8 and cfg["class_names"][CAR] == "car" and cfg["pseudo_classes"] == [CAR]
    assert cfg["store_class_ids"] == [*range(7), 8]
    assert cfg["test_window"] == 128  # None: the model predicts in tiles of its training crop
    assert model_config(replace(config, test_window=0))["test_window"] == 0
    assert cfg["test_ratios"] == [1.0]  # one scale unless asked
    config = replace(config, test_ratios=(1.0, 1.5))
    final = train(config, progress=False)
    model = load_trained_model(final)
    assert model.num_classes == 8 and model.test_window == 128 and model.test_ratios == (1.0, 1.5)


def test_a_non_finite_gradient_stops_before_the_update(train_store: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def inf_norm(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_norm)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="Non-finite gradient norm at step 1 .*not updated.*lower lr"):
        train(tiny_config(train_store, out, iters=2, checkpoint_every=1), progress=False)
    assert not (out / "latest.json").exists() and not (out / "checkpoints").exists()  # nothing bad was saved


def test_tiny_model_overfits_one_image(train_store: Path, tmp_path: Path) -> None:
    config = tiny_config(
        train_store, tmp_path / "run", version="v1", iters=50, lr=5e-3, num_points=512,
        scale_range=(1.0, 1.0), reweight="none", checkpoint_every=50, val_every=0,
    )
    t0 = time.perf_counter()
    final = train(config, progress=False)
    seconds = time.perf_counter() - t0
    model = load_trained_model(final)
    item = LabelVersionDataset(train_store, version="v1", augment=False)[0]
    pred = model.predict(item["image"][None])[0].numpy()
    acc = MetricAccumulator(num_classes=7)
    acc.update(pred, item["labels"].numpy())
    miou = acc.compute()["miou"]
    rate = config.iters / seconds
    print(f"overfit: {config.iters} steps in {seconds:.1f} s ({rate:.2f} it/s), mIoU {miou:.3f}")
    # seen: above 0.9 on some CPUs, 0.891 on others (the same seed; float sums in another order); an untrained
    # model (or one predicting a single class) scores far lower on this 7-class image
    assert miou > 0.8


def test_fine_tune_a_seven_class_model_on_the_new_class(
    train_store: Path, straight_run: Path, tmp_path: Path
) -> None:
    """The add-class use case: a model trained on the precise classes (v1) starts the run on v1 + car (v2)."""
    v1_run = tmp_path / "v1"
    v1_final = train(tiny_config(train_store, v1_run, version="v1", iters=2), progress=False)
    config = resolve_train_config(tiny_config(train_store, tmp_path / "ft", init_model=str(v1_final)))
    expected = model_config(config)
    model = build_model(expected)
    assert init_from_model(model, v1_final, expected=expected) == ["car"]
    assert resolve_init_dir(v1_run) == v1_final  # a run folder stands for its final model
    v1 = load_trained_model(v1_final).state_dict()
    head = "transformer_decoder.class_embed.weight"
    for k, v in model.state_dict().items():
        if k == head or k.endswith("class_embed.bias"):
            assert torch.equal(v[:7], v1[k][:7]) and torch.equal(v[8], v1[k][7]), k  # 7 classes + no object
        else:
            assert torch.equal(v, v1[k]), k
    final = train(config, progress=False)
    assert read_model_config(final)["train_config"]["init_model"] == str(v1_final)
    # the fine-tuned run differs from the same run started from scratch (straight_run, same seed and data)
    scratch = load_file(str(straight_run / "final" / "model.safetensors"))
    tuned = load_file(str(final / "model.safetensors"))
    assert scratch.keys() == tuned.keys()
    assert any(not torch.equal(tuned[k], scratch[k]) for k in scratch if "class_embed" not in k)


def test_run_names_tell_runs_apart_and_find_a_rerun(train_store: Path, tmp_path: Path) -> None:
    base = tiny_config(train_store, tmp_path / "a")
    name = run_name(base)
    assert name.startswith("v2-tiny-inverse-s7-i3-") and run_name(replace(base, out_dir=str(tmp_path))) == name
    assert run_name(replace(base, num_workers=2, device="cuda")) == name  # resume-free fields: the same run
    others = [replace(base, batch_size=4), replace(base, crop_size=(128, 128)), replace(base, num_points=64),
              replace(base, init_model=str(tmp_path / "m")), replace(base, amp=True)]
    assert len({run_name(c) for c in others} | {name}) == len(others) + 1  # anything else: another folder


def test_fine_tune_errors_name_the_folder(train_store: Path, straight_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"init_model {tmp_path / 'nope'} is not a trained model"):
        train(tiny_config(train_store, tmp_path / "a", init_model=str(tmp_path / "nope")), progress=False)
    final = straight_run / "final"
    with pytest.raises(ValueError, match=rf"init_model {final} is a variant 'tiny' model.*'lite_r18'"):
        train(tiny_config(train_store, tmp_path / "b", init_model=str(final), variant="lite_r18"),
              progress=False)
    with pytest.raises(ValueError, match="backbone_checkpoint or init_model, not both"):
        tiny_config(train_store, tmp_path / "c", init_model=str(final), backbone_checkpoint="r18.pth")
    bad = tmp_path / "corrupt"
    shutil.copytree(final, bad)
    (bad / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=rf"{bad / 'model.safetensors'}"):
        train(tiny_config(train_store, tmp_path / "d", init_model=str(bad)), progress=False)


def test_the_recipe_follows_the_start_and_explicit_fields_win(train_store: Path, tmp_path: Path) -> None:
    scratch = resolve_train_config(tiny_config(train_store, tmp_path, iters=1000))
    assert (scratch.recipe, scratch.lr, scratch.backbone_lr_mult, scratch.warmup_iters, scratch.grad_clip,
            scratch.ema_decay) == ("scratch", SCRATCH_RECIPE.lr, 1.0, 100, SCRATCH_RECIPE.grad_clip, 0.0)
    for start in ({"backbone_checkpoint": "resnet.pth"}, {"init_model": "run/final"}):
        paper = resolve_train_config(tiny_config(train_store, tmp_path, iters=1000, **start))
        assert (paper.recipe, paper.lr, paper.backbone_lr_mult, paper.warmup_iters, paper.grad_clip,
                paper.ema_decay) == ("paper", 3e-4, 0.1, 0, 0.01, 0.0), start
    chosen = resolve_train_config(tiny_config(train_store, tmp_path, recipe="paper", lr=2e-3, grad_clip=0.0))
    assert (chosen.recipe, chosen.lr, chosen.backbone_lr_mult, chosen.grad_clip) == ("paper", 2e-3, 0.1, 0.0)
    assert resolve_train_config(scratch) == scratch  # resolving twice changes nothing (resume compares them)
    with pytest.raises(ValueError, match="recipe"):
        tiny_config(train_store, tmp_path, recipe="fast")
    with pytest.raises(ValueError, match="warmup_iters < iters"):
        tiny_config(train_store, tmp_path, warmup_iters=3)
    with pytest.raises(ValueError, match="val_every >= 0"):
        tiny_config(train_store, tmp_path, val_every=-1)
    with pytest.raises(ValueError, match="0 <= ema_decay < 1"):
        tiny_config(train_store, tmp_path, ema_decay=1.0)


def test_a_class_with_iou_zero_on_val_is_warned_about_after_a_share_of_the_run(
    train_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import addclass.tasks.training.train as tt

    scores = {"split": "val", "num_images": 1, "miou7": 0.5, "per_class_iou": {"sky": 0.9, "human": 0.0},
              "new_classes": {"car": {"iou": 0.0, "biou": 0.0, "bf1": 0.0}}}
    monkeypatch.setattr(tt, "validate", lambda *a, **k: scores)
    config = resolve_train_config(tiny_config(train_store, tmp_path, iters=10))
    model = build_model(model_config(config))
    log_path = tmp_path / "log.jsonl"
    with caplog.at_level("WARNING", logger="addclass.tasks.training.train"), open(log_path, "w") as f:
        tt._validate_step(config, model, step=2, device=torch.device("cpu"), log_file=f)  # 20 %: too early
        assert not caplog.records
        tt._validate_step(config, model, step=3, device=torch.device("cpu"), log_file=f)
    assert len(caplog.records) == 1
    assert "step 3/10" in caplog.text and "['human', 'car'] are not predicted on val" in caplog.text
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [2, 3]


def test_training_passes_reviewed_pixels_to_the_targets(train_store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pixels with provenance 3 (a person reviewed them) reach `build_targets` as ``reviewed``."""
    import addclass.tasks.training.train as tt
    from addclass.storage.registry import PROV_REVIEWED

    store = tmp_path / "s.zarr"
    shutil.copytree(train_store, store)
    st = open_label_store(store, mode="a")
    st.begin_version("v3", parent="v2", class_ids=list(range(8)), policy="test", spec={})
    for split in st.splits():
        for image_id in st.image_ids(split):
            labels, provenance = st.read_labels_and_provenance(split, image_id, version="v2")
            st.write_version_labels("v3", split, image_id, labels,
                                    np.where(labels == CAR, PROV_REVIEWED, provenance).astype(np.uint8))
    st.publish_version("v3")
    [train_id] = st.image_ids("train")
    cars = int((st.read_labels("train", train_id, version="v3") == CAR).sum())
    seen: list[int] = []
    real = tt.build_targets

    def spy(label_map: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        seen.append(int(kwargs["reviewed"].sum()))
        return real(label_map, **kwargs)

    monkeypatch.setattr(tt, "build_targets", spy)
    train(tiny_config(store, tmp_path / "run", version="v3", iters=1, scale_range=(1.0, 1.0)),
          progress=False)
    assert cars > 0 and seen == [cars, cars]  # the one train image twice, whole (256 crops of 256 x 256)


def test_validation_predicts_at_the_test_scale_alone(train_store: Path, tmp_path: Path) -> None:
    """A model averaging two scales is validated at its test_scale only, and the scale is recorded; the
    final evaluation (`predict()` without a scale) keeps every scale."""
    from addclass.tasks.training.validation import format_scores, validate

    config = resolve_train_config(tiny_config(train_store, tmp_path))
    model = build_model(model_config(config))
    model.test_scale, model.test_ratios = 1.5, (1.0, 2.0)
    scales: list[float | None] = []
    predict = model.predict

    def spy(images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        scales.append(kwargs.get("scale"))
        return predict(images, **kwargs)

    model.predict = spy  # type: ignore[method-assign]
    scores = validate(model, store=train_store, version="v2")
    assert scales == [1.5] and scores["scale"] == 1.5 and scores["num_images"] == 1
    assert format_scores(scores).startswith("val (1 images, scale 1.5): car IoU ")


@pytest.mark.parametrize(("setting", "message"), [
    ({"test_scale": 0}, "test_scale 0, not a number > 0"),
    ({"test_window": -1}, "test_window -1, not an integer >= 0"),
    ({"test_ratios": []}, r"test_ratios \[\], not a non-empty list of numbers > 0"),
    ({"test_ratios": [1.0, -2]}, r"test_ratios \[1.0, -2\], not a non-empty list"),
    ({"test_ratios": 1.5}, "test_ratios 1.5, not a non-empty list"),
])
def test_a_model_folder_with_bad_inference_settings_is_refused_by_name(
        straight_run: Path, tmp_path: Path, setting: dict[str, Any], message: str) -> None:
    from addclass.tasks.model_files.model_folder import save_model_dir

    cfg = {**read_model_config(straight_run / "final"), **setting}
    model = load_trained_model(straight_run)
    folder = save_model_dir(tmp_path / "bad", model=model, config=cfg, step=3)
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.json'}.*{message}"):
        load_trained_model(folder)
