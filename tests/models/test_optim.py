"""Parameter groups, AdamW settings and the per-iteration cosine schedule (docs/design.md §3.1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from addclass.models.training.optim import (
    GRAD_CLIP_MAX_NORM,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.bn.requires_grad_(False)  # frozen affines, as the R50 backbone
        self.proj = nn.Conv2d(4, 4, 1)
        self.ln = nn.LayerNorm(4)  # a trainable norm inside the backbone


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_feat = nn.Embedding(5, 4)
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))  # bare parameter variant
        self.norm = nn.LayerNorm(4)
        self.cls_embed = nn.Linear(4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.mask_embed = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


class _StandIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.pixel_decoder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.decoder = _Decoder()


# docs/design.md §3.1: backbone lr x0.1; query_embed, query_feat, level_embed and all norms decay x0
EXPECTED = {
    "backbone": {"backbone.conv.weight", "backbone.proj.weight", "backbone.proj.bias"},
    "backbone_no_decay": {"backbone.ln.weight", "backbone.ln.bias"},
    "head": {
        "pixel_decoder.0.weight",
        "pixel_decoder.0.bias",
        "decoder.cls_embed.weight",
        "decoder.cls_embed.bias",
        "decoder.mask_embed.0.weight",
        "decoder.mask_embed.0.bias",
        "decoder.mask_embed.2.weight",
        "decoder.mask_embed.2.bias",
    },
    "head_no_decay": {
        "pixel_decoder.1.weight",
        "pixel_decoder.1.bias",
        "decoder.query_feat.weight",
        "decoder.query_embed.weight",
        "decoder.level_embed",
        "decoder.norm.weight",
        "decoder.norm.bias",
        "decoder.gn.weight",
        "decoder.gn.bias",
    },
}


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_param_groups_on_stand_in_model() -> None:
    model = _StandIn()
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    got = {g["name"]: _names(model, g["params"]) for g in groups}
    assert got == EXPECTED
    hyper = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert hyper["backbone"] == (pytest.approx(1e-4), 0.05)
    assert hyper["backbone_no_decay"] == (pytest.approx(1e-4), 0.0)
    assert hyper["head"] == (1e-3, 0.05)
    assert hyper["head_no_decay"] == (1e-3, 0.0)
    # the frozen BN affines are in no group
    frozen = {"backbone.bn.weight", "backbone.bn.bias"}
    assert not frozen & set().union(*got.values())


def test_shared_parameter_appears_once() -> None:
    model = _StandIn()
    model.decoder.extra = model.decoder.cls_embed  # the same module under two names
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_build_optimizer_defaults() -> None:
    model = _StandIn()
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8
        base = 3e-4 * (0.1 if g["name"].startswith("backbone") else 1.0)
        assert g["lr"] == pytest.approx(base)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
    assert GRAD_CLIP_MAX_NORM == 0.01


def test_cosine_schedule_per_iteration() -> None:
    model = _StandIn()
    opt = build_optimizer(model)
    max_iters = 8
    sched = build_lr_scheduler(opt, max_iters=max_iters)
    ref_opt = build_optimizer(model)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=max_iters, eta_min=0.0)
    bases = [g["lr"] for g in opt.param_groups]
    assert bases[0] == pytest.approx(3e-5) and bases[-1] == pytest.approx(3e-4)  # no warm-up: full lr at 0
    for t in range(1, max_iters + 3):
        opt.step()
        sched.step()
        ref_opt.step()
        ref.step()
        factor = 0.5 * (1 + math.cos(math.pi * min(t, max_iters) / max_iters))
        for g, base in zip(opt.param_groups, bases, strict=True):
            assert g["lr"] == pytest.approx(base * factor, abs=1e-12)
        if t <= max_iters:
            for g, r in zip(opt.param_groups, ref_opt.param_groups, strict=True):
                assert g["lr"] == pytest.approx(r["lr"], abs=1e-10)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # held at eta_min after max_iters

    # resume from a state dict mid-schedule
    opt2 = build_optimizer(model)
    sched2 = build_lr_scheduler(opt2, max_iters=100)
    for _ in range(30):
        opt2.step()
        sched2.step()
    opt3 = build_optimizer(model)
    opt3.load_state_dict(opt2.state_dict())
    sched3 = build_lr_scheduler(opt3, max_iters=100)
    sched3.load_state_dict(sched2.state_dict())
    opt3.step()
    sched3.step()
    assert opt3.param_groups[-1]["lr"] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 31 / 100)))


def test_param_groups_on_tiny_massformer() -> None:
    from addclass.models.build import build_massformer_tiny

    model = build_massformer_tiny(num_classes=8)
    groups = {g["name"]: g for g in build_param_groups(model, lr=3e-4, weight_decay=0.05)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    assert set().union(*ids.values()) == trainable

    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert backbone and ids["backbone"] | ids.get("backbone_no_decay", set()) == backbone
    assert groups["backbone"]["lr"] == pytest.approx(3e-5) and groups["head"]["lr"] == pytest.approx(3e-4)
    no_decay = ids.get("backbone_no_decay", set()) | ids["head_no_decay"]
    decoder = model.transformer_decoder
    for embedding in (decoder.query_feat, decoder.query_embed, decoder.level_embed):
        assert {id(p) for p in embedding.parameters()} <= ids["head_no_decay"]
    for module in model.modules():
        own = {id(p) for p in module.parameters(recurse=False) if p.requires_grad}
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            assert own <= no_decay, type(module).__name__
        elif isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            assert not own & no_decay, type(module).__name__  # conv/linear weights and biases decay
    # the backbone's BN affines are frozen (docs/design.md §1.2) and therefore in no group
    frozen_bn = [p for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert frozen_bn and not {id(p) for p in frozen_bn} & trainable


def test_one_training_step_on_tiny_massformer() -> None:
    from addclass.models.build import build_massformer_tiny
    from addclass.models.training.criterion import build_criterion
    from addclass.models.training.targets import build_targets

    torch.manual_seed(0)
    model = build_massformer_tiny(num_classes=8)
    opt = build_optimizer(model)
    sched = build_lr_scheduler(opt, max_iters=10)
    crit = build_criterion(num_classes=8, num_points=64)
    labels = torch.zeros(32, 40, dtype=torch.uint8)
    labels[8:20, 10:30] = 7
    labels[:4] = 5
    images = torch.rand(2, 3, 32, 40) * 255  # batch 2: the global branch has BatchNorm after global pooling
    targets = [build_targets(labels, pseudo_classes={7}), build_targets(labels.flip(1), pseudo_classes={7})]
    losses = crit(model(images), targets)
    assert "loss_edge" in losses and len(losses) == 3 * (1 + 3) + 1  # last + 3 aux outputs, plus edge
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    before = model.transformer_decoder.query_feat.weight.detach().clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_MAX_NORM)
    opt.step()
    sched.step()
    after = model.transformer_decoder.query_feat.weight
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_warm_up_then_cosine() -> None:
    model = _StandIn()
    opt = build_optimizer(model, lr=1e-3, backbone_lr_mult=1.0)
    sched = build_lr_scheduler(opt, max_iters=10, warmup_iters=4)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear up to the full rate at step W
    assert seen[4] == pytest.approx(1e-3)  # then cosine over the remaining T - W steps
    assert seen[7] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert seen[10:] == [0.0, 0.0]
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="warmup_iters"):
            build_lr_scheduler(opt, max_iters=10, warmup_iters=bad)


def test_recipes() -> None:
    from addclass.models.training.optim import PAPER_RECIPE, RECIPES, SCRATCH_RECIPE, choose_recipe

    assert set(RECIPES) == {"paper", "scratch"}
    assert (PAPER_RECIPE.lr, PAPER_RECIPE.backbone_lr_mult, PAPER_RECIPE.grad_clip) == (3e-4, 0.1, 0.01)
    assert PAPER_RECIPE.warmup_iters(80000) == 0 and SCRATCH_RECIPE.warmup_iters(80000) == 1500
    assert choose_recipe("auto", pretrained=True) is PAPER_RECIPE
    assert choose_recipe("auto", pretrained=False) is SCRATCH_RECIPE
    assert choose_recipe("paper", pretrained=False) is PAPER_RECIPE
    with pytest.raises(ValueError, match="recipe"):
        choose_recipe("sgd", pretrained=False)
