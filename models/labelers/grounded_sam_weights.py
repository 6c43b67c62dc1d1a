"""Grounded-SAM weights: where checkpoints come from, how they are checked, and the GroundingDINO builder
(the mask models' builder and file names are in ``models.labelers.sam_engines``).

Nothing is downloaded; random weights only when the caller asks (``checkpoint=None``). Default file names:

- GroundingDINO ``swint_ogc``: ``groundingdino_swint_ogc.pth``; ``swinb``:
  ``groundingdino_swinb_cogcoor.pth``. Download: https://github.com/IDEA-Research/GroundingDINO/releases

Test-only variant: the ``"test"`` GroundingDINO layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from addclass.common.errors import InputError, UserError
from addclass.models.labelers.bert_offline import OFFLINE_BERT_PREFIX, cache_root, install_offline_patches

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

logger = logging.getLogger(__name__)

DINO_URL = "https://github.com/IDEA-Research/GroundingDINO/releases"
SAM_ENV = "ADDCLASS_SAM_CHECKPOINT"
DINO_ENV = "ADDCLASS_DINO_CHECKPOINT"


@dataclass(frozen=True)
class DinoVariant:
    """A GroundingDINO layout: shipped config file, released checkpoint name, config overrides."""

    config_file: str
    checkpoint_file: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)


DINO_VARIANTS: dict[str, DinoVariant] = {
    "swint_ogc": DinoVariant("GroundingDINO_SwinT_OGC.py", "groundingdino_swint_ogc.pth"),
    "swinb": DinoVariant("GroundingDINO_SwinB_cfg.py", "groundingdino_swinb_cogcoor.pth"),
    "test": DinoVariant(
        "GroundingDINO_SwinT_OGC.py",
        None,
        {
            "enc_layers": 1,
            "dec_layers": 1,
            "num_queries": 100,
            "dim_feedforward": 512,
            "text_encoder_type": f"{OFFLINE_BERT_PREFIX}2",
        },
    ),
}


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint file does not exist; the message names the path and the download URL."""


class CheckpointMismatchError(InputError):
    """A checkpoint does not fit the model (wrong shapes, missing required keys, unreadable)."""


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def weights_dir() -> Path:
    """Default checkpoint folder: ``~/.cache/addclass/weights`` (``$ADDCLASS_CACHE_DIR/weights`` when set)."""
    return cache_root() / "weights"


def resolve_checkpoint(
    *, explicit: str | os.PathLike[str] | None, env_var: str, file_name: str | None, url: str, what: str
) -> Path:
    """Find a checkpoint: explicit path, else ``$env_var``, else ``weights_dir() / file_name``.

    Raises:
        MissingCheckpointError: the file does not exist (message: path, file name, URL).
        ValueError: no path given and the variant has no released checkpoint.
    """
    if explicit is not None:
        path, origin = Path(explicit).expanduser(), "argument"
    elif os.environ.get(env_var):
        path, origin = Path(os.environ[env_var]).expanduser(), f"${env_var}"
    elif file_name is not None:
        path, origin = weights_dir() / file_name, "default folder"
    else:
        raise InputError(f"{what} has no released checkpoint; pass a checkpoint path or random_weights=True.")
    if not path.is_file():
        expected = file_name or path.name
        raise MissingCheckpointError(
            f"{what} checkpoint not found: {path} (from {origin}). Download {expected} from {url} "
            "and put it at "
            f"{path}, or pass its path (argument or ${env_var}). For tests only: random_weights=True."
        )
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (``weights_only``): a state dict or ``{"model": state_dict}``; strips ``module.``."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / zip errors: say which file
        raise CheckpointMismatchError(f"Cannot read checkpoint {path}: {exc}") from exc
    state = raw.get("model", raw) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} is not a state dict (or a dict with a 'model' state dict).")
    return {(k.removeprefix("module.")): v for k, v in state.items()}


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    path: Path,
    strict: bool,
    required_prefixes: tuple[str, ...] = (),
) -> None:
    """Validate ``state`` against ``model`` before loading; log what a non-strict load would skip.

    Raises:
        CheckpointMismatchError: a shape differs; (strict) any key is missing or unexpected; (non-strict) a
            parameter under ``required_prefixes`` is missing.
    """
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if wrong:
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the model ({len(wrong)} shape mismatches, e.g. "
            f"{'; '.join(wrong[:3])}). Is it the checkpoint of the selected variant?"
        )
    if strict and (missing or unexpected):
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
        )
    params = {name for name, _ in model.named_parameters()}
    required_missing = [k for k in missing if k in params and k.startswith(required_prefixes)]
    if required_missing:
        raise CheckpointMismatchError(
            f"Checkpoint {path} lacks {len(required_missing)} required weights under {required_prefixes} "
            f"(e.g. {required_missing[:3]}); they would stay random."
        )
    if missing or unexpected:
        logger.warning(
            "Loading %s non-strictly: missing keys %s; unexpected keys %s", path, missing, unexpected
        )


# ----------------------------------------------------------------------------------------------------------
# Model builders
# ----------------------------------------------------------------------------------------------------------


def build_dino(
    *, config: str, checkpoint: Path | None, device: torch.device, seed: int = 0
) -> GroundingDINO:
    """Build GroundingDINO offline (Recipe A); load ``checkpoint`` with ``strict=False`` (as the reference).

    Fails when any ``bert.*`` or ``backbone.*`` parameter is missing from the checkpoint; other differences
    are logged.
    """
    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    install_offline_patches()
    variant = DINO_VARIANTS[config]
    args = SLConfig.fromfile(str(Path(groundingdino.__file__).parent / "config" / variant.config_file))
    for key, value in variant.overrides.items():
        setattr(args, key, value)
    args.device = str(device)
    # Gradient checkpointing is a training-memory option; numerically identical, and slower in inference.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(args)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        check_state_dict(
            model, state, path=checkpoint, strict=False, required_prefixes=("bert.", "backbone.")
        )
        model.load_state_dict(state, strict=False)
    return model.eval()
