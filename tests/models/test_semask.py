"""The SeMask FPN baseline (docs/design.md §1.9): Swin blocks against a naive computation, shapes, the
mask-classification adaptation (fixed per-class head, assignment by class, semantic-prior loss), parameter
counts, ImageNet Swin weights in the Microsoft layout, and other models' losses left unchanged.

Real forwards use ``semask_fpn_tiny`` at small sizes; ``semask_fpn_swint`` is only ever built on the meta device."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from addclass.common.errors import StateError
from addclass.models.build import MODEL_BUILDERS, model_info
from addclass.models.massformer.model import MaSSFormer
from addclass.models.semask.heads import FixedClassHead
from addclass.models.semask.semask import (
    SHIFT_MASK_VALUE,
    SeMaskSwinBackbone,
    SwinBlock,
    relative_position_index,
    shifted_window_mask,
)
from addclass.models.training.criterion import (
    SetCriterion,
    build_criterion,
    class_assignment,
    with_every_class,
)
from addclass.models.training.matcher import HungarianMatcher
from addclass.models.training.targets import build_targets
from addclass.models.weights import load_backbone_checkpoint

K = 5
VARIANT = "semask_fpn_tiny"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread keeps these tests' time predictable
    yield
    torch.set_num_threads(n)


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0


def _build(seed: int = 0) -> MaSSFormer:
    torch.manual_seed(seed)
    return MODEL_BUILDERS[VARIANT](K)


def _naive_block(block: SwinBlock, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The block by definition, on the whole (padded, rolled) map at once: a token attends to the tokens of its
    own window, except (shifted) those that the roll wrapped around when it was not wrapped itself, or the other
    way round (they were not neighbours); relative positions from coordinates."""
    b, _, c = x.shape
    ws, s = block.window, block.shift
    heads = block.attn.num_heads
    y = F.pad(block.norm1(x).view(b, h, w, c), (0, 0, 0, -w % ws, 0, -h % ws))  # B x Hp x Wp x C
    hp, wp = y.shape[1:3]
    ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    # Rolled by -s, the last s rows (columns) of the map are the wrapped-around first rows (columns).
    region = ((ys >= hp - s).long() * 2 + (xs >= wp - s).long()).flatten() if s else torch.zeros(hp * wp)  # N
    window = ((ys // ws) * (wp // ws) + xs // ws).flatten()  # N, in rolled coordinates
    ry, rx = (ys % ws).flatten(), (xs % ws).flatten()
    allowed = (window[:, None] == window[None, :]) & (region[:, None] == region[None, :])  # N x N
    bias_index = (ry[:, None] - ry[None, :] + ws - 1) * (2 * ws - 1) + (rx[:, None] - rx[None, :] + ws - 1)
    bias = block.attn.relative_position_bias_table[bias_index]  # N x N x heads
    tokens = torch.roll(y, shifts=(-s, -s), dims=(1, 2)).reshape(b, hp * wp, c)  # B x N x C
    q, k, v = block.attn.qkv(tokens).view(b, hp * wp, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + bias.permute(2, 0, 1)  # B x heads x N x N
    same_window = window[:, None] == window[None, :]
    logits = (logits + SHIFT_MASK_VALUE * (same_window & ~allowed)).masked_fill(~same_window, float("-inf"))
    out = block.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, hp * wp, c))  # B x N x C
    out = torch.roll(out.view(b, hp, wp, c), shifts=(s, s), dims=(1, 2))[:, :h, :w].reshape(b, h * w, c)
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(("h", "w", "shift"), [(8, 8, 2), (7, 6, 2), (7, 6, 0)])
def test_swin_block_matches_a_naive_masked_computation(h: int, w: int, shift: int) -> None:
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window=4, shift=shift, mlp_ratio=2.0, drop_path=0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # a visible bias
        x = torch.randn(2, h * w, 8)
        hp, wp = math.ceil(h / 4) * 4, math.ceil(w / 4) * 4
        got = block(x, h, w, shifted_window_mask(hp, wp, 4, 2, x.device))
        assert torch.allclose(got, _naive_block(block, x, h, w), atol=1e-5)


def test_relative_position_index_is_swins_layout() -> None:
    index = relative_position_index(2)  # tokens (0,0), (0,1), (1,0), (1,1); table (2*2-1)^2 = 9 entries
    assert index[0].tolist() == [4, 3, 1, 0] and index[3].tolist() == [8, 7, 5, 4]


def test_forward_shapes_at_an_odd_size_and_scores_are_the_class_sigmoids() -> None:
    model = _build().train()
    h, w = 70, 90  # pads to 96 x 96; Swin pads every stage to its 7 x 7 windows
    out = model(_images(2, h, w))
    assert out["pred_logits"].shape == (2, K, K + 1)
    assert out["pred_masks"].shape == (2, K, math.ceil(h / 2), math.ceil(w / 2))
    assert out["aux_outputs"] == [] and out["pred_edge"] is None
    assert out["aux_semantic"].shape == (2, K, math.ceil(h / 4), math.ceil(w / 4))
    assert out["query_classes"].tolist() == list(range(K))
    model.eval()
    x = _images(1, 64, 96, seed=1)  # multiples of 32: nothing cropped
    with torch.no_grad():
        masks = model(x)["pred_masks"]
        expected = F.interpolate(masks, size=(64, 96), mode="bilinear", align_corners=False).sigmoid()
        assert torch.allclose(model.semantic_probs(x), expected, atol=1e-6)
    assert model.predict(_images(1, h, w)).shape == (1, h, w)


def _targets(h: int, w: int) -> list[dict[str, torch.Tensor]]:
    labels = torch.zeros(2, h, w, dtype=torch.uint8)
    labels[0, : h // 2] = 1
    labels[0, h // 2 :, w // 3 :] = 4  # pseudo class
    labels[1, :, w // 2 :] = 2
    labels[1, :3, :3] = 255
    return [build_targets(m, pseudo_classes={4}) for m in labels]


def test_training_step_with_the_set_criterion_and_the_semantic_prior_loss() -> None:
    model = _build().train()
    h, w = 64, 96
    criterion = build_criterion(num_classes=K, num_points=256, reweight="inverse")
    losses = criterion(model(_images(2, h, w)), _targets(h, w), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_mask", "loss_dice", "loss_semantic"}  # no class loss: the class head is fixed
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters()))
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())  # type: ignore[arg-type]
    # The semantic-prior loss reaches every stage's class projection.
    for stage in model.backbone.layers:  # type: ignore[union-attr]
        assert stage.semantic_layer.attn.mlp_cls_q.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_semantic_prior_loss_is_ce_over_labelled_pixels_times_its_weight() -> None:
    h, w = 8, 12
    targets = _targets(h, w)
    logits = torch.randn(2, K, h // 4, w // 4)
    criterion = SetCriterion(num_classes=K, matcher=HungarianMatcher(num_points=16), losses=("semantic",))
    got = criterion({"pred_logits": torch.zeros(2, 3, K + 1), "pred_masks": torch.zeros(2, 3, 4, 6),
                     "aux_semantic": logits}, targets)["loss_semantic"]
    up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    lab = torch.stack([(t["labels"][:, None, None] * t["masks"]).sum(0) for t in targets]).long()  # 2 x h x w
    lab[1, :3, :3] = -100  # the ignore pixels
    assert torch.allclose(got, 0.4 * F.cross_entropy(up, lab, ignore_index=-100))


def test_hungarian_matching_does_not_force_class_k_to_query_k_but_class_assignment_does() -> None:
    # Fixed class logits make query k's class cost -2 for class k and 0 for the others; the mask costs can
    # outweigh that, so the matcher alone would hand a segment to the wrong query (and ask it for a class its
    # fixed logits cannot give): the criterion assigns by class for outputs with ``query_classes``.
    head = FixedClassHead(num_classes=3)
    target = {"labels": torch.tensor([0]), "masks": torch.zeros(1, 8, 8)}
    target["masks"][0, :, :4] = 1.0
    good = torch.full((1, 3, 8, 8), -10.0)
    good[0, 0, :, :4] = 10.0  # query 0 (class 0) predicts the segment well
    bad = torch.full((1, 3, 8, 8), -10.0)
    bad[0, 2, :, :4] = 10.0  # only query 2 (class 2) covers it
    logits, _ = head(torch.zeros(1, 3, 4, 4), [], mask_stride=4)[0]
    matcher = HungarianMatcher(num_points=64)
    g = torch.Generator().manual_seed(0)
    assert matcher({"pred_logits": logits, "pred_masks": good}, [target], generator=g)[0][0].tolist() == [0]
    assert matcher({"pred_logits": logits, "pred_masks": bad}, [target], generator=g)[0][0].tolist() == [2]
    assert [t.tolist() for t in class_assignment(torch.arange(3), [target])[0]] == [[0], [0]]
    two = {"labels": torch.tensor([0, 2]), "masks": torch.zeros(2, 8, 8)}
    assert [t.tolist() for t in class_assignment(torch.arange(3), [two])[0]] == [[0, 2], [0, 1]]


def test_other_models_losses_are_unchanged_by_the_semantic_loss_option() -> None:
    # Outputs without ``aux_semantic`` / ``query_classes``: the default losses (now incl. "semantic") give the
    # same keys and bit-identical values as the previous default ("labels", "masks", "edge").
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, K + 1), "pred_masks": torch.randn(2, 6, 32, 48),
               "aux_outputs": [{"pred_logits": torch.randn(2, 6, K + 1), "pred_masks": torch.randn(2, 6, 16, 24)}],
               "pred_edge": torch.randn(2, 1, 32, 48)}
    targets = _targets(64, 96)
    new = build_criterion(num_classes=K, num_points=128)(outputs, targets, generator=torch.Generator().manual_seed(1))
    old = build_criterion(num_classes=K, num_points=128, losses=("labels", "masks", "edge"))(
        outputs, targets, generator=torch.Generator().manual_seed(1))
    assert set(new) == set(old) and "loss_ce" in new and "loss_edge" in new
    assert all(torch.equal(new[k], old[k]) for k in old)


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    model = _build(seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = _build(seed=1).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = _images(1, 70, 90, seed=2)
    with torch.no_grad():
        a, b = model(x), other(x)
    assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["aux_semantic"], b["aux_semantic"])


def _hand_count(num_classes: int) -> dict[str, int]:
    """SeMask FPN Swin-T counted from the configs (docs/design.md §1.9)."""
    dims, depths, heads = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24)
    swin = 3 * 96 * 16 + 96 + 2 * 96  # patch embedding conv + its LayerNorm
    for d, n, h in zip(dims, depths, heads, strict=True):
        swin += n * (12 * d * d + 13 * d + 169 * h)  # norms, qkv, proj, MLP 4x, bias table 13 x 13 x heads
    swin += sum(8 * d * d + 8 * d for d in dims[:3])  # patch merging: LayerNorm 4d + Linear 4d -> 2d
    semantic = sum(2 * d * d + 2 * d * num_classes + 4 * d + 2 * num_classes + 1 for d in dims)
    out_norms = sum(2 * d for d in dims)
    # Semantic FPN head, width 256, no neck: level i has max(1, i) 3x3 conv + BN, the first from C_i.
    head = sum(c * 256 * 9 + 512 + (max(1, i) - 1) * (256 * 256 * 9 + 512) for i, c in enumerate(dims))
    head += 256 * num_classes + num_classes  # 1x1 classifier
    return {"swin": swin, "semantic_layers": semantic, "out_norms": out_norms, "pixel_decoder": head}


