"""The pure parts of the faithfulness and sanity checks: removal orders, step schedules, the area
under a perturbation curve, Spearman rank correlation and SSIM between two maps.

Definitions: docs/DEFINITIONS.md, sections 'Faithfulness (perturbation) curves' and 'Model
randomization'. The parts that run a model are in viz_app/probes.py.
"""

from __future__ import annotations

import numpy as np

DIRECTIONS = ("deletion", "insertion")  # most relevant removed first / least relevant removed first


def removal_order(heat: np.ndarray, direction: str = "deletion") -> np.ndarray:
    """(gh, gw) or (N,) map -> (N,) patch indices (row-major) in the order they are removed.

    deletion: highest value first (Chefer et al.'s positive perturbation, RISE deletion);
    insertion: lowest value first (Chefer et al.'s negative perturbation; what is left after a
    fraction f is removed is RISE insertion's image at 1 - f). Ties keep row-major order in both
    directions (a stable sort), so a flat map removes patches row by row. NaN is ranked as the
    least relevant.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    v = np.asarray(heat, dtype=np.float64).reshape(-1)
    v = np.where(np.isnan(v), -np.inf, v)
    return np.argsort(-v if direction == "deletion" else v, kind="stable")


def removal_counts(num_patches: int, steps: int, *, min_kept: int = 0) -> np.ndarray:
    """(steps + 1,) number of patches removed at step i: round(i * N / steps), at most N - min_kept.

    Step 0 is the unperturbed image; the last step removes every patch (or all but min_kept,
    for models that pool patches and so need one)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    counts = np.rint(np.arange(steps + 1) * num_patches / steps).astype(np.int64)
    return np.minimum(counts, num_patches - min_kept)


def curve_auc(values: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under curve(s) (..., S) over fractions (S,) in [0, 1] by the trapezoid rule.

    With fractions 0, 1/s, ..., 1 this is RISE's normalized AUC: (sum - first/2 - last/2) / s,
    in the units of the values (a probability curve gives an AUC in [0, 1])."""
    v = np.asarray(values, dtype=np.float64)
    x = np.asarray(fractions, dtype=np.float64)
    return ((v[..., 1:] + v[..., :-1]) * np.diff(x) / 2).sum(axis=-1)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank."""
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, axis=-1)
    out = np.empty_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        v = s[idx]
        starts = np.r_[0, np.flatnonzero(v[1:] != v[:-1]) + 1]
        ends = np.r_[starts[1:], len(v)]
        r = np.repeat((starts + ends + 1) / 2.0, ends - starts)
        out[idx][order[idx]] = r
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of maps (..., gh, gw) vs (..., gh, gw) over their patches (the
    Pearson correlation of their ranks, ties sharing their mean rank). NaN where either map is
    constant (no ranking to compare) or holds a NaN or infinite value (no defined order)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ra = _ranks(np.broadcast_to(a, (*lead, *a.shape[-2:])).reshape(*lead, -1))
    rb = _ranks(np.broadcast_to(b, (*lead, *b.shape[-2:])).reshape(*lead, -1))
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    defined = (den > 0) & _all_finite(a, lead) & _all_finite(b, lead)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)


def _all_finite(m: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    """(*lead,) whether each map (..., gh, gw) has only finite values."""
    return np.broadcast_to(np.isfinite(m).all(axis=(-2, -1)), lead)


def _window(n: int) -> int:
    """SSIM window side: 7, or the largest odd size that fits a smaller grid."""
    w = min(7, n)
    return w if w % 2 else w - 1


def _box_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over every w x w window that fits inside the last two axes ('valid' positions)."""
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), axis=-2), axis=-1)
    s = c[..., w:, w:] - c[..., :-w, w:] - c[..., w:, :-w] + c[..., :-w, :-w]
    return s / (w * w)


def minmax(heat: np.ndarray) -> np.ndarray:
    """Each map (..., gh, gw) scaled to [0, 1] between its finite minimum and maximum (all zeros
    for a constant map); NaN and infinite values stay NaN (no value), never a 0 or a 1 that
    would make two broken maps look alike."""
    h = np.asarray(heat, dtype=np.float64)
    finite = np.isfinite(h)
    lo = np.where(finite, h, np.inf).min(axis=(-2, -1), keepdims=True)
    hi = np.where(finite, h, -np.inf).max(axis=(-2, -1), keepdims=True)
    span = hi - lo  # -inf for a map without a finite value
    with np.errstate(invalid="ignore"):
        scaled = np.where(span > 0, (h - lo) / np.where(span > 0, span, 1), 0.0)
    return np.where(finite, scaled, np.nan)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of maps (..., gh, gw), each first scaled to [0, 1]
    (minmax), as scikit-image computes it with its defaults: a 7 x 7 uniform window (the largest
    odd size that fits a smaller grid), sample covariances, K1 = 0.01, K2 = 0.03, data range 1,
    averaged over the window positions that lie inside the grid. NaN for a map with a NaN or
    infinite value (its structure is not defined)."""
    x, y = minmax(a), minmax(b)
    defined = np.isfinite(x).all(axis=(-2, -1)) & np.isfinite(y).all(axis=(-2, -1))
    x, y = np.nan_to_num(x), np.nan_to_num(y)
    x, y = np.broadcast_arrays(x, y)
    w = _window(min(x.shape[-2:]))
    if w < 1:
        raise ValueError("SSIM needs maps of at least 1 x 1")
    ux, uy = _box_mean(x, w), _box_mean(y, w)
    cov = w * w / max(w * w - 1, 1)  # sample covariance
    vx = cov * (_box_mean(x * x, w) - ux * ux)
    vy = cov * (_box_mean(y * y, w) - uy * uy)
    vxy = cov * (_box_mean(x * y, w) - ux * uy)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return np.where(defined, s.mean(axis=(-2, -1)), np.nan)


def centre_prior(grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) baseline map: the largest distance to the grid's centre minus each patch's own
    (highest in the centre, 0 in the farthest corners)."""
    gh, gw = grid
    yy, xx = np.mgrid[0:gh, 0:gw]
    d = np.hypot(yy - (gh - 1) / 2, xx - (gw - 1) / 2)
    return d.max() - d


def mean_ci(values: np.ndarray, z: float = 1.959963984540054) -> tuple[float, float, float]:
    """(mean, lower, upper) of a 95 % normal-approximation confidence interval of the mean
    (mean +- z * sample sd / sqrt(n)); NaN and infinite values are left out (an infinite value
    has no mean or spread to add); the bounds are NaN for n < 2."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = z * float(v.std(ddof=1)) / np.sqrt(len(v))
    return m, m - h, m + h
