"""Loss terms against independent computations, point selection and the full set criterion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import addclass.models.training.criterion as criterion_module
from addclass.models.training.criterion import (
    HungarianMatcher,
    LossNormalizers,
    SetCriterion,
    build_criterion,
)
from addclass.models.training.loss_terms import (
    classification_loss,
    dice_loss,
    edge_loss,
    weighted_sigmoid_ce_loss,
)
from addclass.models.training.loss_weights import edge_weight_map
from addclass.models.training.point_sample import (
    select_uncertain_points,
    uncertain_point_coords_with_randomness,
)
from addclass.models.training.targets import build_targets


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _bce(logit: float, t: float) -> float:
    return _softplus(logit) - logit * t


def _resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel bilinear resize (PyTorch align_corners=False: negative source clamped to 0, edge clamp)."""
    in_h, in_w = img.shape

    def src(d: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(s))
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y0, y1, fy = src(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, fx = src(j, in_w, out_w)
            out[i, j] = (
                (1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1])
            )
    return out


def _read(img: np.ndarray, x: float, y: float) -> float:
    """Bilinear read at normalized (x, y), pixel centres at (i + 0.5) / size, zeros outside."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = 0.0
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


# ---------------------------------------------------------------- loss terms


def test_classification_loss_matches_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    classes = torch.tensor([[5, 1, 5, 0], [2, 5, 5, 5]])  # 5 = no-object
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.1])
    num = den = 0.0
    for b in range(2):
        for q in range(4):
            row = logits[b, q].double()
            nll = -(row[classes[b, q]] - torch.logsumexp(row, 0)).item()
            w = weights[classes[b, q]].item()
            num += w * nll
            den += w
    assert classification_loss(logits, classes, weights).item() == pytest.approx(num / den, rel=1e-5)


def test_point_losses_match_loops() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 7) * 2
    labels = torch.rand(3, 7)  # bilinear targets are fractional
    weights = 1 + 5 * torch.rand(3, 7)
    num_masks = 4.0  # more ground truths than matched masks
    exp_bce = exp_bce_plain = 0.0
    for n in range(3):
        for p in range(7):
            term = _bce(logits[n, p].item(), labels[n, p].item())
            exp_bce += weights[n, p].item() * term / (num_masks * 7)
            exp_bce_plain += term / (num_masks * 7)
    exp_dice = 0.0
    for n in range(3):
        s = [1 / (1 + math.exp(-v)) for v in logits[n].tolist()]
        t = labels[n].tolist()
        exp_dice += 1 - (2 * sum(a * b for a, b in zip(s, t, strict=True)) + 1) / (sum(s) + sum(t) + 1)
    exp_dice /= num_masks
    got = weighted_sigmoid_ce_loss(logits, labels, weights, num_masks).item()
    got_plain = weighted_sigmoid_ce_loss(logits, labels, None, num_masks).item()
    assert got == pytest.approx(exp_bce, rel=1e-5)
    assert got_plain == pytest.approx(exp_bce_plain, rel=1e-5)
    assert dice_loss(logits, labels, num_masks).item() == pytest.approx(exp_dice, rel=1e-5)


def test_edge_loss_matches_loop_with_ignore() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 3, 4) * 2  # 1/2 resolution, odd crop
    targets = [torch.randint(0, 2, (5, 7), dtype=torch.uint8) for _ in range(2)]
    targets[0][0, :] = 255
    targets[1][2:4, 3:] = 255
    total, count = 0.0, 0
    for b in range(2):
        up = _resize_bilinear(logits[b, 0].double().numpy(), 5, 7)
        t = targets[b].numpy()
        for i in range(5):
            for j in range(7):
                if t[i, j] != 255:
                    total += _bce(up[i, j], float(t[i, j] == 1))
                    count += 1
    assert edge_loss(logits, targets).item() == pytest.approx(total / count, rel=1e-5)
    all_ignored = [torch.full((5, 7), 255, dtype=torch.uint8)] * 2
    zero = edge_loss(logits.requires_grad_(), all_ignored)
    assert zero.item() == 0.0 and zero.requires_grad


# ---------------------------------------------------------------- point selection


def test_select_uncertain_points_takes_top_k() -> None:
    coords = torch.rand(2, 6, 2)
    unc = torch.tensor([[-3.0, -0.1, -2.0, -0.5, -9.0, -0.2], [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    out = select_uncertain_points(coords, unc, 3)
    assert torch.equal(out[0], coords[0, [1, 5, 3]])
    assert torch.equal(out[1], coords[1, [0, 1, 2]])


def test_importance_sampling_prefers_uncertain_and_edge_points() -> None:
    gen = torch.Generator().manual_seed(0)
    # logits near 0 only in the left third: plain sampling picks uncertain points there
    logits = torch.full((1, 1, 8, 12), 6.0)
    logits[..., :4] = 0.01
    pts = uncertain_point_coords_with_randomness(
        logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75, generator=gen
    )
    assert pts.shape == (1, 100, 2) and float(pts.min()) >= 0 and float(pts.max()) <= 1
    assert float((pts[0, :75, 0] < 0.34).float().mean()) == 1.0  # 75 importance points, x < 1/3
    # constant logits: the (1 - W) scale alone decides; scale 0 (W = 1) on the right 60 % wins
    const = torch.full((1, 1, 8, 10), 2.0)
    scale = torch.ones(1, 1, 8, 10)
    scale[..., 4:] = 0.0
    pts = uncertain_point_coords_with_randomness(
        const, num_points=50, oversample_ratio=3.0, importance_sample_ratio=1.0, uncertainty_scale=scale,
        generator=gen,
    )
    assert float((pts[0, :, 0] >= 0.45).float().mean()) == 1.0


# ---------------------------------------------------------------- full criterion


def _random_outputs(b: int, q: int, k: int, h: int, w: int, num_aux: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h2, w2, h4, w4 = -(-h // 2), -(-w // 2), -(-h // 4), -(-w // 4)  # ceil
    out = {
        "pred_logits": torch.randn(b, q, k + 1, generator=gen).requires_grad_(),
        "pred_masks": torch.randn(b, q, h2, w2, generator=gen).requires_grad_(),
        "aux_outputs": [
            {
                "pred_logits": torch.randn(b, q, k + 1, generator=gen).requires_grad_(),
                "pred_masks": torch.randn(b, q, h4, w4, generator=gen).requires_grad_(),
            }
            for _ in range(num_aux)
        ],
        "pred_edge": torch.randn(b, 1, h2, w2, generator=gen).requires_grad_(),
    }
    return out


def _label_maps(h: int, w: int) -> list[torch.Tensor]:
    a = torch.zeros(h, w, dtype=torch.uint8)
    a[: h // 3] = 5
    a[h // 2 :, w // 3 : 2 * w // 3] = 7  # pseudo class
    a[h - 3 :, :3] = 255
    bb = torch.full((h, w), 2, dtype=torch.uint8)
    bb[:, w // 2 :] = 8  # second pseudo class
    bb[1, 1] = 1
    return [a, bb]


@pytest.mark.parametrize("reweight", ["none", "edge", "inverse"])
@pytest.mark.parametrize("size", [(32, 32), (30, 34)])
def test_criterion_random_outputs_keys_finite_and_gradients(reweight: str, size: tuple[int, int]) -> None:
    h, w = size
    k, q = 9, 6
    targets = [build_targets(m, pseudo_classes={7, 8}) for m in _label_maps(h, w)]
    outputs = _random_outputs(2, q, k, h, w)
    crit = build_criterion(num_classes=k, num_points=64, reweight=reweight)  # type: ignore[arg-type]
    losses = crit(outputs, targets, generator=torch.Generator().manual_seed(0))

    expected = {"loss_ce", "loss_mask", "loss_dice", "loss_edge"}
    expected |= {f"{name}_{i}" for name in ("loss_ce", "loss_mask", "loss_dice") for i in range(6)}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() > 0, name
    sum(losses.values()).backward()
    tensors = [outputs["pred_logits"], outputs["pred_masks"], outputs["pred_edge"]]
    tensors += [t for aux in outputs["aux_outputs"] for t in aux.values()]
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_criterion_exact_values_on_constant_masks() -> None:
    """Mask logits 0 make every point BCE log 2 wherever the points fall, so the totals are exact."""
    k, q = 4, 3
    seg0 = torch.zeros(8, 8, dtype=torch.uint8)
    seg0[:2] = 1
    seg0[4:6] = 2
    seg0[6:] = 3  # image 0: classes 0, 1, 2, 3 (G = 4 > Q = 3)
    seg1 = torch.full((8, 8), 2, dtype=torch.uint8)
    seg1[:, 4:] = 1  # image 1: classes 1, 2 (one query left for no-object)
    seg1[0, 0] = 255
    targets = [build_targets(s, pseudo_classes=set()) for s in (seg0, seg1)]
    # equal mask logits make the mask costs equal across queries: the class cost decides the matching
    classes = [[3, 1, 0], [1, 2, k]]  # expected target class per query (k = no-object)
    logits = torch.zeros(2, q, k + 1)
    for b in range(2):
        for qq in range(q):
            logits[b, qq, classes[b][qq]] = 2.0
    layer = {"pred_logits": logits, "pred_masks": torch.zeros(2, q, 4, 4)}
    edge_logits = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    outputs = {**layer, "aux_outputs": [{"pred_logits": logits, "pred_masks": torch.zeros(2, q, 2, 2)}]}
    outputs["pred_edge"] = edge_logits
    crit = SetCriterion(
        num_classes=k, matcher=HungarianMatcher(num_points=16), num_points=16, reweight="none"
    )
    losses = crit(outputs, targets)

    # 5 matched masks, 6 ground truths: BCE sum 5 * log 2 over num_masks = 6
    assert losses["loss_mask"].item() == pytest.approx(5.0 * 5 * math.log(2) / 6, rel=1e-6)
    assert losses["loss_mask_0"].item() == pytest.approx(losses["loss_mask"].item(), rel=1e-6)
    num = den = 0.0
    for b in range(2):
        for qq in range(q):
            row = logits[b, qq].double()
            w = 0.1 if classes[b][qq] == k else 1.0
            num += w * -(row[classes[b][qq]] - torch.logsumexp(row, 0)).item()
            den += w
    assert losses["loss_ce"].item() == pytest.approx(2.0 * num / den, rel=1e-5)
    assert losses["loss_ce_0"].item() == pytest.approx(losses["loss_ce"].item(), rel=1e-6)
    exp_edge = 10.0 * edge_loss(edge_logits, [t["edge"] for t in targets]).item()
    assert losses["loss_edge"].item() == pytest.approx(exp_edge, rel=1e-6)


def test_criterion_uses_weight_maps_and_edge_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: BCE point weights come from bce_weight_map, the sampling scale is 1 - W of the matched mask."""
    seen: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    real_sampler = criterion_module.uncertain_point_coords_with_randomness

    def recording_sampler(*args, **kwargs):
        coords = real_sampler(*args, **kwargs)
        seen.append((kwargs["uncertainty_scale"], coords))
        return coords

    monkeypatch.setattr(criterion_module, "uncertain_point_coords_with_randomness", recording_sampler)
    monkeypatch.setattr(criterion_module, "bce_weight_map", lambda masks, **kw: torch.full(masks.shape, 3.0))
    seg = torch.zeros(8, 8, dtype=torch.uint8)
    seg[2:6, 2:6] = 1
    target = build_targets(seg, pseudo_classes=set())
    logits = torch.full((1, 2, 3), -4.0)
    logits[0, 0, 1] = logits[0, 1, 0] = 4.0  # query 0 -> class 1, query 1 -> class 0
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 2, 4, 4)}

    for reweight in ("edge", "none"):
        seen.clear()
        crit = SetCriterion(
            num_classes=2, matcher=HungarianMatcher(num_points=16), num_points=16, reweight=reweight,
            losses=("labels", "masks"),
        )
        losses = crit(outputs, [target])
        assert "loss_edge" not in losses
        assert len(seen) == 1
        scale, coords = seen[0]
        assert coords.shape == (2, 16, 2)
        if reweight == "none":
            assert scale is None
            expected_mask_loss = 5.0 * math.log(2)  # logits 0: BCE log 2 at every point, weight 1
        else:
            # matched order follows the query index: query 0 <-> class 1 (mask index 1), query 1 <-> class 0
            expected_scale = (1 - edge_weight_map(target["masks"][[1, 0]])).unsqueeze(1)
            torch.testing.assert_close(scale, expected_scale)
            # the weight map (3 everywhere) is read bilinearly at the loss points as 1 + (w - 1), so points
            # within half a pixel of the image border blend towards weight 1 (the reference samples W)
            two = np.full((8, 8), 2.0)
            mean_w = [np.mean([1 + _read(two, x, y) for x, y in coords[n].tolist()]) for n in range(2)]
            expected_mask_loss = 5.0 * math.log(2) * sum(mean_w) / 2
            assert max(mean_w) <= 3.0 and min(mean_w) > 2.0
        assert losses["loss_mask"].item() == pytest.approx(expected_mask_loss, rel=1e-5)