SWINT_TOTAL = {7: 34_206_013, 150: 34_655_748}  # the paper: SeMask-T FPN 35M on ADE20K (K = 150)


@pytest.mark.parametrize("num_classes", [7, 150])
def test_swint_parameter_count(num_classes: int) -> None:
    info = model_info("semask_fpn_swint", num_classes=num_classes)
    hand = _hand_count(num_classes)
    assert info["backbone_parts"] == {k: hand[k] for k in ("swin", "semantic_layers", "out_norms")}
    assert info["components"]["pixel_decoder"] == hand["pixel_decoder"]
    assert info["components"]["transformer_decoder"] == info["components"]["heads"] == 0
    assert info["total"] == info["trainable"] == SWINT_TOTAL[num_classes]
    assert info["pixel_decoder"] == "semantic_fpn"


def _microsoft_swin_state_dict(depths: tuple[int, ...], dim: int, heads: tuple[int, ...], window: int) -> dict:
    """Every tensor name and shape of a Microsoft-release Swin (classifier of 1000 classes included), random."""
    g = torch.Generator().manual_seed(5)
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (dim, 3, 4, 4), "patch_embed.proj.bias": (dim,),
                                          "patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)}
    n = window * window
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        d = dim * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes |= {p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                       p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                       p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                       p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                       p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                       p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                       p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,)}
        if i < 3:
            p = f"layers.{i}.downsample."
            shapes |= {p + "reduction.weight": (2 * d, 4 * d), p + "norm.weight": (4 * d,), p + "norm.bias": (4 * d,)}
    last = dim * 8
    shapes |= {"norm.weight": (last,), "norm.bias": (last,), "head.weight": (1000, last), "head.bias": (1000,)}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for i, depth in enumerate(depths):  # buffers the release saves
        for j in range(depth):
            sd[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = relative_position_index(window)
            if j % 2:
                sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, n, n)
    return sd


