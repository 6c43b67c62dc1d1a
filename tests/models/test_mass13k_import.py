"""Importing the official MaSS13K weights: the official model code (../shared/reference/mass13k, run with stand-ins
for mmcv/mmdet/mmengine, tests/models/_mass13k_standins.py) builds a randomly initialised MaSSFormer R50; its
state dict is saved the way mmengine saves a training checkpoint (``meta``, ``state_dict``, a ``message_hub``
with a pickled HistoryBuffer-like object and numpy arrays, ``optimizer``, ``param_schedulers``), imported,
compared tensor by tensor and forward by forward (float64) with the official model, loaded, trained one step,
and bad files are refused with their reason.
"""

from __future__ import annotations

import json
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from addclass.common.errors import InputError
from addclass.models.hashing import file_sha256
from addclass.models.importers.mass13k import (
    MAPPING_RULES,
    MAPPING_VERSION,
    MASS13K_CLASS_NAMES,
    convert_mass13k_state_dict,
    map_key,
)
from addclass.models.palette import BASE_CLASS_NAMES
from addclass.models.weights import read_state_dict
from addclass.tasks.model_files.import_model import import_mass13k
from addclass.tasks.model_files.model_folder import MODEL_FILE, load_trained_model, read_model_config
from tests.conftest import SHARED

REFERENCE = SHARED / "reference" / "mass13k"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "mmsegmentation/mmseg/models/decode_heads/mass_decoder.py").is_file(),
    reason="needs the pinned MaSS13K reference code in ../shared (absent)",
)


class HistoryBuffer:
    """Pickled as ``mmengine.logging.history_buffer.HistoryBuffer``, as mmengine's message hub holds them."""

    def __init__(self, values: list[float]) -> None:
        self._log_history = np.asarray(values)
        self._count_history = np.ones(len(values))
        self.max_length = 1000000


HistoryBuffer.__module__ = "mmengine.logging.history_buffer"