@pytest.mark.parametrize("reweight", ["edge", "inverse"])
def test_criterion_mask_loss_is_the_weighted_point_mean(monkeypatch: pytest.MonkeyPatch, reweight: str) -> None:
    """End to end with the real weight maps: loss_mask = 5 * sum_n mean_p(w_p * BCE) / num_masks."""
    seen: list[torch.Tensor] = []
    real_sampler = criterion_module.uncertain_point_coords_with_randomness

    def recording_sampler(*args, **kwargs):
        seen.append(real_sampler(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(criterion_module, "uncertain_point_coords_with_randomness", recording_sampler)
    seg = torch.zeros(12, 12, dtype=torch.uint8)
    seg[1:5, 1:6] = 1  # precise block far from the car
    seg[6:11, 5:11] = 7  # pseudo "car"
    target = build_targets(seg, pseudo_classes={7})
    labels = target["labels"].tolist()  # [0, 1, 7]
    logits = torch.full((1, 3, 9), -3.0)
    for qq, c in enumerate(labels):
        logits[0, qq, c] = 3.0  # query i <-> mask i
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 6, 6)}
    crit = SetCriterion(
        num_classes=8, matcher=HungarianMatcher(num_points=24), num_points=24, reweight=reweight,
        losses=("masks",),
    )
    losses = crit(outputs, [target])
    coords = seen[0]  # 3 x P x 2, in matched (query) order

    car = seg.numpy() == 7
    near = np.zeros(car.shape, dtype=bool)
    for i in range(12):
        for j in range(12):
            near[i, j] = car[max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].any()
    expected = 0.0
    for g, c in enumerate(labels):
        w_edge = edge_weight_map(target["masks"][g : g + 1])[0].double().numpy()
        if reweight == "edge":
            weight = 1 + 5 * w_edge
        elif c == 7:
            weight = 1 - w_edge
        else:
            weight = np.where(near, 1 - w_edge, 1 + 5 * w_edge)
        pts = [1 + _read(weight - 1, x, y) for x, y in coords[g].tolist()]
        expected += math.log(2) * float(np.mean(pts))  # mask logits 0: BCE log 2 at every point
    assert losses["loss_mask"].item() == pytest.approx(5.0 * expected / 3, rel=1e-5)


