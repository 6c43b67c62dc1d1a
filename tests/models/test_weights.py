"""Checkpoint loading: formats, key remapping, clear errors, ImageNet backbone init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from addclass.models.build import build_massformer_lite_r18, build_massformer_tiny
from addclass.models.weights import (
    CLASS_HEAD_KEYS,
    load_backbone_checkpoint,
    load_checkpoint,
    load_with_new_classes,
    remap_keys,
)


def _trained(num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_massformer_tiny(num_classes)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn_like(p) * 0.01 + i)
    return model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["plain", "nested", "ddp", "safetensors"])
def test_load_checkpoint_formats(tmp_path: Path, fmt: str) -> None:
    src = _trained()
    sd = src.state_dict()
    if fmt == "plain":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif fmt == "nested":
        path = tmp_path / "w.pt"
        torch.save({"model": sd, "optimizer": {"lr": 3e-4}, "iteration": 10}, path)
    elif fmt == "ddp":
        path = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    dst = build_massformer_tiny(4)
    missing, unexpected = load_checkpoint(dst, path)
    assert missing == [] and unexpected == []
    _assert_same_weights(src, dst)


def test_missing_checkpoint_names_path_and_source(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "massformer.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(build_massformer_tiny(4), path)
    assert str(path) in str(err.value) and "addclass train" in str(err.value)


def test_shape_mismatch_is_reported_per_tensor(tmp_path: Path) -> None:
    path = tmp_path / "k4.pt"
    torch.save(_trained(num_classes=4).state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(build_massformer_tiny(6), path)
    msg = str(err.value)
    assert "transformer_decoder.class_embed.weight: checkpoint (5, 64) vs model (7, 64)" in msg
    assert "number of classes" in msg


def test_strict_and_non_strict_missing_keys(tmp_path: Path) -> None:
    sd = _trained().state_dict()
    sd.pop("transformer_decoder.post_norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="post_norm.weight"):
        load_checkpoint(build_massformer_tiny(4), path)
    missing, unexpected = load_checkpoint(build_massformer_tiny(4), path, strict=False)
    assert missing == ["transformer_decoder.post_norm.weight"] and unexpected == ["extra.weight"]


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint that would run arbitrary code on unpickling is rejected."""
    path = tmp_path / "evil.pt"
    torch.save({"model": build_massformer_tiny(4).state_dict(), "hook": print}, path)
    with pytest.raises(ValueError, match=r"Refused checkpoint .*evil\.pt: it pickles Python objects"):
        load_checkpoint(build_massformer_tiny(4), path)


def test_remap_keys_strips_wrapper_prefixes() -> None:
    t = torch.zeros(1)
    assert remap_keys(
        {"module._orig_mod.backbone.conv1.weight": t, "pixel_decoder.out.0.0.weight": t}
    ).keys() == {
        "backbone.conv1.weight",
        "pixel_decoder.out.0.0.weight",
    }
    with pytest.raises(ValueError, match="both map"):
        remap_keys({"module.a": t, "a": t})


def test_load_backbone_checkpoint_from_torchvision_resnet18(tmp_path: Path) -> None:
    from addclass.models.build import build_massformer_lite_r18

    torch.manual_seed(0)
    ref = resnet18(weights=None)  # stands in for resnet18-f37072fd.pth (same keys, incl. fc)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)

    lite = build_massformer_lite_r18(7)
    missing, unexpected = load_backbone_checkpoint(lite, path)
    assert missing == [] and unexpected == []
    for k, v in lite.backbone.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert not lite.backbone.bn1.weight.requires_grad  # loading keeps the frozen affines frozen

    tiny = build_massformer_tiny(7)  # one block per stage: takes block 0 of each ResNet-18 stage
    with pytest.raises(RuntimeError, match="unexpected"):
        load_backbone_checkpoint(tiny, path)
    missing, unexpected = load_backbone_checkpoint(tiny, path, strict=False)
    assert missing == [] and "layer1.1.conv1.weight" in unexpected
    assert torch.equal(tiny.backbone.layer4[0].conv2.weight, ref.layer4[0].conv2.weight)


def test_missing_backbone_checkpoint_names_torchvision_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_backbone_checkpoint(build_massformer_tiny(4), tmp_path / "resnet50.pth")
    assert "resnet50-0676ba61.pth" in str(err.value) and "download.pytorch.org" in str(err.value)


def test_load_with_new_classes_copies_known_rows_and_keeps_new_ones_fresh(tmp_path: Path) -> None:
    old = _trained(num_classes=4)  # classes 0..3 + no-object row 4
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), str(path))
    torch.manual_seed(1)
    new = build_massformer_tiny(5)  # classes 0..4 + no-object row 5; new class 4 sits between
    fresh_head = {k: new.state_dict()[k].clone() for k in CLASS_HEAD_KEYS}
    # class 3 of the old model is class 2 of the new one (a renumbering), old class 2 is dropped
    untrained = load_with_new_classes(new, path, class_rows={0: 0, 1: 1, 2: 3, 3: 2})
    assert untrained == [4]
    sn, so = new.state_dict(), old.state_dict()
    for k in sn:
        if k not in CLASS_HEAD_KEYS:
            assert torch.equal(sn[k], so[k]), k
    for k in CLASS_HEAD_KEYS:
        assert sn[k].shape[0] == 6
        for new_id, old_id in ((0, 0), (1, 1), (2, 3), (3, 2), (5, 4)):
            assert torch.equal(sn[k][new_id], so[k][old_id]), (k, new_id)
        assert torch.equal(sn[k][4], fresh_head[k][4]), k  # the new class keeps its initialisation


def test_load_with_new_classes_errors(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save(_trained(num_classes=4).state_dict(), path)
    with pytest.raises(FileNotFoundError, match="missing.pth.*nothing is downloaded"):
        load_with_new_classes(build_massformer_tiny(5), tmp_path / "missing.pth", class_rows={})
    with pytest.raises(ValueError, match=r"class_rows \{0: 4\} fall outside"):
        load_with_new_classes(build_massformer_tiny(5), path, class_rows={0: 4})  # 4 is the no-object row
    with pytest.raises(ValueError, match="shape mismatch"):
        load_with_new_classes(build_massformer_lite_r18(5), path, class_rows={0: 0})
