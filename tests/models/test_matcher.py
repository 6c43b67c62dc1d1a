"""Pairwise costs, point sampling and the Hungarian matcher against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from addclass.models.training.matcher import (
    HungarianMatcher,
    batch_class_cost,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
)
from addclass.models.training.point_sample import point_sample


def _bilinear(img: np.ndarray, x: float, y: float) -> float:
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


def _softplus(v: float) -> float:
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _loop_cost(logits, pred_masks, labels, tgt_masks, coords) -> np.ndarray:
    """Matching cost of one image with plain Python loops (costs 2 / 5 / 5, dice eps 1)."""
    q, g, p = len(logits), len(labels), len(coords)
    pred_pts = [[_bilinear(pred_masks[i], x, y) for x, y in coords] for i in range(q)]
    tgt_pts = [[_bilinear(tgt_masks[j], x, y) for x, y in coords] for j in range(g)]
    cost = np.zeros((q, g))
    for i in range(q):
        z = np.exp(logits[i] - logits[i].max())
        prob = z / z.sum()
        for j in range(g):
            ce = sum(_softplus(a) - a * t for a, t in zip(pred_pts[i], tgt_pts[j], strict=True)) / p
            s = [1 / (1 + math.exp(-a)) for a in pred_pts[i]]
            inter = sum(a * t for a, t in zip(s, tgt_pts[j], strict=True))
            dice = 1 - (2 * inter + 1) / (sum(s) + sum(tgt_pts[j]) + 1)
            cost[i, j] = -2 * prob[labels[j]] + 5 * ce + 5 * dice
    return cost


def test_point_sample_matches_loop_bilinear() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    coords = rng.random((2, 11, 2)).astype(np.float32)
    coords[0, 0] = [0.0, 0.0]  # corner: reads the zero padding
    coords[0, 1] = [1.0, 0.5]
    out = point_sample(torch.from_numpy(img), torch.from_numpy(coords)).numpy()  # N x C x P
    assert out.shape == (2, 3, 11)
    for n in range(2):
        for c in range(3):
            for k in range(11):
                expected = _bilinear(img[n, c], *coords[n, k])
                assert out[n, c, k] == pytest.approx(expected, abs=1e-5)


def test_pairwise_costs_match_loops() -> None:
    torch.manual_seed(0)
    pred = torch.randn(4, 9) * 3
    tgt = (torch.rand(3, 9) < 0.5).float()
    tgt[0, :3] = 0.25  # fractional (bilinear) targets
    logits = torch.randn(4, 6)
    labels = torch.tensor([5, 0, 2])
    ce = batch_sigmoid_ce_cost(pred, tgt)
    dice = batch_dice_cost(pred, tgt)
    cls = batch_class_cost(logits, labels)
    assert ce.shape == dice.shape == cls.shape == (4, 3)
    for i in range(4):
        prob = torch.softmax(logits[i].double(), 0)
        for j in range(3):
            a = pred[i].double().tolist()
            t = tgt[j].double().tolist()
            exp_ce = sum(_softplus(v) - v * y for v, y in zip(a, t, strict=True)) / 9
            s = [1 / (1 + math.exp(-v)) for v in a]
            exp_dice = 1 - (2 * sum(u * y for u, y in zip(s, t, strict=True)) + 1) / (sum(s) + sum(t) + 1)
            assert ce[i, j].item() == pytest.approx(exp_ce, rel=1e-5)
            assert dice[i, j].item() == pytest.approx(exp_dice, rel=1e-5, abs=1e-6)
            assert cls[i, j].item() == pytest.approx(-prob[labels[j]].item(), rel=1e-5)


@pytest.mark.parametrize("seed,q,g", [(0, 5, 4), (1, 4, 4), (2, 5, 2), (3, 3, 1), (4, 5, 3)])
def test_matcher_equals_brute_force(seed: int, q: int, g: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = 6
    logits = torch.randn(1, q, k + 1, generator=gen) * 2
    pred_masks = torch.randn(1, q, 4, 5, generator=gen) * 3  # low resolution predictions
    labels = torch.randperm(k, generator=gen)[:g]
    tgt_masks = (torch.rand(g, 8, 10, generator=gen) < 0.5).float()  # full resolution targets
    coords = torch.rand(16, 2, generator=gen)
    matcher = HungarianMatcher(num_points=16)
    rows, cols = matcher(
        {"pred_logits": logits, "pred_masks": pred_masks},
        [{"labels": labels, "masks": tgt_masks}],
        point_coords=[coords],
    )[0]
    assert rows.dtype == cols.dtype == torch.int64
    assert len(rows) == len(cols) == g
    assert len(set(rows.tolist())) == g and sorted(cols.tolist()) == list(range(g))

    cost = _loop_cost(
        logits[0].double().numpy(), pred_masks[0].numpy(), labels.tolist(), tgt_masks.numpy(), coords.tolist()
    )
    best = min(
        itertools.permutations(range(q), g), key=lambda perm: sum(cost[perm[j], j] for j in range(g))
    )
    best_total = sum(cost[best[j], j] for j in range(g))
    got_total = sum(cost[r, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
    assert got_total == pytest.approx(best_total, abs=1e-6)
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {j: best[j] for j in range(g)}


def test_matcher_empty_targets_and_random_points() -> None:
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 3, 4), "pred_masks": torch.randn(2, 3, 4, 4)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)},
        {"labels": torch.tensor([1, 2]), "masks": (torch.rand(2, 8, 8) < 0.5).float()},
    ]
    indices = HungarianMatcher(num_points=32)(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 2]


def test_matcher_rejects_non_finite_outputs() -> None:
    outputs = {"pred_logits": torch.randn(1, 3, 4), "pred_masks": torch.full((1, 3, 4, 4), float("nan"))}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8)}]
    with pytest.raises(FloatingPointError):
        HungarianMatcher(num_points=8)(outputs, targets)
