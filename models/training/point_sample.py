"""Point sampling for the matcher and the mask losses (PointRend / Mask2Former style).

Points live in normalized ``[0, 1] x [0, 1]`` image coordinates, ordered ``(x, y)`` as ``grid_sample``
expects, so one set of points addresses the 1/2- or 1/4-resolution mask logits and the full-resolution
targets alike.
Bilinear sampling with ``align_corners=False``, as detectron2's ``point_sample``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform_points(shape: tuple[int, ...], *, device: torch.device | str,
                   generator: torch.Generator | None = None) -> Tensor:
    """Uniform [0, 1) coordinates of `shape` on `device`, drawn on the generator's own device: a CPU generator
    gives the same points whatever device trains (and its saved state resumes on any device)."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, device=source, generator=generator).to(device)


# The RNG of the random points: one generator for the whole batch, one per image (the points of an image then do
# not depend on which other images share its batch, process or micro-batch), or None for torch's global RNG.
PointRng = torch.Generator | Sequence[torch.Generator] | None


def image_generator(rng: PointRng, index: int) -> torch.Generator | None:
    """The generator that draws image ``index``'s points."""
    if rng is None or isinstance(rng, torch.Generator):
        return rng
    return rng[index]


def point_sample(inputs: Tensor, point_coords: Tensor, *, align_corners: bool = False) -> Tensor:
    """Bilinearly samples ``inputs`` at normalized point coordinates.

    Args:
        inputs: N x C x H x W map (any floating dtype).
        point_coords: N x P x 2 coordinates in ``[0, 1]``, ``(x, y)`` order.
        align_corners: Passed to ``F.grid_sample``; ``False`` matches detectron2 and mmcv.

    Returns:
        N x C x P sampled values. Points outside the map read zeros (``padding_mode="zeros"``).
    """
    if inputs.dim() != 4 or point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(
            f"Expected inputs N x C x H x W and point_coords N x P x 2. Got {tuple(inputs.shape)} and "
            f"{tuple(point_coords.shape)} instead."
        )
    grid = (2.0 * point_coords - 1.0).unsqueeze(2)  # N x P x 1 x 2, in [-1, 1]
    out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.squeeze(3)  # N x C x P x 1 -> N x C x P


def select_uncertain_points(candidate_coords: Tensor, uncertainty: Tensor, num_uncertain: int) -> Tensor:
    """Keeps the ``num_uncertain`` candidates with the highest uncertainty, per row.

    Args:
        candidate_coords: N x M x 2 candidate points.
        uncertainty: N x M scores; higher means more uncertain.
        num_uncertain: How many points to keep (``<= M``).

    Returns:
        N x num_uncertain x 2 points, most uncertain first.
    """
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices  # N x k
    idx = idx.unsqueeze(-1).expand(-1, -1, 2)  # N x k x 2
    return torch.gather(candidate_coords, 1, idx)  # N x k x 2


def uncertain_point_coords_with_randomness(
    mask_logits: Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    uncertainty_scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draws training points: uncertain ones by importance sampling plus uniform ones.

    Draws ``int(num_points * oversample_ratio)`` uniform candidates, scores them with
    ``uncertainty = -|logit| * scale``, keeps the top ``int(importance_sample_ratio * num_points)`` and
    appends uniform random points up to ``num_points``. With ``uncertainty_scale = 1 - W`` this is the
    MaSSFormer reweighted sampling (docs/design.md §2.5): the uncertainty is <= 0, so a small scale near edges
    pulls it toward 0 and favours edge points. The uncertainty is computed from the sampled logit, not sampled
    from a per-pixel uncertainty map (PointRend's remark: the two differ between pixels of opposite sign).

    Args:
        mask_logits: N x 1 x h x w mask logits (one mask per row).
        num_points: Points per mask P.
        oversample_ratio: Candidates per output point (>= 1).
        importance_sample_ratio: Fraction of the points chosen by uncertainty, in ``[0, 1]``.
        uncertainty_scale: Optional N x 1 x H x W map multiplied into the uncertainty at each candidate
            (bilinearly sampled; H x W may differ from h x w). ``None`` is plain Mask2Former sampling.
        generator: Optional RNG for reproducible points.

    Returns:
        N x P x 2 point coordinates in ``[0, 1]``. Computed without gradient.
    """
    if oversample_ratio < 1:
        raise ValueError(f"Expected oversample_ratio >= 1. Got {oversample_ratio} instead.")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"Expected importance_sample_ratio in [0, 1]. Got {importance_sample_ratio} instead."
        )
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    with torch.no_grad():
        candidates = uniform_points((n, num_sampled, 2), device=device, generator=generator)  # N x M x 2
        logits = point_sample(mask_logits.detach().float(), candidates)[:, 0]  # N x M
        uncertainty = -logits.abs()
        if uncertainty_scale is not None:
            uncertainty = uncertainty * point_sample(uncertainty_scale.float(), candidates)[:, 0]  # N x M
        coords = select_uncertain_points(candidates, uncertainty, num_uncertain)  # N x k x 2
        if num_random > 0:
            uniform = uniform_points((n, num_random, 2), device=device, generator=generator)  # N x (P - k) x 2
            coords = torch.cat([coords, uniform], dim=1)  # N x P x 2
    return coords
