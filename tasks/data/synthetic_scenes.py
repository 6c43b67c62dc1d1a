"""Procedural street scenes with exact labels: the embedded demo data (no download needed).

Each scene has sky, buildings with thin structures (antennas, window frames), vegetation with fine leaf
edges, ground, sometimes water, humans, and cars and other objects (poles, signs) that are all "others"
(class 0) in the precise labels. The exact car mask is returned separately, the way a hand annotation would
be: the new-class test bed. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from addclass.common.errors import InputError

OTHERS, HUMAN, BUILDING, VEGETATION, GROUND, SKY, WATER = range(7)

# mean RGB colour per class; cars get their own paint colours so a model can learn them
_COLOURS = {
    SKY: (135, 180, 235), BUILDING: (150, 120, 110), VEGETATION: (60, 130, 50), GROUND: (110, 105, 100),
    WATER: (40, 90, 150), HUMAN: (220, 170, 140), OTHERS: (90, 90, 95),
}
_CAR_PAINTS = ((200, 30, 30), (30, 60, 180), (230, 230, 230), (20, 20, 20), (240, 200, 40))


@dataclass(frozen=True)
class Scene:
    """image: H x W x 3 uint8 RGB; labels: H x W uint8 (0..6); car: H x W bool (exact car mask)."""

    image: np.ndarray
    labels: np.ndarray
    car: np.ndarray


def _fill(labels: np.ndarray, paint: np.ndarray, mask: np.ndarray, cls: int, colour: tuple[int, int, int]) -> None:
    labels[mask] = cls
    paint[mask] = colour


def _draw_cars(rng: np.random.Generator, labels: np.ndarray, paint: np.ndarray, car: np.ndarray, *,
               horizon: int, s: float) -> None:
    """Draw 1-4 cars on the ground (body + cabin + wheels, all class 0) and add them to the exact `car` mask.

    Edits `labels`, `paint` and `car` in place; draws from `rng` in the order `make_scene` always has.
    """
    h, w = labels.shape
    for _ in range(rng.integers(1, 5)):  # cars on the ground: body + cabin + wheels, all class 0
        cw = rng.uniform(40, 80) * s
        ch = cw * rng.uniform(0.35, 0.45)
        cx = rng.uniform(0, w - cw)
        cy = rng.uniform(horizon + 0.05 * (h - horizon), h - ch * 0.2)
        m = np.zeros((h, w), np.uint8)
        body = np.array([[cx, cy - ch * 0.55], [cx + cw, cy - ch * 0.55], [cx + cw, cy], [cx, cy]])
        cabin = np.array([[cx + cw * 0.2, cy - ch * 0.55], [cx + cw * 0.3, cy - ch], [cx + cw * 0.7, cy - ch],
                          [cx + cw * 0.8, cy - ch * 0.55]])
        cv2.fillPoly(m, [body.astype(np.int32), cabin.astype(np.int32)], 1)
        for wheel_x in (cx + cw * 0.22, cx + cw * 0.78):
            cv2.circle(m, (int(wheel_x), int(cy)), max(2, int(ch * 0.22)), 1, -1)
        mb = m.astype(bool) & (labels != WATER)
        _fill(labels, paint, mb, OTHERS, _CAR_PAINTS[rng.integers(len(_CAR_PAINTS))])
        car |= mb
        car[labels != OTHERS] = False  # a later, nearer object may occlude


def make_scene(*, height: int, width: int, seed: int) -> Scene:
    """Draw one scene of `height` x `width` pixels from `seed`."""
    if height < 32 or width < 32:
        raise InputError(f"Expected a scene of at least 32x32 pixels. Got {height}x{width} instead.")
    rng = np.random.default_rng(seed)
    h, w = height, width
    s = min(h, w) / 256.0  # scale factor for sizes given at 256 px
    labels = np.full((h, w), SKY, np.uint8)
    paint = np.zeros((h, w, 3), np.uint8)
    paint[:] = _COLOURS[SKY]
    car = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]

    horizon = int(h * rng.uniform(0.45, 0.6))
    _fill(labels, paint, yy >= horizon, GROUND, _COLOURS[GROUND])
    if rng.random() < 0.5:  # water: a band on one side below the horizon
        x0 = int(w * rng.uniform(0.0, 0.5))
        wave = (np.sin(xx / (9 * s + 1)) * 3 * s).astype(int)
        water = (yy >= horizon + int(0.15 * (h - horizon)) + wave) & (xx >= x0) & (xx < x0 + int(w * 0.45))
        _fill(labels, paint, water, WATER, _COLOURS[WATER])

    for _ in range(rng.integers(2, 5)):  # buildings with antennas and window frames
        bw, bh = int(w * rng.uniform(0.12, 0.3)), int(h * rng.uniform(0.2, 0.45))
        bx = int(rng.uniform(0, w - bw))
        top = horizon - bh
        m = np.zeros((h, w), np.uint8)
        cv2.rectangle(m, (bx, top), (bx + bw, horizon), 1, -1)
        ax = bx + int(rng.uniform(0.2, 0.8) * bw)  # antenna: a 1-2 px line
        cv2.line(m, (ax, top), (ax, max(0, top - int(30 * s))), 1, max(1, int(s)))
        _fill(labels, paint, m.astype(bool), BUILDING, _COLOURS[BUILDING])
        for wy in range(top + int(6 * s) + 1, horizon - int(6 * s), max(4, int(14 * s))):  # windows
            for wx in range(bx + int(4 * s) + 1, bx + bw - int(8 * s), max(4, int(12 * s))):
                cv2.rectangle(paint, (wx, wy), (wx + max(2, int(5 * s)), wy + max(2, int(6 * s))), (70, 80, 100), -1)

    for _ in range(rng.integers(1, 4)):  # trees: trunk + a crown with a ragged, fine edge
        tx, ty = int(rng.uniform(0, w)), int(horizon - rng.uniform(0.05, 0.25) * h)
        r = rng.uniform(15, 35) * s
        ang = np.arctan2(yy - ty, xx - tx)
        rad = np.hypot(yy - ty, xx - tx)
        ragged = r * (1 + 0.15 * np.sin(7 * ang + rng.uniform(0, 6)) + 0.08 * np.sin(23 * ang))
        crown = rad < ragged
        trunk = (np.abs(xx - tx) <= max(1, 2 * s)) & (yy >= ty) & (yy < horizon + int(4 * s))
        _fill(labels, paint, crown | trunk, VEGETATION, _COLOURS[VEGETATION])

    for _ in range(rng.integers(1, 4)):  # poles and signs: "others"
        px = int(rng.uniform(0, w))
        m = np.zeros((h, w), np.uint8)
        top = int(horizon - rng.uniform(0.15, 0.35) * h)
        cv2.line(m, (px, top), (px, horizon + int(10 * s)), 1, max(1, int(1.5 * s)))
        if rng.random() < 0.6:
            cv2.circle(m, (px, top), max(2, int(6 * s)), 1, -1)
        _fill(labels, paint, m.astype(bool), OTHERS, _COLOURS[OTHERS])

    _draw_cars(rng, labels, paint, car, horizon=horizon, s=s)

    for _ in range(rng.integers(0, 4)):  # humans: body ellipse + head
        hx, hy = rng.uniform(0, w), rng.uniform(horizon, h)
        hh = rng.uniform(25, 45) * s
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(hx), int(hy - hh * 0.4)), (max(2, int(hh * 0.15)), max(3, int(hh * 0.4))), 0, 0, 360, 1, -1)
        cv2.circle(m, (int(hx), int(hy - hh * 0.9)), max(2, int(hh * 0.1)), 1, -1)
        mb = m.astype(bool)
        _fill(labels, paint, mb, HUMAN, _COLOURS[HUMAN])
        car &= ~mb

    noise = rng.normal(0, 8, size=(h, w, 3))
    noisy = np.clip(paint.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    image = cv2.GaussianBlur(noisy, (3, 3), 0.6)  # cameras blur edges a little; labels stay sharp
    return Scene(image=image, labels=labels, car=car)