def save_mmengine_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A checkpoint laid out as mmengine's ``CheckpointHook`` writes it; ``HistoryBuffer`` is pickled under its
    mmengine name through a module registered only while saving."""
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[names[-1]].HistoryBuffer = HistoryBuffer  # type: ignore[attr-defined]
    first = next(iter(state_dict.values()))
    checkpoint = {
        "meta": {
            "mmengine_version": "0.10.3", "iter": 80000, "epoch": 0, "seed": 0, "cfg": "model = dict(...)",
            "dataset_meta": {"classes": MASS13K_CLASS_NAMES, "palette": [[0, 0, 0], [255, 0, 0]]},
            "hook_msgs": {"best_score": np.float64(88.97), "last_ckpt": "iter_80000.pth"},
        },
        "state_dict": state_dict,
        "message_hub": {
            "log_scalars": OrderedDict({"train/loss": HistoryBuffer([1.5, 1.25])}),
            "runtime_info": OrderedDict({"iter": 80000, "max_iters": np.int64(80000)}),
            "resumed_keys": OrderedDict({"iter": True}),
        },
        "optimizer": {"state": {0: {"step": torch.tensor(80000.0), "exp_avg": torch.zeros_like(first)}},
                      "param_groups": [{"lr": 0.0, "weight_decay": 0.05, "params": [0]}]},
        "param_schedulers": [{"T_max": 80000, "eta_min": 0, "last_step": 80000, "base_values": [3e-4]}],
    }
    try:
        torch.save(checkpoint, path)
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n)
            else:
                sys.modules[n] = old


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """(official model in eval mode with random weights, its float32 state dict, its mmengine checkpoint)."""
    from tests.models._mass13k_standins import build_official, randomize_

    torch.manual_seed(0)
    model = build_official(REFERENCE)
    randomize_(model, seed=0)
    model.eval()
    state_dict = model.state_dict()  # keeps the float32 tensors when the model is later cast to float64
    path = tmp_path_factory.mktemp("mass13k") / "iter_80000.pth"
    save_mmengine_checkpoint(state_dict, path)
    return model, state_dict, path


@pytest.fixture(scope="module")
def imported(official: tuple[Any, dict[str, torch.Tensor], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_mass13k(official[2], tmp_path_factory.mktemp("imported") / "massformer_r50")


def one_line_error(call: Any, *match: str) -> str:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in match:
        assert part in message, message
    return message


@needs_reference
def test_weights_only_load_refuses_the_mmengine_checkpoint(official: tuple[Any, Any, Path]) -> None:
    one_line_error(lambda: read_state_dict(official[2]), "Refused checkpoint")


@needs_reference
def test_every_official_tensor_lands_with_equal_values(
    official: tuple[Any, dict[str, torch.Tensor], Path], imported: Path
) -> None:
    _, state_dict, path = official
    ours = load_file(str(imported / MODEL_FILE))
    assert len(state_dict) == len(ours) == 660
    assert sum(v.numel() for k, v in state_dict.items() if "running" not in k and "num_batches" not in k) == 37_578_176
    for key, value in state_dict.items():
        assert torch.equal(ours[map_key(key)], value), key
    config = read_model_config(imported)
    assert config["class_names"] == list(BASE_CLASS_NAMES)
    assert config["store_class_ids"] == list(range(7)) and config["test_scale"] == 1.0
    assert config["label_version"] is None
    source = config["source"]
    assert source["sha256"] == file_sha256(path) and source["file"] == str(path.resolve())
    assert source["mapping_version"] == MAPPING_VERSION and source["iter"] == 80000
    assert "mmengine.logging.history_buffer.HistoryBuffer" in source["placeholders"]
    assert json.loads((imported / "manifest.json").read_text())["step"] == 80000
    assert 25 <= len(MAPPING_RULES) <= 40


@needs_reference
def test_official_forward_equals_ours_in_float64(
    official: tuple[Any, dict[str, torch.Tensor], Path], imported: Path
) -> None:
    model = official[0].double().eval()
    ours = load_trained_model(imported).double().eval()
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 256, 256, generator=g, dtype=torch.float64) * 255
    with torch.no_grad():
        cls_list, mask_list, edge = model((image - ours.pixel_mean) / ours.pixel_std)
        out = ours(image)
    our_cls = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
    our_masks = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    assert len(cls_list) == len(our_cls) == 7
    diffs = {
        "class logits": max((a - b).abs().max().item() for a, b in zip(cls_list, our_cls, strict=True)),
        "mask logits": max((a - b).abs().max().item() for a, b in zip(mask_list, our_masks, strict=True)),
        "edge logits": (edge - out["pred_edge"]).abs().max().item(),
    }
    scale = {"mask logits": mask_list[-1].abs().max().item(), "edge logits": edge.abs().max().item()}
    print(f"\nofficial vs ours, float64, max |diff|: {diffs}; max |value|: {scale}")
    assert mask_list[-1].shape == our_masks[-1].shape == (1, 100, 128, 128)
    assert all(d < 1e-9 for d in diffs.values()), diffs


@needs_reference
def test_imported_folder_loads_strictly_and_predicts(imported: Path) -> None:
    model = load_trained_model(imported)
    image = torch.rand(1, 3, 64, 80) * 255
    labels = model.predict(image)
    assert labels.shape == (1, 64, 80) and 0 <= int(labels.min()) and int(labels.max()) < 7


@needs_reference
@pytest.mark.slow  # one R50 step on the CPU (~30 s)
def test_one_training_step_from_the_imported_folder(imported: Path, tmp_path: Path) -> None:
    from addclass.tasks.data.ingest import ingest_synthetic
    from addclass.tasks.training.train import TrainConfig, train

    store = ingest_synthetic(tmp_path / "s.zarr", images=3, size=(64, 64), seed=0, progress=False)
    config = TrainConfig(
        store=str(store), out_dir=str(tmp_path / "run"), version="v1", variant="r50", init_model=str(imported),
        iters=1, batch_size=2, crop_size=(64, 64), scale_range=(1.0, 1.0), num_points=64, checkpoint_every=1,
        keep_checkpoints=0, seed=0, device="cpu", num_workers=0, val_every=0,
    )
    final_dir = train(config, progress=False)
    final = read_model_config(final_dir)
    assert final["class_names"] == list(BASE_CLASS_NAMES)
    assert final["train_config"]["init_model"] == str(imported)
    before = load_file(str(imported / MODEL_FILE))["transformer_decoder.class_embed.weight"]
    after = load_file(str(final_dir / MODEL_FILE))["transformer_decoder.class_embed.weight"]
    assert (after - before).abs().max() < 1e-2  # the class head came from the import, by name


# ---- refused inputs -----------------------------------------------------------------------------------------


class Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


def test_garbage_and_code_carrying_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    one_line_error(lambda: import_mass13k(garbage, tmp_path / "a"), str(garbage), "not a readable torch checkpoint")
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "message_hub": Evil()}, evil)
    one_line_error(lambda: import_mass13k(evil, tmp_path / "b"), "Refused", str(evil), "builtins.print")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_other_models_are_refused(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    one_line_error(lambda: import_mass13k(path, tmp_path / "out"), str(path), "not a MaSS13K MaSSFormer checkpoint")


@needs_reference
def test_bad_mass13k_files_are_refused_naming_the_key(
    official: tuple[Any, dict[str, torch.Tensor], Path], tmp_path: Path
) -> None:
    from torchvision.models import resnet18

    _, state_dict, _ = official
    head = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}

    def write(sd: dict[str, torch.Tensor], name: str) -> Path:
        path = tmp_path / name
        torch.save({"state_dict": sd, "meta": {}}, path)
        return path

    lite = write({**head, **{f"backbone.{k}": v for k, v in resnet18().state_dict().items()
                             if not k.startswith("fc.")}}, "lite.pth")
    one_line_error(lambda: import_mass13k(lite, tmp_path / "o"), str(lite), "ResNet-18", "variant='lite_r18'")
    # As lite_r18 the names fit, but this head has the R50 widths: the shapes are named.
    one_line_error(lambda: import_mass13k(lite, tmp_path / "o", variant="lite_r18"), "shape mismatches",
                   "decode_head.pixel_decoder.pixel_decoder.in_projections.0.conv.weight")

    unknown = write({**state_dict, "decode_head.extra_head.weight": torch.zeros(1)}, "unknown.pth")
    one_line_error(lambda: import_mass13k(unknown, tmp_path / "o"), str(unknown), "1 unknown keys",
                   "decode_head.extra_head.weight")

    dropped = "decode_head.transformer_decoder.layers.3.norms.1.weight"
    missing = write({k: v for k, v in state_dict.items() if k != dropped}, "missing.pth")
    one_line_error(lambda: import_mass13k(missing, tmp_path / "o"), str(missing), "1 missing keys",
                   "transformer_decoder.layers.3.self_norm.weight")

    nine = write({**state_dict, "decode_head.cls_embed.weight": torch.zeros(10, 256),
                  "decode_head.cls_embed.bias": torch.zeros(10)}, "nine.pth")
    one_line_error(lambda: import_mass13k(nine, tmp_path / "o"), "9 classes")
    assert not (tmp_path / "o").exists()

    # Two official names for one of ours, and a shape that does not fit (conversion alone, no file).
    twice = {**state_dict, "decode_head.pixel_decoder.pixel_decoder.cst.attn.cross_attn.in_proj_weight":
             state_dict["decode_head.pixel_decoder.pixel_decoder.CST.cross_self_attn.cross_attn.attn.in_proj_weight"]}
    one_line_error(lambda: convert_mass13k_state_dict(twice), "1 duplicate targets",
                   "pixel_decoder.cst.attn.cross_attn.in_proj_weight")
    short = {**state_dict, "decode_head.query_feat.weight": torch.zeros(99, 256)}
    one_line_error(lambda: convert_mass13k_state_dict(short), "1 shape mismatches", "decode_head.query_feat.weight")


@needs_reference
def test_existing_folder_needs_overwrite(official: tuple[Any, Any, Path], imported: Path) -> None:
    one_line_error(lambda: import_mass13k(official[2], imported), str(imported), "overwrite=True")
    foreign = imported.parent / "notes"
    foreign.mkdir(exist_ok=True)
    (foreign / "mine.txt").write_text("keep")
    one_line_error(lambda: import_mass13k(official[2], foreign, overwrite=True), "not an addclass model folder")
    assert (foreign / "mine.txt").read_text() == "keep"