def test_imagenet_swin_in_the_microsoft_layout_loads_into_the_swin_parts(tmp_path: Path) -> None:
    model = _build()  # semask_fpn_tiny: C = 32, depths 2/2/2/2, heads 1/2/4/8, window 7
    sd = _microsoft_swin_state_dict((2, 2, 2, 2), 32, (1, 2, 4, 8), 7)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": sd}, path)
    backbone = model.backbone
    assert isinstance(backbone, SeMaskSwinBackbone)
    semantic_before = backbone.layers[1].semantic_layer.attn.mlp_v.weight.clone()  # type: ignore[union-attr]
    assert load_backbone_checkpoint(model, path) == ([], [])  # strict over the Swin parts
    assert torch.equal(backbone.layers[2].blocks[1].attn.relative_position_bias_table,  # type: ignore[union-attr,index]
                       sd["layers.2.blocks.1.attn.relative_position_bias_table"])
    assert torch.equal(backbone.layers[0].downsample.reduction.weight,  # type: ignore[union-attr]
                       sd["layers.0.downsample.reduction.weight"])
    assert torch.equal(backbone.layers[1].semantic_layer.attn.mlp_v.weight, semantic_before)  # type: ignore[union-attr]
    # A file missing a Swin tensor, or with one the backbone lacks, is refused under strict loading.
    for broken in ({k: v for k, v in sd.items() if k != "layers.3.blocks.0.mlp.fc2.bias"},
                   {**sd, "layers.0.blocks.0.attn.extra": torch.zeros(1)}):
        torch.save({"model": broken}, path)
        with pytest.raises(StateError, match="Swin backbone"):
            load_backbone_checkpoint(model, path)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_swint_loads_the_real_file_layout_on_meta(tmp_path: Path) -> None:
    sd = _microsoft_swin_state_dict((2, 2, 6, 2), 96, (3, 6, 12, 24), 7)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in sd.items()}}, path)
    with torch.device("meta"):
        model = MODEL_BUILDERS["semask_fpn_swint"](7)
    assert load_backbone_checkpoint(model, path) == ([], [])


