"""Importing the official MaSS13K MaSSFormer weights as an addclass model folder.

The folder (`tasks.model_files.model_folder` layout: ``model.safetensors``, ``config.json``, ``manifest.json``) loads with
`tasks.model_files.model_folder.load_trained_model` and starts a run as ``TrainConfig.init_model`` (classes matched by
name: the official ``background, person, building, tree, ground, sky, water`` become ours, ``others, human,
building, vegetation, ground, sky, water``, ids 0..6). Its ``config.json`` carries a ``source`` entry: the file,
its sha256, the mapping version and what the checkpoint's ``meta`` says about itself.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from addclass.common.errors import InputError
from addclass.models.build import MODEL_BUILDERS
from addclass.models.hashing import file_sha256
from addclass.models.importers.mass13k import (
    MAPPING_VERSION,
    MASS13K_CLASS_NAMES,
    MASS13K_TO_OURS,
    check_mass13k_layout,
    convert_mass13k_state_dict,
    official_class_names,
    read_mass13k_checkpoint,
)
from addclass.tasks.model_files.model_folder import FORMAT, FORMAT_VERSION, save_model_dir

log = logging.getLogger(__name__)

IMPORT_VARIANTS = ("r50", "lite_r18")


def import_mass13k(
    checkpoint_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    variant: str = "r50",
    overwrite: bool = False,
) -> Path:
    """Converts an official MaSS13K MaSSFormer checkpoint into an addclass model folder.

    Args:
        checkpoint_file: the released ``.pth`` (mmengine checkpoint; read without running its pickled code,
            `models.importers.mass13k.read_mass13k_checkpoint`).
        out_dir: the model folder to write.
        variant: ``"r50"`` (the released model) or ``"lite_r18"`` (a Lite checkpoint with the same module
            names).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: no ``checkpoint_file``.
        InputError: ``out_dir`` exists (without ``overwrite``), an unknown variant, or a file that is not an
            official MaSSFormer of ``variant`` (another model, a Lite file imported as r50, an unknown or missing
            key, a shape mismatch, another class set); one line naming the file and the keys.
    """
    source, out = Path(checkpoint_file), Path(out_dir)
    if variant not in IMPORT_VARIANTS:
        raise InputError(f"variant must be one of {list(IMPORT_VARIANTS)}. Got {variant!r} instead.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError(f"{out} already exists; pass overwrite=True to replace it.")
        if not _is_model_folder(out):  # overwrite replaces a model folder, never anything else
            raise InputError(f"{out} is not an addclass model folder; overwrite only replaces one. Pick another "
                             "folder.")
    state_dict, info = read_mass13k_checkpoint(source)
    check_mass13k_layout(state_dict, variant=variant, source=str(source))
    head = state_dict.get("decode_head.cls_embed.weight")
    if head is not None and head.shape[0] != len(MASS13K_CLASS_NAMES) + 1:
        raise InputError(
            f"{source} has {head.shape[0] - 1} classes (decode_head.cls_embed.weight {tuple(head.shape)}); "
            f"MaSS13K has {len(MASS13K_CLASS_NAMES)}: {', '.join(MASS13K_CLASS_NAMES)}."
        )
    meta: dict[str, Any] = info["meta"]
    recorded = official_class_names(meta)
    if recorded is not None and tuple(recorded) != MASS13K_CLASS_NAMES:
        raise InputError(
            f"{source} was trained on classes {recorded}, not MaSS13K's {list(MASS13K_CLASS_NAMES)}."
        )
    converted = convert_mass13k_state_dict(state_dict, variant=variant, source=str(source))
    model = MODEL_BUILDERS[variant](len(MASS13K_CLASS_NAMES))
    model.load_state_dict(converted, strict=True)  # convert_mass13k_state_dict checked keys and shapes
    iteration = meta.get("iter")
    step = iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else 0
    names = [MASS13K_TO_OURS[n] for n in MASS13K_CLASS_NAMES]
    config = _model_config(variant, names, source=source, meta=meta, placeholders=info["placeholders"])
    save_model_dir(out, model=model, config=config, step=step)
    log.info("imported %s (%s, %d tensors) into %s", source, variant, len(converted), out)
    return out


def _is_model_folder(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "config.json").read_text()).get("format") == FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def _model_config(variant: str, names: list[str], *, source: Path, meta: dict[str, Any],
                  placeholders: Any) -> dict[str, Any]:
    """The imported folder's config.json: a trained model's keys, and where the weights came from."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "pixel_decoder": "hr",
        "num_classes": len(names),
        "class_names": names,
        "store_class_ids": list(range(len(names))),
        "pseudo_classes": [],
        "test_scale": 1.0,  # MaSS13K tests at the images' native size (4096 x 3072)
        "test_window": 0,  # in one piece, as the release's whole-image test
        "store": None,
        "store_name": None,
        "label_version": None,
        "label_version_created": None,
        "train_config": {},
        "source": {
            "kind": "mass13k",
            "file": str(source.resolve()),
            "sha256": file_sha256(source),
            "mapping_version": MAPPING_VERSION,
            "official_class_names": list(MASS13K_CLASS_NAMES),
            "iter": meta.get("iter"),
            "mmengine_version": meta.get("mmengine_version"),
            "placeholders": placeholders,
        },
    }