def test_criterion_no_edge_head_and_determinism() -> None:
    k = 9
    targets = [build_targets(m, pseudo_classes={7, 8}) for m in _label_maps(16, 16)]
    outputs = _random_outputs(2, 5, k, 16, 16, num_aux=2)
    crit = build_criterion(num_classes=k, num_points=32)
    first = crit(outputs, targets, generator=torch.Generator().manual_seed(7))
    second = crit(outputs, targets, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(first[n], second[n]) for n in first)
    outputs["pred_edge"] = None  # fpn baseline
    assert "loss_edge" not in crit(outputs, targets)


def test_criterion_no_ground_truth_keeps_graph() -> None:
    k = 3
    empty = build_targets(torch.full((8, 8), 255, dtype=torch.uint8), pseudo_classes=set())
    outputs = _random_outputs(1, 3, k, 8, 8, num_aux=1)
    losses = build_criterion(num_classes=k, num_points=16)(outputs, [empty])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["loss_ce"].item() > 0  # all queries are pushed to no-object
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad is not None


def test_criterion_fails_loudly() -> None:
    with pytest.raises(ValueError, match="loss_bbox"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), losses=("labels", "loss_bbox"))
    with pytest.raises(ValueError, match="'inverted'"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), reweight="inverted")  # type: ignore[arg-type]
    crit = build_criterion(num_classes=3, num_points=8)
    outputs = _random_outputs(1, 3, 5, 8, 8, num_aux=0)  # K = 5 logits for a K = 3 criterion
    target = build_targets(torch.zeros(8, 8, dtype=torch.uint8), pseudo_classes=set())
    with pytest.raises(ValueError, match="K\\+1"):
        crit(outputs, [target])
    outputs = _random_outputs(1, 3, 3, 8, 8, num_aux=0)
    bad = build_targets(torch.full((8, 8), 4, dtype=torch.uint8), pseudo_classes=set())
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, [bad])