def test_model_folder_builds_and_reloads(tmp_path: Path) -> None:
    from addclass.tasks.model_files.model_folder import (
        FORMAT,
        FORMAT_VERSION,
        load_trained_model,
        read_model_config,
        save_model_dir,
    )

    model = _build().eval()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": VARIANT,
              "pixel_decoder": "semantic_fpn", "num_classes": K, "class_names": [f"c{i}" for i in range(K)]}
    folder = save_model_dir(tmp_path / "final", model=model, config=config, step=1)
    assert read_model_config(folder)["pixel_decoder"] == "semantic_fpn"
    x = _images(1, 40, 72, seed=3)
    assert torch.equal(load_trained_model(folder).predict(x), model.predict(x))


def test_train_task_trains_and_reloads(tmp_path: Path) -> None:
    from addclass.tasks.model_files.model_folder import load_trained_model, read_model_config
    from addclass.tasks.training.train import train
    from tests.tasks.test_train import make_train_store, tiny_config

    store = make_train_store(tmp_path / "scenes.zarr")
    config = tiny_config(store, tmp_path / "run", variant=VARIANT, iters=2, checkpoint_every=2)
    assert config.pixel_decoder == "semantic_fpn"
    final = train(config, progress=False)
    assert read_model_config(final)["variant"] == VARIANT
    assert load_trained_model(final).predict(_images(1, 48, 64)).shape == (1, 48, 64)


def test_the_query_of_an_absent_class_learns_an_empty_mask() -> None:
    # One image holding classes 0 and 2 only: with fixed per-class queries, query 1 (absent class) still gets a
    # mask loss, towards an empty mask (BCE and dice push its logits down); the real segments keep theirs.
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:, 8:] = 2
    target = {"labels": torch.tensor([0, 2]), "masks": torch.stack([(labels == 0).float(), (labels == 2).float()]),
              "is_pseudo": torch.tensor([False, True])}
    full = with_every_class(target, torch.arange(3))
    assert full["labels"].tolist() == [0, 1, 2] and full["is_pseudo"].tolist() == [False, False, True]
    assert torch.equal(full["masks"][0], target["masks"][0]) and not full["masks"][1].any()
    assert torch.equal(full["masks"][2], target["masks"][1])
    pred = torch.zeros(1, 3, 16, 16, requires_grad=True)  # 0 logits: every class at probability 0.5
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_masks": pred, "query_classes": torch.arange(3)}
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher(num_points=64), num_points=64,
                             losses=("labels", "masks"))
    targets = [{**target, "pseudo_region": labels == 2, "reviewed": torch.zeros(16, 16, dtype=torch.bool)}]
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    assert "loss_ce" not in losses
    sum(losses.values()).backward()
    assert pred.grad is not None
    assert (pred.grad[0, 1] >= 0).all() and pred.grad[0, 1].sum() > 0  # descent lowers the absent class
