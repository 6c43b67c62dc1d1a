"""Optimizer, parameter groups, learning-rate schedule and the two training recipes.

The **paper recipe** (MaSSFormer's released config, for a backbone that starts from ImageNet weights or a
trained model): AdamW (lr 3e-4, weight decay 0.05, eps 1e-8, betas 0.9 / 0.999); backbone lr x0.1; no weight
decay on the query and level embeddings and on every normalization layer; per-iteration cosine decay to 0
without warm-up; gradient clipping by global L2 norm at 0.01 (done by the trainer).

The **scratch recipe** is for randomly initialised models, which the paper recipe barely moves (its backbone
learns at a tenth of the rate and its clip holds every step to a norm of 0.01): see `SCRATCH_RECIPE` for the
values and docs/recipes.md for the measurements that chose them. `Recipe` holds one recipe's
optimisation settings; `RECIPES` is the table of the named ones.

Groups are built from module types and object identity, not from parameter-name strings (style
anti-pattern #8):

- backbone = the parameters of ``model.backbone`` (identity);
- no decay = parameters of normalization modules (BatchNorm/SyncBatchNorm/InstanceNorm, LayerNorm,
  GroupNorm, LocalResponseNorm, RMSNorm) and of ``nn.Embedding`` modules (Mask2Former's ``query_feat``,
  ``query_embed`` and ``level_embed`` are embeddings), plus, for implementations that hold them as bare
  ``nn.Parameter`` or other modules, whatever a module exposes under the attributes ``query_embed``,
  ``query_feat`` and ``level_embed``, and Swin's relative position bias tables (attribute
  ``relative_position_bias_table``, SeMask FPN; its config's ``decay_mult=0``);
- everything else (conv/linear weights and biases) decays, as in the mmseg config where only the norms and
  the three embeddings have ``decay_mult=0``.

Frozen parameters (``requires_grad=False``, e.g. the backbone BN affines) are left out of the optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from addclass.common.errors import InputError

DEFAULT_LR = 3e-4
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_BACKBONE_LR_MULT = 0.1
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
# Global L2 gradient-norm clip, applied by the trainer after backward:
# torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_MAX_NORM, GRAD_CLIP_NORM_TYPE)
GRAD_CLIP_MAX_NORM = 0.01
GRAD_CLIP_NORM_TYPE = 2.0


@dataclass(frozen=True)
class Recipe:
    """The optimisation settings a training run takes from its recipe, unless set explicitly.

    Attributes:
        name: ``"paper"`` or ``"scratch"`` (keys of `RECIPES`).
        lr: Base learning rate of AdamW.
        backbone_lr_mult: Learning-rate multiplier of the backbone.
        warmup_frac: Share of the run's iterations spent in a linear warm-up from ~0 to ``lr``.
        max_warmup_iters: Upper bound of the warm-up, in iterations.
        grad_clip: Global L2 gradient-norm clip (0: none).
        ema_decay: Decay of the weight average the run keeps and scores (`models.training.ema`; 0: none).
    """

    name: str
    lr: float
    backbone_lr_mult: float
    warmup_frac: float
    max_warmup_iters: int
    grad_clip: float
    ema_decay: float = 0.0

    def warmup_iters(self, iters: int) -> int:
        """Warm-up length of a run of ``iters`` iterations."""
        return min(self.max_warmup_iters, int(round(self.warmup_frac * iters)))


PAPER_RECIPE = Recipe(name="paper", lr=DEFAULT_LR, backbone_lr_mult=DEFAULT_BACKBONE_LR_MULT, warmup_frac=0.0,
                      max_warmup_iters=0, grad_clip=GRAD_CLIP_MAX_NORM)
# Chosen on the validation split of synthetic scenes (docs/recipes.md): from 300 steps of the paper
# recipe (car IoU ~50 %) to ~87 % in 600 steps; lr 2e-3 beat 1e-3, the backbone at the full rate beat x0.1.
# A weight average (``ema_decay`` 0.99) was measured on it and made no difference beyond the spread between
# seeds (docs/recipes.md): it is an option, not part of the recipe.
SCRATCH_RECIPE = Recipe(name="scratch", lr=2e-3, backbone_lr_mult=1.0, warmup_frac=0.1, max_warmup_iters=1500,
                        grad_clip=1.0)
RECIPES: dict[str, Recipe] = {r.name: r for r in (PAPER_RECIPE, SCRATCH_RECIPE)}
RECIPE_CHOICES = ("auto", *RECIPES)


def choose_recipe(recipe: str, *, pretrained: bool) -> Recipe:
    """The recipe a run uses: ``"auto"`` is ``paper`` for a model that starts from trained weights (ImageNet
    backbone or a trained model) and ``scratch`` for a random start.

    Raises:
        ValueError: ``recipe`` is none of `RECIPE_CHOICES`.
    """
    if recipe == "auto":
        return PAPER_RECIPE if pretrained else SCRATCH_RECIPE
    if recipe not in RECIPES:
        raise InputError(f"Expected recipe in {RECIPE_CHOICES}. Got {recipe!r} instead.")
    return RECIPES[recipe]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1/2/3d, SyncBatchNorm, InstanceNorm1/2/3d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
NO_DECAY_ATTRIBUTES: tuple[str, ...] = ("query_embed", "query_feat", "level_embed", "relative_position_bias_table")


def no_decay_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that get no weight decay (module docstring).

    Args:
        model: Any module.

    Returns:
        Set of ``id(parameter)``.
    """
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES + (nn.Embedding,)):
            ids.update(id(p) for p in module.parameters(recurse=False))
        for attr in NO_DECAY_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, nn.Parameter):
                ids.add(id(value))
            elif isinstance(value, nn.Module):
                ids.update(id(p) for p in value.parameters())
    return ids


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = DEFAULT_BACKBONE_LR_MULT,
) -> list[dict[str, Any]]:
    """Splits the trainable parameters into (backbone or not) x (decay or not) groups.

    Args:
        model: The model; its backbone, if any, is the attribute ``model.backbone``.
        lr: Base learning rate.
        weight_decay: Weight decay of the decaying groups.
        backbone_lr_mult: Learning-rate multiplier of the backbone.

    Returns:
        Non-empty groups, each ``{"name", "params", "lr", "weight_decay"}``, in the order ``backbone``,
        ``backbone_no_decay``, ``head``, ``head_no_decay``. Every trainable parameter appears exactly once.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    no_decay_ids = no_decay_parameters(model)
    groups: dict[str, dict[str, Any]] = {
        "backbone": {"lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
        "backbone_no_decay": {"lr": lr * backbone_lr_mult, "weight_decay": 0.0},
        "head": {"lr": lr, "weight_decay": weight_decay},
        "head_no_decay": {"lr": lr, "weight_decay": 0.0},
    }
    params: dict[str, list[nn.Parameter]] = {name: [] for name in groups}
    for p in model.parameters():  # deduplicates shared parameters
        if not p.requires_grad:
            continue
        name = "backbone" if id(p) in backbone_ids else "head"
        if id(p) in no_decay_ids:
            name += "_no_decay"
        params[name].append(p)
    return [{"name": name, "params": params[name], **groups[name]} for name in groups if params[name]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    backbone_lr_mult: float = DEFAULT_BACKBONE_LR_MULT,
    betas: tuple[float, float] = ADAMW_BETAS,
    eps: float = ADAMW_EPS,
) -> torch.optim.AdamW:
    """AdamW over ``build_param_groups(model, ...)`` (docs/design.md §3.1 defaults).

    Args:
        model: The model (backbone at ``model.backbone``).
        lr: Base learning rate.
        weight_decay: Weight decay of the decaying groups.
        backbone_lr_mult: Backbone learning-rate multiplier.
        betas: Adam betas.
        eps: Adam epsilon.

    Returns:
        The optimizer.
    """
    groups = build_param_groups(model, lr=lr, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def cosine_factor(iteration: int, *, max_iters: int, warmup_iters: int = 0) -> float:
    """Learning-rate factor at iteration t: linear warm-up ``(t + 1) / W`` for t < W, then cosine decay
    ``0.5 * (1 + cos(pi * (t - W) / (T - W)))``, held at 0 after ``T`` (eta_min = 0). W = 0: plain cosine.

    Args:
        iteration: Number of completed iterations t.
        max_iters: T.
        warmup_iters: W, 0 <= W < T.

    Returns:
        Multiplier of each group's initial learning rate.
    """
    if iteration < warmup_iters:
        return (max(iteration, 0) + 1) / warmup_iters
    t = min(iteration, max_iters) - warmup_iters
    return 0.5 * (1.0 + math.cos(math.pi * t / (max_iters - warmup_iters)))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, max_iters: int, warmup_iters: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration (warm-up and) cosine schedule: call ``scheduler.step()`` once after every optimizer step.

    Without warm-up the closed form (``LambdaLR``) equals ``CosineAnnealingLR(T_max=max_iters, eta_min=0)``
    without its recursive rounding; it resumes exactly from ``state_dict()``.

    Args:
        optimizer: Optimizer whose groups' current ``lr`` are the base rates.
        max_iters: Total iterations (MaSSFormer's release: `models.release.ITERS`).
        warmup_iters: Linear warm-up iterations (paper recipe: 0).

    Returns:
        The scheduler.
    """
    if max_iters < 1 or not 0 <= warmup_iters < max_iters:
        raise InputError(
            f"Expected max_iters >= 1 and 0 <= warmup_iters < max_iters. Got {max_iters}, {warmup_iters} instead."
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(cosine_factor, max_iters=max_iters, warmup_iters=warmup_iters)
    )
