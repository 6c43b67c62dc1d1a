"""Targets: class masks, pseudo flags and the GenerateEdge(edge_width=2) edge map."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from addclass.models.training.targets import build_targets, generate_edge


def _reference_marks(seg: np.ndarray, ignore: int = 255) -> np.ndarray:
    """mmseg GenerateEdge's four comparisons, written as an explicit per-pixel loop."""
    h, w = seg.shape
    marks = np.zeros((h, w), dtype=np.uint8)
    # neighbour offsets (di, dj) that mmseg compares pixel (i, j) with: "down", "left", "up-left", "up-right"
    for i in range(h):
        for j in range(w):
            for di, dj in ((-1, 0), (0, 1), (1, 1), (1, -1)):
                ni, nj = i + di, j + dj
                if not (0 <= ni < h and 0 <= nj < w):
                    continue
                a, b = seg[i, j], seg[ni, nj]
                if a != b and a != ignore and b != ignore:
                    marks[i, j] = 1
    return marks


def _reference_edge(seg: np.ndarray, ignore: int = 255) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2, 2))
    edge = cv2.dilate(_reference_marks(seg, ignore), kernel)
    edge[seg == ignore] = 255
    return edge


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_matches_loop_and_cv2_dilate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # blocky random labels with a few ignore pixels
    coarse = rng.integers(0, 4, size=(4, 5))
    seg = np.kron(coarse, np.ones((3, 3), dtype=np.int64)).astype(np.uint8)  # 12 x 15
    seg[rng.random(seg.shape) < 0.08] = 255
    seg[rng.random(seg.shape) < 0.05] = 9
    out = build_targets(torch.from_numpy(seg), pseudo_classes=set())["edge"]
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), _reference_edge(seg))


def test_edge_straight_boundaries_by_hand() -> None:
    vertical = torch.zeros(6, 6, dtype=torch.uint8)
    vertical[:, 3:] = 1  # boundary between columns 2 and 3
    edge = generate_edge(vertical, edge_width=2)
    expected = torch.zeros(6, 6, dtype=torch.uint8)
    # marked: column 2 (vs right neighbour), column 3 (vs down-left); the 2x2 dilation adds column 4
    expected[:, 2:5] = 1
    assert torch.equal(edge, expected)

    horizontal = vertical.T.contiguous()
    edge_h = generate_edge(horizontal, edge_width=2)
    assert torch.equal(edge_h, expected.T)


def test_edge_ignore_pixels_are_255_and_not_boundaries() -> None:
    seg = torch.zeros(8, 8, dtype=torch.uint8)
    seg[2:5, 3:6] = 255
    edge = build_targets(seg, pseudo_classes=set())["edge"]
    assert torch.equal(edge == 255, seg == 255)
    assert int((edge == 1).sum()) == 0  # class-to-ignore transitions are not edges


def test_pad_mask_is_ignored_everywhere() -> None:
    seg = torch.zeros(6, 8, dtype=torch.uint8)
    seg[:, 4:] = 2
    pad = torch.zeros(6, 8, dtype=torch.bool)
    pad[4:, :] = True
    pad[:, 6:] = True
    t = build_targets(seg, pseudo_classes=set(), pad_mask=pad)
    assert t["labels"].tolist() == [0, 2]
    assert torch.equal(t["edge"] == 255, pad)
    assert float(t["masks"][:, pad].sum()) == 0.0
    # the 0|2 boundary inside the valid region is still an edge (columns 3..5 rows 0..3, minus padding)
    assert bool((t["edge"][:4, 3:6] == 1).all())
    assert int((t["edge"][:4, :3] == 1).sum()) == 0


def test_build_targets_fields() -> None:
    seg = torch.tensor(
        [
            [0, 0, 1, 1, 255],
            [0, 7, 7, 1, 1],
            [8, 8, 7, 5, 5],
        ],
        dtype=torch.uint8,
    )
    t = build_targets(seg, pseudo_classes=frozenset({7, 8}))
    assert t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [0, 1, 5, 7, 8]
    assert t["is_pseudo"].tolist() == [False, False, False, True, True]
    assert t["masks"].dtype == torch.float32 and t["masks"].shape == (5, 3, 5)
    for g, c in enumerate(t["labels"].tolist()):
        for i in range(3):
            for j in range(5):
                assert t["masks"][g, i, j].item() == float(int(seg[i, j]) == c)
    expected_region = torch.tensor(
        [[0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(t["pseudo_region"], expected_region)
    # masks partition the non-ignore pixels
    assert torch.equal(t["masks"].sum(0), (seg != 255).float())


def test_build_targets_empty_and_bad_input() -> None:
    t = build_targets(torch.full((4, 4), 255, dtype=torch.uint8), pseudo_classes={7})
    assert t["labels"].numel() == 0 and t["masks"].shape == (0, 4, 4) and t["is_pseudo"].numel() == 0
    assert bool((t["edge"] == 255).all())
    with pytest.raises(ValueError, match="integer"):
        build_targets(torch.zeros(4, 4), pseudo_classes=set())
    with pytest.raises(ValueError, match="H x W"):
        build_targets(torch.zeros(1, 4, 4, dtype=torch.uint8), pseudo_classes=set())
