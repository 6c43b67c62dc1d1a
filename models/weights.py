"""Loading weights into built models: MaSSFormer checkpoints and ImageNet ResNet initialisation.

Nothing here downloads. MaSSFormer weights are the output of your own ``addclass train`` run (the MaSS13K
release has no checkpoints); the ImageNet backbone weights are torchvision's ``resnet50-0676ba61.pth`` /
``resnet18-f37072fd.pth`` from https://download.pytorch.org/models/, and for SeMask FPN the Swin-T of the Microsoft
release, ``swin_tiny_patch4_window7_224.pth`` (github.com/microsoft/Swin-Transformer), fetched by you. Files are read with
``torch.load(..., weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from addclass.common.errors import InputError, StateError

log = logging.getLogger(__name__)

# Prefixes added by wrappers, not by the architecture: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Top-level keys under which training checkpoints nest the model's state dict.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict")
TORCHVISION_RESNET_FILES = {"resnet50": "resnet50-0676ba61.pth", "resnet18": "resnet18-f37072fd.pth"}
SWIN_TINY_FILE = "swin_tiny_patch4_window7_224.pth"
# Keys of the Microsoft Swin release that the SeMask backbone does not hold: the classifier (``head``), the final
# norm (SeMask has one norm per output instead), and buffers it derives itself (shift masks, position indices).
_SWIN_DROPPED_PREFIXES = ("head.", "norm.")
_SWIN_DROPPED_SUFFIXES = ("attn_mask", "relative_position_index")
# Parameters of the SeMask backbone that an ImageNet Swin does not have: they keep their initialisation.
_SEMASK_OWN_PART = ".semantic_layer."
_SEMASK_OWN_PREFIXES = ("norm0.", "norm1.", "norm2.", "norm3.")  # top-level output norms only


def remap_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Maps checkpoint keys onto this package's parameter names.

    Strips wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile). Future renames of
    parameters belong here as explicit, versioned migrations, never as silent renames elsewhere.

    Args:
        state_dict: raw checkpoint state dict.

    Returns:
        A new dict with remapped keys (tensors are not copied).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if new_key.startswith(prefix):
                    new_key = new_key[len(prefix) :]
                    stripped = True
        if new_key in out:
            raise InputError(f"checkpoint keys {key!r} and another key both map to {new_key!r}")
        out[new_key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads a state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``).

    Torch checkpoints may nest the state dict under ``model``, ``state_dict`` or ``model_state_dict``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no recognisable state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage, a truncated file, a pickle of other objects: name the file, one line
        if "Weights only load failed" in str(e):
            raise InputError(
                f"Refused checkpoint {path}: it pickles Python objects besides tensors, which could run code "
                "when loaded; save the state dict alone (torch.save(model.state_dict(), ...))."
            ) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"Cannot read checkpoint {path}: not a safetensors or torch weights file ({first[:200]})."
        ) from e
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _extract_state_dict(obj[key], path)
        raise InputError(
            f"{path} holds no state dict: expected tensors or one of the keys {list(_NESTED_KEYS)}. "
            f"Got top-level keys {sorted(map(str, obj))[:10]} instead."
        )
    raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict.")


def _read_massformer_state_dict(path: Path) -> dict[str, Tensor]:
    """`read_state_dict` + `remap_keys`; a missing file says where MaSSFormer weights come from."""
    if not path.is_file():
        raise FileNotFoundError(
            f"MaSSFormer checkpoint not found: {path}. MaSSFormer weights come from your own training run "
            "(`addclass train` writes checkpoints to its output folder); nothing is downloaded."
        )
    return remap_keys(read_state_dict(path))


def _check_shapes(module: nn.Module, state_dict: Mapping[str, Tensor], path: Path) -> None:
    expected = module.state_dict()
    bad = [
        f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        hint = ""
        if any("class_embed" in line for line in bad):
            hint = "\n(class_embed differs: the checkpoint was trained for another number of classes.)"
        raise InputError(f"shape mismatch loading {path} ({len(bad)} tensors):\n" + "\n".join(bad) + hint)


def load_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Loads a MaSSFormer checkpoint into a built model (after `remap_keys`).

    Args:
        model: the built model (e.g. from `models.build.MODEL_BUILDERS`).
        path: ``.safetensors`` or torch checkpoint (``.pt``/``.pth``, possibly nested under ``model``).
        strict: raise on missing or unexpected keys; when False they are logged as warnings.

    Returns:
        (missing keys, unexpected keys).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: shapes differ (all mismatches are listed).
        RuntimeError: ``strict`` and keys are missing or unexpected.
    """
    path = Path(path)
    state_dict = _read_massformer_state_dict(path)
    _check_shapes(model, state_dict, path)
    result = model.load_state_dict(state_dict, strict=False)
    return _report_keys(f"loading {path}", list(result.missing_keys), list(result.unexpected_keys), strict=strict)


