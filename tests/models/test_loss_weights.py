"""Edge weight map W, the near-pseudo band and the three reweight modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from addclass.models.training.loss_weights import (
    bce_weight_map,
    dilate_chessboard,
    edge_weight_map,
    parse_reweight_mode,
)
from addclass.models.training.targets import build_targets


def _loop_w(mask: np.ndarray, k: int = 5) -> np.ndarray:
    """|mean of the k x k window (outside pixels count as 0) - G|, with explicit loops."""
    h, w = mask.shape
    r = k // 2
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            s = 0.0
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        s += mask[i + di, j + dj]
            out[i, j] = abs(s / (k * k) - mask[i, j])
    return out


def test_straight_edge_values_and_border_effect() -> None:
    g = torch.zeros(1, 12, 12)
    g[0, :, :6] = 1.0  # vertical edge between columns 5 and 6
    w = edge_weight_map(g)[0]
    row = w[6]  # far (>= 2 px) from the top and bottom borders
    expected_row = torch.tensor([0.4, 0.2, 0.0, 0.0, 0.2, 0.4, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0])
    # columns 0/1: zero padding at the left image border counts as background
    torch.testing.assert_close(row, expected_row, atol=1e-6, rtol=0)
    # top border of the positive mask, away from the vertical edges: 3/5 and 4/5 of the window inside
    torch.testing.assert_close(w[:3, 2], torch.tensor([0.4, 0.2, 0.0]), atol=1e-6, rtol=0)
    # corner: 3 x 3 of the 25 window pixels inside the image
    assert w[0, 0].item() == pytest.approx(1 - 9 / 25)
    # a negative region away from the edge has no border effect
    assert float(w[:, 9:].abs().max()) == 0.0


def test_thin_structures() -> None:
    g = torch.zeros(2, 11, 11)
    g[0, :, 5] = 1.0  # 1-px vertical line
    g[1, 5, 5] = 1.0  # isolated pixel
    w = edge_weight_map(g)
    assert w[0, 5, 5].item() == pytest.approx(0.8)  # 1 - 5/25
    assert w[0, 5, 4].item() == pytest.approx(0.2)  # background next to the line: 5/25
    assert w[1, 5, 5].item() == pytest.approx(0.96)  # 1 - 1/25
    assert w[1, 3, 7].item() == pytest.approx(0.04)
    assert w[1, 2, 5].item() == 0.0


def test_edge_weight_map_matches_loops_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 9, 10)) < 0.4).astype(np.float32)
    w = edge_weight_map(torch.from_numpy(masks)).numpy()
    for g in range(3):
        np.testing.assert_allclose(w[g], _loop_w(masks[g]), atol=1e-6)


def test_near_pseudo_band_is_exactly_2px_chessboard() -> None:
    region = torch.zeros(15, 16, dtype=torch.bool)
    region[7, 8] = True
    region[2, 1] = True  # near the border, clipped band
    near = dilate_chessboard(region, radius=2)
    pts = [(7, 8), (2, 1)]
    for i in range(15):
        for j in range(16):
            expected = any(max(abs(i - a), abs(j - b)) <= 2 for a, b in pts)
            assert bool(near[i, j]) == expected, (i, j)


def _scene() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """others (0, precise) everywhere, a building (2, precise) block far from a pseudo car (7)."""
    seg = torch.zeros(20, 24, dtype=torch.uint8)
    seg[3:9, 2:8] = 2
    seg[10:17, 13:21] = 7
    return seg, build_targets(seg, pseudo_classes={7})


def test_reweight_modes_follow_the_rules() -> None:
    seg, t = _scene()
    masks = t["masks"]
    labels = t["labels"].tolist()
    assert labels == [0, 2, 7]
    w_edge = np.stack([_loop_w(m) for m in masks.numpy()])  # G x H x W
    car = (seg == 7).numpy()
    h, w = seg.shape
    near = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            near[i, j] = car[max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].any()

    kwargs = dict(is_pseudo=t["is_pseudo"], pseudo_region=t["pseudo_region"])
    none = bce_weight_map(masks, mode="none", **kwargs).numpy()
    edge = bce_weight_map(masks, mode="edge", **kwargs).numpy()
    inv = bce_weight_map(masks, mode="inverse", **kwargs).numpy()
    inv_far = bce_weight_map(masks, mode="inverse", inverse_weight_near_pseudo=False, **kwargs).numpy()

    np.testing.assert_array_equal(none, np.ones_like(none))
    np.testing.assert_allclose(edge, 1 + 5 * w_edge, atol=1e-6)
    for g, c in enumerate(labels):
        if c == 7:
            expected = 1 - w_edge[g]
            expected_far = 1 - w_edge[g]
        else:
            expected = np.where(near, 1 - w_edge[g], 1 + 5 * w_edge[g])
            expected_far = 1 + 5 * w_edge[g]
        np.testing.assert_allclose(inv[g], expected, atol=1e-6)
        np.testing.assert_allclose(inv_far[g], expected_far, atol=1e-6)

    interior = w_edge == 0
    for arr in (none, edge, inv, inv_far):
        assert np.all(arr[interior] == 1.0)  # interior weight 1 in every mode
    # edge vs inverse differ exactly on the W band of pseudo masks and of precise masks near the car
    is_pseudo = np.array([c == 7 for c in labels])[:, None, None]
    differs = (w_edge > 0) & (is_pseudo | near[None])
    np.testing.assert_array_equal(np.abs(edge - inv) > 1e-6, differs)
    # the building's band is far from the car: identical in edge and inverse modes, and boosted
    np.testing.assert_allclose(inv[1], edge[1], atol=1e-6)
    assert inv[1].max() > 1.0
    # "others" next to the car is down-weighted on its own side of the shared boundary too
    assert inv[0, 10, 12] == pytest.approx(1 - w_edge[0, 10, 12]) and w_edge[0, 10, 12] > 0
    assert inv[0, 10, 12] < 1.0 < edge[0, 10, 12]


def test_reviewed_pixels_of_a_pseudo_class_are_weighted_like_precise_ones() -> None:
    """A person checked the car's left half (provenance 3): there, and within 2 px of it (W's reach, both sides of
    the edge), its mask gets the precise rule 1 + 5 W; the rest keeps 1 - W; only the unchecked car pixels make
    the near-pseudo band."""
    seg, plain = _scene()
    reviewed = torch.zeros(seg.shape, dtype=torch.bool)
    reviewed[:, :17] = seg[:, :17] == 7
    t = build_targets(seg, pseudo_classes={7}, reviewed=reviewed)
    assert torch.equal(t["reviewed"], reviewed)
    assert torch.equal(t["pseudo_region"], plain["pseudo_region"] & ~reviewed)
    w_edge = np.stack([_loop_w(m) for m in t["masks"].numpy()])  # G x H x W
    kwargs = dict(is_pseudo=t["is_pseudo"], pseudo_region=t["pseudo_region"], reviewed=t["reviewed"])
    inv = bce_weight_map(t["masks"], mode="inverse", inverse_weight_near_pseudo=False, **kwargs).numpy()
    car = 2  # labels [0, 2, 7]
    rev = reviewed.numpy()
    h, w = rev.shape
    trusted = np.array([[rev[max(0, i - 2): i + 3, max(0, j - 2): j + 3].any() for j in range(w)] for i in range(h)])
    np.testing.assert_allclose(inv[car], np.where(trusted, 1 + 5 * w_edge[car], 1 - w_edge[car]), atol=1e-6)
    assert (w_edge[car][trusted] > 0).any() and (w_edge[car][~trusted] > 0).any()
    everything = build_targets(seg, pseudo_classes={7}, reviewed=seg == 7)  # all of it checked: as precise
    kwargs = dict(is_pseudo=everything["is_pseudo"], pseudo_region=everything["pseudo_region"],
                  reviewed=everything["reviewed"])
    np.testing.assert_allclose(bce_weight_map(everything["masks"], mode="inverse", **kwargs).numpy(),
                               bce_weight_map(everything["masks"], mode="edge", **kwargs).numpy(), atol=1e-6)


def test_parse_reweight_mode() -> None:
    assert parse_reweight_mode("edge") == "edge"
    with pytest.raises(ValueError, match="'inverted'"):
        parse_reweight_mode("inverted")
