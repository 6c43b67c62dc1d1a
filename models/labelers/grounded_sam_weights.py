"""Grounded-SAM weights: where checkpoints come from, how they are checked, and the SAM / GroundingDINO builders.

Nothing is downloaded; random weights only when the caller asks (``checkpoint=None``). Default file names:

- SAM ``vit_b``: ``sam_vit_b_01ec64.pth``; ``vit_l``: ``sam_vit_l_0b3195.pth``; ``vit_h``:
  ``sam_vit_h_4b8939.pth``. Download: https://github.com/facebookresearch/segment-anything#model-checkpoints
- GroundingDINO ``swint_ogc``: ``groundingdino_swint_ogc.pth``; ``swinb``:
  ``groundingdino_swinb_cogcoor.pth``. Download: https://github.com/IDEA-Research/GroundingDINO/releases

Test-only variants: ``"tiny"`` SAM (`build_tiny_sam`) and the ``"test"`` GroundingDINO layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.errors import InputError, UserError
from models.labelers.bert_offline import OFFLINE_BERT_PREFIX, cache_root, install_offline_patches

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO
    from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)

SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
DINO_URL = "https://github.com/IDEA-Research/GroundingDINO/releases"
SAM_ENV = "ADDCLASS_SAM_CHECKPOINT"
DINO_ENV = "ADDCLASS_DINO_CHECKPOINT"
SAM_CHECKPOINT_FILES: dict[str, str | None] = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "tiny": None,
}


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


def build_tiny_sam() -> Sam:
    """SAM with a tiny ViT encoder (2 windowed blocks, width 64) for tests; same 1024 input and 64 x 64 x 256
    embedding, and SAM's real prompt encoder and mask decoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=1024,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=False,  # window attention only: global attention over 4096 tokens dominates the time
            global_attn_indexes=(),
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_sam(*, variant: str, checkpoint: Path | None, seed: int = 0) -> Sam:
    """Build SAM ``variant`` (vit_b, vit_l, vit_h, tiny): load ``checkpoint`` strictly, else seeded random."""
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam() if variant == "tiny" else sam_model_registry[variant](checkpoint=None)
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        check_state_dict(sam, state, path=checkpoint, strict=True)
        sam.load_state_dict(state, strict=True)
    return sam.eval()


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