def _report_keys(what: str, missing: list[str], unexpected: list[str], *, strict: bool) -> tuple[list[str], list[str]]:
    """Raise (strict) or log the missing/unexpected keys of a state-dict load; returns them."""
    if strict and (missing or unexpected):
        raise StateError(
            f"{what}: {len(missing)} missing keys {missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]}"
        )
    if missing:
        log.warning("%s: %d missing keys: %s", what, len(missing), missing[:20])
    if unexpected:
        log.warning("%s: %d unexpected keys: %s", what, len(unexpected), unexpected[:20])
    return missing, unexpected


def load_backbone_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Initialises the ResNet backbone from a torchvision ImageNet checkpoint (the ``fc`` head is dropped).

    Args:
        model: a `models.massformer.model.MaSSFormer` (its ``backbone`` is loaded) or a `ResNetBackbone`.
        path: e.g. ``resnet50-0676ba61.pth`` or ``resnet18-f37072fd.pth``.
        strict: raise on missing/unexpected keys. Pass False for the ``tiny`` backbone (one block per stage),
            which then takes the first block of each stage of a ResNet-18.

    Returns:
        (missing keys, unexpected keys).

    Raises:
        FileNotFoundError: no file at ``path`` (the message says where to get the weights).
        ValueError: the file is not a weights file, or (``strict=False``) none of its tensors fits.
        RuntimeError: ``strict`` and keys are missing or unexpected.
    """
    from addclass.models.semask.semask import SeMaskSwinBackbone  # here: weights is imported by light modules

    if isinstance(getattr(model, "backbone", model), SeMaskSwinBackbone):
        return load_swin_backbone_checkpoint(model, path, strict=strict)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet backbone checkpoint not found: {path}. Get torchvision's "
            f"{TORCHVISION_RESNET_FILES['resnet50']} (ResNet-50) or {TORCHVISION_RESNET_FILES['resnet18']} "
            "(ResNet-18) from https://download.pytorch.org/models/ yourself; nothing is downloaded."
        )
    backbone = getattr(model, "backbone", model)
    state_dict = {k: v for k, v in remap_keys(read_state_dict(path)).items() if not k.startswith("fc.")}
    if strict:
        _check_shapes(backbone, state_dict, path)
    dropped: list[str] = []
    if not strict:
        expected = backbone.state_dict()
        dropped = [k for k, v in state_dict.items() if k not in expected or v.shape != expected[k].shape]
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
        if not state_dict:  # nothing would load: the run would silently start from random weights
            raise InputError(
                f"No tensor of {path} fits the backbone ({len(dropped)} tensors, none with a matching name and "
                f"shape, e.g. {dropped[:3]}): expected torchvision ResNet weights "
                f"({TORCHVISION_RESNET_FILES['resnet18']} or {TORCHVISION_RESNET_FILES['resnet50']})."
            )
    result = backbone.load_state_dict(state_dict, strict=False)
    return _report_keys(f"loading backbone {path}", list(result.missing_keys),
                        list(result.unexpected_keys) + dropped, strict=strict)


def load_swin_backbone_checkpoint(
    model: nn.Module, path: str | Path, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Initialises a SeMask backbone's Swin parts from an ImageNet Swin of the Microsoft release.

    The file is ``{"model": state_dict}`` with keys such as ``layers.0.blocks.0.attn.relative_position_bias_table``
    (`SWIN_TINY_FILE` for ``semask_fpn_swint``; timm's own files use other names and are refused). The classifier,
    the final norm and the derived buffers are dropped; the SeMask parts (semantic layers, output norms) keep
    their initialisation and are not reported missing. `load_backbone_checkpoint` calls this for SeMask models.

    Args:
        model: a `models.massformer.model.MaSSFormer` with a `SeMaskSwinBackbone`, or the backbone itself.
        path: the ``.pth`` (or a ``.safetensors`` with the same names).
        strict: raise when a Swin parameter is missing from the file or the file has a tensor the backbone
            lacks; when False, tensors that do not fit (name or shape) are dropped and reported.

    Returns:
        (missing Swin keys, unexpected or dropped file keys).

    Raises:
        FileNotFoundError: no file at ``path``.
        InputError: shapes differ (strict), or no tensor fits (not strict).
        StateError: ``strict`` and keys are missing or unexpected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet Swin checkpoint not found: {path}. Get {SWIN_TINY_FILE} of the Microsoft release "
            "(github.com/microsoft/Swin-Transformer) yourself; nothing is downloaded."
        )
    backbone = getattr(model, "backbone", model)
    state_dict = {
        k: v for k, v in remap_keys(read_state_dict(path)).items()
        if not k.startswith(_SWIN_DROPPED_PREFIXES) and not k.endswith(_SWIN_DROPPED_SUFFIXES)
    }
    expected = {k: v for k, v in backbone.state_dict().items()
                if _SEMASK_OWN_PART not in k and not k.startswith(_SEMASK_OWN_PREFIXES)}
    dropped: list[str] = []
    if strict:
        _check_shapes(backbone, state_dict, path)
    else:
        dropped = [k for k, v in state_dict.items() if k not in expected or v.shape != expected[k].shape]
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
        if not state_dict:
            raise InputError(
                f"No tensor of {path} fits the SeMask Swin backbone ({len(dropped)} tensors, e.g. {dropped[:3]}): "
                f"expected an ImageNet Swin of the Microsoft release ({SWIN_TINY_FILE})."
            )
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        return _report_keys(f"loading Swin backbone {path}", missing, unexpected, strict=True)
    backbone.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return _report_keys(f"loading Swin backbone {path}", missing, unexpected + dropped, strict=strict)


CLASS_HEAD_KEYS = ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias")


def load_with_new_classes(
    model: nn.Module, path: str | Path, *, class_rows: Mapping[int, int]
) -> list[int]:
    """Loads a MaSSFormer checkpoint trained on other classes, to fine-tune it on a new class set.

    Every tensor but the class head must fit the model exactly (same variant and pixel decoder). The class
    head (``class_embed``: K+1 rows, the last one "no object") is copied row by row: new class ``i`` takes
    the checkpoint's row ``class_rows[i]``, the no-object row takes the checkpoint's last row, and classes
    absent from ``class_rows`` keep the model's fresh initialisation.

    Args:
        model: the built model for the new classes.
        path: ``.safetensors`` or torch checkpoint of the trained model.
        class_rows: new class id -> class id in the checkpoint (classes both know, usually matched by name).

    Returns:
        The new class ids that start untrained (sorted).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a non-head tensor differs in shape, keys are missing or unexpected, or ``class_rows``
            names a row outside either head.
    """
    path = Path(path)
    state_dict = _read_massformer_state_dict(path)
    head = {k: state_dict.pop(k) for k in CLASS_HEAD_KEYS if k in state_dict}
    _check_shapes(model, state_dict, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(CLASS_HEAD_KEYS))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected or len(head) != len(CLASS_HEAD_KEYS):
        raise InputError(
            f"{path} is not a MaSSFormer of this architecture: missing keys {missing[:20]}, unexpected keys "
            f"{unexpected[:20]}, class head keys found {sorted(head)}."
        )
    new_rows = own[CLASS_HEAD_KEYS[0]].shape[0]  # K_new + 1
    old_rows = head[CLASS_HEAD_KEYS[0]].shape[0]  # K_old + 1
    bad = {n: o for n, o in class_rows.items() if not (0 <= n < new_rows - 1 and 0 <= o < old_rows - 1)}
    if bad:
        raise InputError(
            f"class_rows {bad} fall outside the heads: the model has {new_rows - 1} classes, {path} has "
            f"{old_rows - 1}."
        )
    pairs = sorted(class_rows.items()) + [(new_rows - 1, old_rows - 1)]  # + the no-object row
    new_ids = torch.tensor([n for n, _ in pairs])
    old_ids = torch.tensor([o for _, o in pairs])
    for key in CLASS_HEAD_KEYS:
        merged = own[key].clone()  # (K_new + 1) [x C]
        merged[new_ids] = head[key][old_ids].to(merged.dtype)
        state_dict[key] = merged
    model.load_state_dict(state_dict, strict=True)
    return sorted(set(range(new_rows - 1)) - set(class_rows))
