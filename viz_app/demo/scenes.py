"""Shape scenes: seeded RGB scenes with exactly one target shape, its label and its pixel mask.

Eight target classes (circle, square, triangle, star, plus, hexagon, ring, heart), filled with one
solid colour, 15-45 % of the image side, any rotation, fully inside the image. Backgrounds mix
smooth colour gradients, low-frequency noise and reduced-contrast crops of the public-domain
photos in assets/examples. Zero to three distractors (thick lines, scribbles, irregular blobs)
are drawn as boldly as the target (same colours, contrast rule and size range), so finding the
object takes knowing its shape. `difficulty` in [0, 1] eases scenes for a curriculum; 1 is the
full task.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from model.resources import EXAMPLES_DIR

CLASSES = ("circle", "square", "triangle", "star", "plus", "hexagon", "ring", "heart")
PHOTOS = EXAMPLES_DIR
SIZE_RANGE = (0.15, 0.45)  # target extent (bounding diameter) as a share of the image side
BLOB_IRREGULARITY = 1.6  # a distractor blob's longest radius over its shortest, at least
MIN_CONTRAST = 90.0  # RGB distance between a shape's colour and the background under it
# 20 distinct colours (RGB, hex), shapes and backgrounds are drawn from
PALETTE_HEX = (
    "e6194b 3cb44b ffe119 0082c8 f58230 911eb4 46f0f0 f032e6 d2f53c fabed4"
    " 008080 aa6e28 fffac8 800000 aaffc3 000080 ffffff 000000 808080 ffd7b4"
)
PALETTE = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in PALETTE_HEX.split()], dtype=np.float32)


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    label: int
    mask: np.ndarray  # (S, S) bool, the target's visible pixels


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    out = []
    for p in sorted(PHOTOS.glob("*.jpg")):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        h, w = img.shape[:2]
        s = 192 / min(h, w)
        out.append(
            cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)[..., ::-1].astype(np.float32)
        )
    return tuple(out)


def _background(rng: np.random.Generator, S: int, difficulty: float) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    grey = 0.5 * (1 - difficulty)  # easy scenes: washed-out, mid-grey backgrounds
    c0, c1 = (1 - grey) * c0 + grey * 128, (1 - grey) * c1 + grey * 128
    gradient = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    cells = int(rng.integers(2, 6))
    noise = cv2.resize(rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
    weights = rng.dirichlet([1.0, 1.0, 1.0])
    photos = _photos()
    if photos and difficulty > 0:
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(S, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(photo[y : y + side, x : x + side], (S, S), interpolation=cv2.INTER_AREA)
        crop = crop.mean() + rng.uniform(0.25, 0.5) * (crop - crop.mean())  # reduced contrast
    else:
        crop, weights = gradient, np.array([1.0, 0.0, 0.0])
    weights = weights * np.array([1.0, difficulty, difficulty]) + np.array([1e-3, 0, 0])
    weights = weights / weights.sum()
    bg = weights[0] * gradient + weights[1] * noise + weights[2] * crop
    return np.clip(bg, 0, 255)


def _polygon(kind: str, r: float) -> np.ndarray:
    """Outline of a shape with bounding radius r, centred at 0, as (K, 2) float points."""
    if kind == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        return r * np.stack([np.cos(a), np.sin(a)], 1)
    if kind in ("triangle", "hexagon"):
        n = 3 if kind == "triangle" else 6
        a = -np.pi / 2 + np.arange(n) * 2 * np.pi / n
        return r * np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    if kind == "plus":
        w = 0.34 * r  # half the arm width; arm ends at r * cos(atan(w / r)) ~ r
        L = np.sqrt(r * r - w * w)
        pts = [
            (w, L),
            (w, w),
            (L, w),
            (L, -w),
            (w, -w),
            (w, -L),
            (-w, -L),
            (-w, -w),
            (-L, -w),
            (-L, w),
            (-w, w),
            (-w, L),
        ]
        return np.array(pts, dtype=np.float64)
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2
        return pts * (r / np.linalg.norm(pts, axis=1).max())
    raise ValueError(kind)


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _draw_target(kind: str, S: int, r: float, centre: np.ndarray, angle: float) -> np.ndarray:
    mask = np.zeros((S, S), np.uint8)
    if kind in ("circle", "ring"):
        c = tuple(int(round(v)) for v in centre)
        cv2.circle(mask, c, int(round(r)), 1, -1)
        if kind == "ring":
            cv2.circle(mask, c, int(round(r * 0.55)), 0, -1)
    else:
        pts = _rotate(_polygon(kind, r), angle) + centre
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _draw_distractor(rng: np.random.Generator, S: int, size: float) -> np.ndarray:
    mask = np.zeros((S, S), np.uint8)
    kind = rng.choice(["line", "scribble", "blob"])
    centre = rng.uniform(size / 2, S - size / 2, 2)
    thick = int(rng.integers(max(3, S // 24), max(4, S // 9) + 1))  # as bold as a filled shape
    if kind == "line":
        a = rng.uniform(0, np.pi)
        d = np.array([np.cos(a), np.sin(a)]) * size / 2
        p0, p1 = np.round(centre - d).astype(int), np.round(centre + d).astype(int)
        cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, thick)
    elif kind == "scribble":
        steps = int(rng.integers(4, 8))
        heading = rng.uniform(0, 2 * np.pi)
        pts = [centre]
        for _ in range(steps):
            heading += rng.uniform(-1.6, 1.6)
            pts.append(pts[-1] + np.array([np.cos(heading), np.sin(heading)]) * size / steps * 1.6)
        pts = np.clip(np.array(pts), 0, S - 1)
        cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, thick)
    else:  # an irregular blob: no class has this outline
        k = 24
        a = np.linspace(0, 2 * np.pi, k, endpoint=False)
        for _ in range(20):  # never nearly round: a round blob would pass for a circle or hexagon
            coef = rng.normal(0, 1, (3, 2)) * np.array([[0.25], [0.18], [0.12]])
            rad = np.clip(
                1 + sum(coef[i, 0] * np.cos((i + 2) * a) + coef[i, 1] * np.sin((i + 2) * a) for i in range(3)),
                0.45,
                1.4,
            )
            if rad.max() >= BLOB_IRREGULARITY * rad.min():
                break
        rad = rad * size / 2 / rad.max()
        pts = np.stack([rad * np.cos(a), rad * np.sin(a)], 1) + centre
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _colour_for(rng: np.random.Generator, bg: np.ndarray, mask: np.ndarray, difficulty: float = 1.0) -> np.ndarray:
    """A palette colour that stands out from the background under the mask. Below full
    difficulty, some shapes are plain black or white (the easiest contrast to learn from)."""
    under = bg[mask].mean(0) if mask.any() else bg.reshape(-1, 3).mean(0)
    if rng.random() >= difficulty:
        return np.zeros(3) if under.mean() > 127 else np.full(3, 255.0)
    dist = np.linalg.norm(PALETTE - under, axis=1)
    ok = np.flatnonzero(dist >= MIN_CONTRAST)
    pool = ok if ok.size else np.argsort(-dist)[:3]
    base = PALETTE[int(rng.choice(pool))]
    return np.clip(base + rng.normal(0, 8, 3), 0, 255)


def make_scene(rng: np.random.Generator, *, size: int = 96, difficulty: float = 1.0, label: int | None = None) -> Scene:
    """One scene. label: force the target class (None draws it uniformly)."""
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    S = size
    label = int(rng.integers(len(CLASSES))) if label is None else int(label)
    img = _background(rng, S, difficulty)
    lo, hi = SIZE_RANGE
    lo = hi - (hi - lo) * (0.4 + 0.6 * difficulty)  # easy scenes: larger targets
    n_distract = int(rng.integers(0, int(round(3 * difficulty)) + 1))
    for _ in range(n_distract):
        dmask = _draw_distractor(rng, S, rng.uniform(SIZE_RANGE[0], SIZE_RANGE[1]) * S)
        img[dmask] = _colour_for(rng, img, dmask, difficulty)
    extent = rng.uniform(lo, hi) * S
    r = extent / 2
    centre = rng.uniform(r + 1, S - r - 1, 2)
    mask = _draw_target(CLASSES[label], S, r, centre, rng.uniform(0, 2 * np.pi) * difficulty)  # easy: upright
    img[mask] = _colour_for(rng, img, mask, difficulty)
    return Scene(image=np.round(img).astype(np.uint8), label=label, mask=mask)


def patch_shares(masks: np.ndarray, patch: int) -> np.ndarray:
    """(B, S, S) bool masks -> (B, gh, gw): the share of each patch's pixels inside the mask."""
    B, S, _ = masks.shape
    g = S // patch
    return masks[:, : g * patch, : g * patch].reshape(B, g, patch, g, patch).mean(axis=(2, 4))


def make_batch(
    seed: int | np.random.SeedSequence, n: int, *, size: int = 96, difficulty: float = 1.0, balanced: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n scenes from one seed -> (images (n, S, S, 3) uint8, labels (n,), masks (n, S, S) bool).
    balanced: labels cycle through the classes in a shuffled order (equal counts up to n % 8)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    scenes = [make_scene(rng, size=size, difficulty=difficulty, label=lab if balanced else None) for lab in labels]
    return (
        np.stack([s.image for s in scenes]),
        np.array([s.label for s in scenes]),
        np.stack([s.mask for s in scenes]),
    )