def test_criterion_runs_in_fp32_under_autocast() -> None:
    k = 9
    targets = [build_targets(m, pseudo_classes={7, 8}) for m in _label_maps(16, 16)]
    outputs = _random_outputs(2, 5, k, 16, 16, num_aux=1)
    half = {
        "pred_logits": outputs["pred_logits"].bfloat16(),
        "pred_masks": outputs["pred_masks"].bfloat16(),
        "aux_outputs": [{n: v.bfloat16() for n, v in a.items()} for a in outputs["aux_outputs"]],
        "pred_edge": outputs["pred_edge"].bfloat16(),
    }
    crit = build_criterion(num_classes=k, num_points=32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = crit(half, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def _split_outputs(outputs: dict, b: int) -> dict:
    """Image ``b`` of a batch's outputs, as a batch of one (views: the gradients reach the batch's tensors)."""
    part = {"pred_logits": outputs["pred_logits"][b : b + 1], "pred_masks": outputs["pred_masks"][b : b + 1],
            "pred_edge": outputs["pred_edge"][b : b + 1]}
    part["aux_outputs"] = [{k: v[b : b + 1] for k, v in aux.items()} for aux in outputs["aux_outputs"]]
    return part


def test_a_batch_in_parts_with_the_batch_normalizers_gives_the_batch_loss_and_gradients() -> None:
    """DDP and gradient accumulation: the losses of the parts of a batch, each normalised by the whole batch's
    counts (`SetCriterion.count` summed), add up to the batch's loss, and so do their gradients, when each image
    draws its points from its own generator."""
    k = 9
    targets = [build_targets(m, pseudo_classes={7, 8}) for m in _label_maps(16, 20)]
    crit = build_criterion(num_classes=k, num_points=48)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]

    whole_out = _random_outputs(2, 5, k, 16, 20, num_aux=2)
    whole = crit(whole_out, targets, generator=generators())
    sum(whole.values()).backward()
    counts = crit.count(targets[:1], num_queries=5) + crit.count(targets[1:], num_queries=5)
    assert torch.equal(counts, crit.count(targets, num_queries=5))
    normalizers = LossNormalizers(*counts.tolist())
    assert normalizers.num_masks == sum(len(t["labels"]) for t in targets)

    parts_out = _random_outputs(2, 5, k, 16, 20, num_aux=2)  # the same values (seed), fresh gradients
    gens = generators()
    parts = [crit(_split_outputs(parts_out, b), targets[b : b + 1], generator=[gens[b]], normalizers=normalizers)
             for b in range(2)]
    for name in whole:
        assert float((parts[0][name] + parts[1][name]).detach()) == pytest.approx(float(whole[name].detach()),
                                                                                 rel=1e-5), name
    sum(sum(p.values()) for p in parts).backward()
    for key in ("pred_logits", "pred_masks", "pred_edge"):
        torch.testing.assert_close(parts_out[key].grad, whole_out[key].grad, rtol=1e-5, atol=1e-7)
    # without the batch's counts a part is normalised by its own: not the batch's loss
    alone = crit(_split_outputs(parts_out, 0), targets[:1], generator=[generators()[0]])
    assert float(alone["loss_mask"].detach()) != pytest.approx(float(parts[0]["loss_mask"].detach()), rel=1e-3)
