"""Arrays -> pictures (uint8 RGB arrays, PNG bytes). No Streamlit here; plotly figures are in figures.py."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from model.preprocess import PreparedImage
from viz_app import colormaps

UPSAMPLING = ("nearest", "bilinear", "paper")
FONT = cv2.FONT_HERSHEY_SIMPLEX

# A value that is NaN or infinite (a broken checkpoint, a division by zero upstream) has no place
# on a colour scale: it is drawn in mid grey with darker diagonal stripes, which no colour map
# here contains, and never stretches or breaks a colour bar's range (ranges come from the finite
# values only).
NO_VALUE = (165, 165, 165)
NO_VALUE_HATCH = (105, 105, 105)
NO_VALUE_NAME = "hatched grey"
_HATCH_PERIOD, _HATCH_WIDTH = 8, 2


def paint_no_value(img: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Draw the pixels where `missing` (h, w) is True in the no-value pattern, in place."""
    yy, xx = np.nonzero(missing)
    if len(yy):
        img[yy, xx] = NO_VALUE
        stripe = (yy + xx) % _HATCH_PERIOD < _HATCH_WIDTH
        img[yy[stripe], xx[stripe]] = NO_VALUE_HATCH
    return img


def finite_max(values: np.ndarray, floor: float = 1e-12, *, default: float = 1.0) -> float:
    """The top of a colour scale that starts at 0: the largest finite value, at least `floor`;
    `default` when no value is finite (a bar from 0 to 1e-12 would only print zeros)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return max(float(finite.max()), floor) if finite.size else default


def share_of_max(maps: np.ndarray, *, shared: bool = False) -> np.ndarray:
    """Maps (..., gh, gw) divided by their finite maximum (each map its own, or one for all when
    shared), floored at 1e-12; NaN and infinite values stay NaN, so one broken patch leaves the
    rest of its map drawn."""
    m = np.asarray(maps, dtype=np.float64)
    finite = np.isfinite(m)
    masked = np.where(finite, m, -np.inf)
    top = masked.max(keepdims=True) if shared or m.ndim < 2 else masked.max(axis=(-2, -1), keepdims=True)
    top = np.maximum(top, 1e-12)
    return np.where(finite, m / top, np.nan)


def finite_range(vmin: float | None, vmax: float | None, default: tuple[float, float] = (0.0, 1.0)):
    """(vmin, vmax) made drawable: a bound that is missing, NaN or infinite is replaced by the
    default's, and an empty or reversed range is widened to vmin + 1."""
    lo = float(vmin) if vmin is not None and np.isfinite(vmin) else default[0]
    hi = float(vmax) if vmax is not None and np.isfinite(vmax) else default[1]
    return lo, (hi if hi > lo else lo + 1.0)


def put_text(
    img: np.ndarray, text: str, org: tuple[int, int], scale: float, color=(20, 20, 20), thick: int = 1
) -> None:
    """Anti-aliased text in the plots' font, baseline at org."""
    cv2.putText(img, text, org, FONT, scale, color, thick, cv2.LINE_AA)


def normalize(heat: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] between vmin and vmax (default, or when a bound is NaN or infinite: the
    map's own finite min and max). NaN and infinite values come back NaN (no value)."""
    h = np.asarray(heat, dtype=np.float64)
    finite = np.isfinite(h)
    if vmin is None or not np.isfinite(vmin) or vmax is None or not np.isfinite(vmax):
        values = h[finite]
        lo_d, hi_d = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    lo = float(vmin) if vmin is not None and np.isfinite(vmin) else lo_d
    hi = float(vmax) if vmax is not None and np.isfinite(vmax) else hi_d
    if hi <= lo:
        out = np.zeros_like(h)
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            out = np.clip((h - lo) / (hi - lo), 0.0, 1.0)
    return out if finite.all() else np.where(finite, out, np.nan)


def colorize(
    heat: np.ndarray, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """(h, w) float -> (h, w, 3) uint8 RGB through the colour map's table (viz_app/colormaps.py);
    vmin maps to the table's first colour, vmax to its last; NaN and infinite values are drawn
    in the no-value pattern (NO_VALUE, hatched)."""
    lut = colormaps.get(cmap).lut
    u = normalize(heat, vmin, vmax)
    missing = np.isnan(u)
    u8 = (np.where(missing, 0.0, u) * 255 + 0.5).astype(np.uint8)
    out = lut[u8]
    if missing.any():
        if u.ndim == 2:
            paint_no_value(out, missing)
        else:
            out[missing] = NO_VALUE
    return out


def upsample(heat: np.ndarray, size: tuple[int, int], method: str = "nearest", *, patch_size: int = 16) -> np.ndarray:
    """(gh, gw) -> (H, W) float32.

    nearest: every patch a flat block (honest, patch-level; the default).
    bilinear: smooth interpolation between patch centres.
    paper: our reconstruction of the look of the paper's Fig. 6 (no code for it was released):
        max-normalize, Lanczos resize, Gaussian blur with standard deviation = patch size; the
        result is an alpha mask in [0, 1].

    NaN and infinite values: nearest keeps them where they were; bilinear spreads them to the
    interpolated pixels next to them; paper counts them as 0 (a blur has no way to skip them;
    overlay marks their patches as no value).
    """
    H, W = size
    h = np.asarray(heat, dtype=np.float32)
    if method == "nearest":
        return cv2.resize(h, (W, H), interpolation=cv2.INTER_NEAREST)
    if method == "bilinear":
        return cv2.resize(h, (W, H), interpolation=cv2.INTER_LINEAR)
    if method == "paper":
        h = np.where(np.isfinite(h), h, np.float32(0.0))
        top = float(h.max()) if h.size else 0.0
        m = h / top if top > 0 else np.zeros_like(h)
        m = cv2.resize(m, (W, H), interpolation=cv2.INTER_LANCZOS4)
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=patch_size)
        return np.clip(m, 0.0, 1.0)
    raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {method!r}")


def overlay(
    view: np.ndarray,
    heat: np.ndarray,
    *,
    method: str = "nearest",
    alpha: float = 0.5,
    cmap: str = "inferno",
    patch_size: int = 16,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Heat map over the image the model sees. With method 'paper' the map is an alpha mask
    over black (paper Fig. 6) that reaches 1 where the map reaches vmax (default: its own
    maximum; a larger vmax, one scale for several maps, dims it by max / vmax); otherwise a colour map blended with `alpha`, over the range
    colormaps.value_range gives (by default 0 to the map's maximum: 0 is the darkest colour).
    Patches whose value is NaN or infinite are drawn in the no-value pattern (not blended), with
    every method; a NaN or infinite vmin/vmax counts as not given."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    H, W = view.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    missing = ~np.isfinite(heat)
    clean = np.where(missing, np.float32(0.0), heat) if missing.any() else heat
    up = upsample(clean, (H, W), method, patch_size=patch_size)
    if method == "paper":
        top = float(clean.max()) if clean.size else 0.0
        if vmax is not None and np.isfinite(vmax) and vmax > 0 and top > 0:  # one scale for several maps
            up = np.clip(up * np.float32(top / vmax), 0.0, 1.0)
        out = (view.astype(np.float32) * up[..., None]).astype(np.uint8)
    else:
        vmin = vmin if vmin is not None and np.isfinite(vmin) else None
        vmax = vmax if vmax is not None and np.isfinite(vmax) else None
        vmin, vmax = colormaps.value_range(heat, colormaps.get(cmap).kind, vmin, vmax)
        color = colorize(up, cmap, vmin, vmax)
        out = (view.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha + 0.5).astype(np.uint8)
    if missing.any():
        where = cv2.resize(missing.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        paint_no_value(out, where)
    return out


# Overlays on the original (the app's download, the CLI's _rollout.png) are drawn at most this
# large, the original reduced by a whole factor first: drawing costs about 28 bytes a pixel (1.4 GB
# for a 50 MP photo), and a map of one value per patch gains nothing past 16 MP.
OVERLAY_MAX_PIXELS = 16_000_000


def reduced_original(
    original: np.ndarray | Image.Image, prepared: PreparedImage, max_pixels: int = OVERLAY_MAX_PIXELS
) -> tuple[np.ndarray, PreparedImage]:
    """The original as an overlay needs it: reduced by the smallest whole factor that brings it
    to max_pixels or fewer (each output pixel the mean of a f x f box), with prepared's geometry
    mapped to that size. Returns the original itself when it is small enough."""
    img = original if isinstance(original, Image.Image) else None
    w, h = img.size if img is not None else (original.shape[1], original.shape[0])
    f = 1
    while -(-w // f) * -(-h // f) > max_pixels:
        f += 1
    if f == 1:
        return (np.asarray(img) if img is not None else original), prepared
    small = (img if img is not None else Image.fromarray(np.ascontiguousarray(original))).reduce(f)
    return np.asarray(small), dataclasses.replace(prepared, original_size=small.size)


def overlay_on_original(original: np.ndarray, prepared: PreparedImage, heat: np.ndarray, **kw) -> np.ndarray:
    """The same overlay on the uploaded image: the model's crop is mapped back (crop inverted,
    resize undone); parts of the original the model never saw are shown dimmed."""
    W0, H0 = prepared.original_size
    if original.shape[:2] != (H0, W0):
        raise ValueError(f"original is {original.shape[1]}x{original.shape[0]}, expected {W0}x{H0}")
    Wr, Hr = prepared.resized_size
    left, top, right, bottom = prepared.crop_box
    sx, sy = W0 / Wr, H0 / Hr
    x0, y0 = round(left * sx), round(top * sy)
    x1, y1 = round(right * sx), round(bottom * sy)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W0, x1), min(H0, y1)
    out = (original.astype(np.float32) * 0.35).astype(np.uint8)
    region = original[y0:y1, x0:x1]
    if region.size:
        out[y0:y1, x0:x1] = overlay(region, heat, **kw)
    return out


@lru_cache(maxsize=16)
def _grid_frame(H: int, W: int, patch_size: int, k: int) -> tuple[np.ndarray, int]:
    """The white margin with row/column numbers for a (H, W) view enlarged k times, and the
    margin's width; the same for every image of a model, so drawn once."""
    gh, gw = H // patch_size, W // patch_size
    ps = patch_size * k
    fs = max(0.5, max(H, W) * k / 850)
    (tw, th), _ = cv2.getTextSize(str(max(gh, gw) - 1), FONT, fs, 1)
    margin = tw + 10
    canvas = np.full((H * k + margin, W * k + margin, 3), 255, np.uint8)
    step = max(1, int(np.ceil((tw + 6) / ps)))  # skip labels that would overlap
    for c in range(0, gw, step):
        x = margin + c * ps + (ps - cv2.getTextSize(str(c), FONT, fs, 1)[0][0]) // 2
        put_text(canvas, str(c), (x, margin - 5), fs, (40, 40, 40))
    for r in range(0, gh, step):
        put_text(canvas, str(r), (3, margin + r * ps + (ps + th) // 2), fs, (40, 40, 40))
    canvas.setflags(write=False)
    return canvas, margin


def draw_patch_grid(
    view: np.ndarray,
    patch_size: int,
    *,
    labels: bool = True,
    highlight: tuple[int, int] | None = None,
    min_side: int = 672,
) -> np.ndarray:
    """Patch grid on the model's view, with row/column numbers (from 0) in a margin; optionally
    one patch (row, col) outlined. The view is enlarged (nearest, a whole factor) until its long
    side is at least min_side px, so that the numbers stay legible when the picture is shown
    at column width."""
    H, W = view.shape[:2]
    gh, gw = H // patch_size, W // patch_size
    k = max(1, int(np.ceil(min_side / max(H, W))))
    img = cv2.resize(view, (W * k, H * k), interpolation=cv2.INTER_NEAREST) if k > 1 else view.copy()
    ps = patch_size * k
    img[ps : gh * ps : ps, :] = 255
    img[:, ps : gw * ps : ps] = 255
    if highlight is not None:
        r, c = highlight
        cv2.rectangle(img, (c * ps, r * ps), ((c + 1) * ps - 1, (r + 1) * ps - 1), (0, 255, 255), max(2, k))
    if not labels:
        return img
    frame, margin = _grid_frame(H, W, patch_size, k)
    canvas = frame.copy()
    canvas[margin:, margin:] = img
    return canvas


def patch_at(x: float, y: float, *, patch_size: int, grid: tuple[int, int], num_prefix: int) -> tuple[int, int, int]:
    """A click at model-input pixel (x, y) -> (row, col, token index P + row * gw + col)."""
    gh, gw = grid
    r, c = int(y // patch_size), int(x // patch_size)
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"({x}, {y}) is outside the {gh}x{gw} patch grid")
    return r, c, num_prefix + r * gw + c


def tile_grid(
    tiles: np.ndarray, *, vmin: float = -1.0, vmax: float = 1.0, cmap: str = "viridis", scale: int = 4, gap: int = 1
) -> np.ndarray:
    """(R, C, h, w) values -> one image of R x C colored tiles on one shared color scale."""
    R, C, h, w = tiles.shape
    th, tw = h * scale, w * scale
    out = np.full((R * (th + gap) + gap, C * (tw + gap) + gap, 3), 255, np.uint8)
    if tiles.size == 0:
        return out
    # colored all at once: tiles enlarged, each with its gap (white) below and right, then laid out
    big = np.repeat(np.repeat(np.asarray(tiles), scale, axis=2), scale, axis=3)  # (R, C, th, tw)
    colored = colorize(big.reshape(R * C * th, tw), cmap, vmin, vmax).reshape(R, C, th, tw, 3)
    cells = np.full((R, C, th + gap, tw + gap, 3), 255, np.uint8)
    cells[:, :, :th, :tw] = colored
    out[gap:, gap:] = cells.transpose(0, 2, 1, 3, 4).reshape(R * (th + gap), C * (tw + gap), 3)
    return out


def filter_tiles(components: np.ndarray, *, cols: int = 7, scale: int = 6, gap: int = 2) -> np.ndarray:
    """(K, 3, p, p) filter components -> RGB tiles, each with its own symmetric contrast
    (0 maps to mid-grey); pixels with a NaN or infinite channel in the no-value pattern."""
    K, C, p, _ = components.shape
    rows = int(np.ceil(K / cols))
    t = p * scale
    out = np.full((rows * (t + gap) + gap, cols * (t + gap) + gap, 3), 255, np.uint8)
    for k in range(K):
        comp = np.moveaxis(np.asarray(components[k], dtype=np.float64), 0, -1)  # (p, p, C)
        if C == 1:
            comp = np.repeat(comp, 3, axis=-1)
        missing = ~np.isfinite(comp).all(axis=-1)
        comp = np.where(np.isfinite(comp), comp, 0.0)
        m = np.abs(comp).max() if comp.size else 0.0
        img = 0.5 + 0.5 * comp / m if m > 0 else np.full_like(comp, 0.5)
        img = cv2.resize((img[..., :3] * 255 + 0.5).astype(np.uint8), (t, t), interpolation=cv2.INTER_NEAREST)
        if missing.any():
            paint_no_value(img, np.kron(missing, np.ones((scale, scale), dtype=bool)))
        r, c = divmod(k, cols)
        out[gap + r * (t + gap) : gap + r * (t + gap) + t, gap + c * (t + gap) : gap + c * (t + gap) + t] = img
    return out


def mad_scatter_png(
    mad: np.ndarray,
    *,
    size: tuple[int, int] = (1200, 800),
    title: str = "",
    prefix_share: np.ndarray | None = None,
    ymax: float | None = None,
    mark_at: float = 0.5,
) -> np.ndarray:
    """The Fig. 7 (right) scatter as an RGB array (for downloads and the CLI; no browser needed):
    one dot per (layer, head), layers from 1 on x, pixels from 0 on y, heads coloured by the
    same palette as the page; heads whose prefix share is at least mark_at are open circles.
    Heads whose distance is NaN or infinite have no dot: a line under the axis counts them, and
    the y range comes from the finite values (a NaN or infinite ymax counts as not given)."""
    mad = np.asarray(mad, dtype=np.float64)
    L, H = mad.shape
    W, Hh = size
    img = np.full((Hh, W, 3), 255, np.uint8)
    fs = max(0.45, W / 1600)
    left, right, top, bottom = int(110 * fs), 30, int(90 * fs), int(90 * fs)
    finite = np.isfinite(mad)
    if ymax is None or not np.isfinite(ymax) or ymax <= 0:
        ymax = max(1.0, float(mad[finite].max()) * 1.1) if finite.any() else 1.0
    x_of = lambda i: int(left + (i + 0.5) / L * (W - left - right))  # noqa: E731
    y_of = lambda v: int(Hh - bottom - v / ymax * (Hh - top - bottom))  # noqa: E731
    black, grey = (0, 0, 0), (210, 210, 210)
    for t in np.linspace(0, ymax, 6):
        y = y_of(t)
        cv2.line(img, (left, y), (W - right, y), grey, 1)
        put_text(img, f"{t:.0f}", (8, y + int(8 * fs)), fs, black)
    cv2.line(img, (left, Hh - bottom), (W - right, Hh - bottom), black, 1)
    cv2.line(img, (left, top), (left, Hh - bottom), black, 1)
    step = max(1, L // 24)
    for i in range(0, L, step):
        put_text(img, str(i + 1), (x_of(i) - int(8 * fs), Hh - bottom + int(30 * fs)), fs, black)
    palette = colormaps.get("viridis").lut[np.linspace(0, 230, max(H, 1)).round().astype(int)]
    share = None if prefix_share is None else np.asarray(prefix_share, dtype=np.float64)
    high = np.zeros_like(mad, bool) if share is None else np.isfinite(share) & (np.nan_to_num(share) >= mark_at)
    radius = max(4, int(7 * fs))
    for i in range(L):
        for h in range(H):
            if not finite[i, h]:
                continue
            color = tuple(int(v) for v in palette[h])
            centre = (x_of(i), y_of(min(max(float(mad[i, h]), -ymax), 2 * ymax)))  # far outliers at the edge
            cv2.circle(img, centre, radius, color, 2 if high[i, h] else -1, cv2.LINE_AA)
    if not finite.all():
        note = f"not drawn: {int((~finite).sum())} of {L * H} heads (NaN or infinite)"
        put_text(img, note, (8, Hh - int(20 * fs)), fs * 0.8, (150, 0, 0))
    put_text(img, "network depth (layer)", (W // 2 - int(130 * fs), Hh - int(20 * fs)), fs * 1.1, black)
    put_text(img, "mean attention distance (pixels)", (left, top - int(20 * fs)), fs * 1.1, black)
    if title:
        put_text(img, title, (left, int(36 * fs)), fs * 1.3, black, thick=2)
    if high.any():
        put_text(
            img, f"open circles: prefix share >= {mark_at}", (W - right - int(520 * fs), top - int(20 * fs)), fs, black
        )
    return img


def labelled_grid(
    tiles: np.ndarray,
    *,
    row_name: str,
    col_name: str,
    cmap: str,
    vmin: float,
    vmax: float,
    first: int = 1,
    min_side: int = 1024,
) -> np.ndarray:
    """tile_grid with its rows and columns numbered (from `first`) and named in a margin, at
    least min_side px on its long side."""
    R, C, h, w = tiles.shape
    scale = max(1, int(np.ceil(min_side / max(R * (h + 1), C * (w + 1)))))
    grid = tile_grid(tiles, vmin=vmin, vmax=vmax, cmap=cmap, scale=scale)
    gh, gw = grid.shape[:2]
    fs = max(0.5, max(gh, gw) / 1800)
    (tw, th), _ = cv2.getTextSize(str(max(R, C) + first), FONT, fs, 1)
    mx, my = tw + int(60 * fs), th + int(60 * fs)
    out = np.full((gh + my, gw + mx, 3), 255, np.uint8)
    out[my:, mx:] = grid
    step_c = max(1, int(np.ceil((tw + 8) / (w * scale + 1))))
    step_r = max(1, int(np.ceil((th + 8) / (h * scale + 1))))
    for c in range(0, C, step_c):
        label = str(c + first)
        x = mx + 1 + c * (w * scale + 1) + (w * scale - cv2.getTextSize(label, FONT, fs, 1)[0][0]) // 2
        put_text(out, label, (x, my - 6), fs)
    for r in range(0, R, step_r):
        put_text(out, str(r + first), (int(40 * fs), my + 1 + r * (h * scale + 1) + (h * scale + th) // 2), fs)
    put_text(out, col_name, (mx, int(28 * fs) + th // 2), fs)
    side = np.full((th + 8, cv2.getTextSize(row_name, FONT, fs, 1)[0][0] + 4, 3), 255, np.uint8)
    put_text(side, row_name, (2, th + 2), fs)
    side = np.rot90(side)
    y0 = my + max(0, (gh - side.shape[0]) // 2)
    out[y0 : y0 + side.shape[0], 2 : 2 + side.shape[1]] = side[: out.shape[0] - y0]
    return out


MASK_COLOR = (0, 255, 255)  # cyan: the outline of a mass-threshold mask
MASK_COLOR_NAME = "cyan"


def enlarge(image: np.ndarray, min_side: int) -> tuple[np.ndarray, int]:
    """A small picture enlarged by the smallest whole factor that makes its long side at least
    min_side px, nearest neighbour (patches stay sharp, no new detail); -> (picture, factor)."""
    k = max(1, int(np.ceil(min_side / max(image.shape[:2]))))
    return (np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image), k


def outline_patches(image: np.ndarray, mask: np.ndarray, *, color=MASK_COLOR, width: int | None = None) -> np.ndarray:
    """A copy of `image` (H, W, 3) with the outline of a patch mask (gh, gw) bool drawn on it: every
    edge between a patch in the mask and one outside it (or the image border). The image spans the
    grid (patch r covers rows r*H/gh to (r+1)*H/gh). width: the line's thickness in px (default
    about an eighth of a patch, at least 1), centred on the edge and kept inside the image."""
    H, W = image.shape[:2]
    m = np.asarray(mask, dtype=bool)
    gh, gw = m.shape
    out = image.copy()
    if not m.any():
        return out
    ys = np.round(np.linspace(0, H, gh + 1)).astype(int)
    xs = np.round(np.linspace(0, W, gw + 1)).astype(int)
    t = width or max(1, int(round(min(H / gh, W / gw) / 8)))
    p = np.pad(m, 1)
    horizontal = p[:-1, 1:-1] != p[1:, 1:-1]  # (gh + 1, gw): an edge above row r (r = gh: the bottom)
    vertical = p[1:-1, :-1] != p[1:-1, 1:]  # (gh, gw + 1): an edge left of column c
    for r, c in zip(*np.nonzero(horizontal)):
        y0 = min(max(ys[r] - t // 2, 0), H - t)
        out[y0 : y0 + t, xs[c] : xs[c + 1]] = color
    for r, c in zip(*np.nonzero(vertical)):
        x0 = min(max(xs[c] - t // 2, 0), W - t)
        out[ys[r] : ys[r + 1], x0 : x0 + t] = color
    return out


def tile_mosaic(
    tiles: list[np.ndarray], labels: list[str], *, cols: int, gap: int = 8
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Equal-size RGB tiles in rows of `cols`, each with its label above it, on white.

    Returns (the picture, each tile's box (x0, y0, x1, y1) in it, in the tiles' order)."""
    if not tiles:
        raise ValueError("no tiles")
    th, tw = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    fs = max(0.4, min(1.0, tw / 260))
    label_h = cv2.getTextSize("Ag", FONT, fs, 1)[0][1] + int(14 * fs) + 4
    cell_h, cell_w = label_h + th + gap, tw + gap
    out = np.full((rows * cell_h + gap, cols * cell_w + gap, 3), 255, np.uint8)
    boxes = []
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(k, cols)
        x0, y0 = gap + c * cell_w, gap + r * cell_h + label_h
        out[y0 : y0 + th, x0 : x0 + tw] = tile
        put_text(out, label, (x0 + 2, y0 - int(7 * fs) - 2), fs)
        boxes.append((x0, y0, x0 + tw, y0 + th))
    return out, boxes


def to_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _tick_format(vmin: float, vmax: float, ticks: int) -> str:
    """One format for every tick of a bar: enough decimals to tell neighbouring ticks apart."""
    step = abs(vmax - vmin) / max(ticks - 1, 1)
    if step == 0 or not np.isfinite(step) or step >= 1e4 or max(abs(vmin), abs(vmax)) >= 1e5:
        return "{:.3g}"
    decimals = max(0, int(np.ceil(-np.log10(step))) + 1)
    return "{:." + str(min(decimals, 6)) + "f}"


def colorbar(
    height: int, *, cmap: str, vmin: float, vmax: float, label: str = "", width: int = 0, ticks: int = 5
) -> np.ndarray:
    """A vertical colour bar (RGB, white background) `height` px tall: the colour map from vmin
    (bottom) to vmax (top), `ticks` labelled values, and the quantity's name along the bar.
    A NaN or infinite bound is replaced (finite_range: 0 and 1), so the bar always has numbers."""
    vmin, vmax = finite_range(vmin, vmax)
    scale = min(1.2, max(0.5, height / 520))  # legible at column width, not shouting in a download
    bar_w = max(12, height // 22)
    # a fixed width for a given height, so that maps shown side by side keep the same size
    width = width or bar_w + cv2.getTextSize("-0.000e+00", FONT, scale, 1)[0][0] + int(40 * scale) + 16
    pad = int(14 * scale) + 4  # room for the top and bottom tick labels
    out = np.full((height, width, 3), 255, np.uint8)
    inner = height - 2 * pad
    ramp = np.linspace(1.0, 0.0, inner)[:, None].repeat(bar_w, axis=1)  # top = vmax
    out[pad : pad + inner, 4 : 4 + bar_w] = colormaps.get(cmap).lut[(ramp * 255 + 0.5).astype(np.uint8)]
    cv2.rectangle(out, (4, pad), (4 + bar_w - 1, pad + inner - 1), (60, 60, 60), 1)
    fmt = _tick_format(vmin, vmax, ticks)
    for v in np.linspace(vmin, vmax, ticks):
        y = int(round(pad + (1 - (v - vmin) / (vmax - vmin or 1)) * (inner - 1)))
        cv2.line(out, (4 + bar_w, y), (8 + bar_w, y), (20, 20, 20), 1)
        put_text(out, fmt.format(float(v)), (11 + bar_w, y + int(5 * scale)), scale)
    if label:  # written upwards along the right edge
        (tw, th), _ = cv2.getTextSize(label, FONT, scale, 1)
        strip = np.full((th + 8, tw + 4, 3), 255, np.uint8)
        put_text(strip, label, (2, th + 2), scale)
        strip = np.rot90(strip)
        h, w = strip.shape[:2]
        y0 = max(0, (height - h) // 2)
        x0 = width - w - 2
        out[y0 : y0 + min(h, height), x0 : x0 + w] = strip[: height - y0]
    return out


def wrap_text(text: str, width: int, scale: float, thick: int = 1) -> list[str]:
    """`text` broken at spaces into lines at most `width` px wide in the plots' font (a word longer
    than the width stands on its own line)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and cv2.getTextSize(f"{lines[-1]} {word}", FONT, scale, thick)[0][0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def publication_figure(
    image: np.ndarray,
    *,
    title: str,
    cmap: str | None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    label: str = "",
    min_long_side: int = 1024,
) -> tuple[np.ndarray, str]:
    """An image at publication size with a title above and (for a colour-mapped view) its colour
    bar beside it. The image is enlarged by the smallest whole factor that makes its long side at
    least `min_long_side` px, with nearest-neighbour upscaling (no new detail, patches stay sharp).
    Returns (RGB array, a note naming the upscaling, e.g. 'nearest x5 from 224x224 px')."""
    h, w = image.shape[:2]
    factor = max(1, int(np.ceil(min_long_side / max(h, w))))
    big = cv2.resize(image, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST) if factor > 1 else image
    note = f"nearest x{factor} from {w}x{h} px" if factor > 1 else f"{w}x{h} px, not upscaled"
    H, W = big.shape[:2]
    bar = colorbar(H, cmap=cmap, vmin=vmin, vmax=vmax, label=label) if cmap else np.zeros((H, 0, 3), np.uint8)
    scale = max(0.7, W / 1000)
    width = W + bar.shape[1] + 16
    lines = [(line, scale, 2) for line in wrap_text(title, width - 16, scale, 2)] + [(note, scale * 0.7, 1)]
    line_h = int(34 * scale)
    head = np.full((line_h * len(lines) + 12, width, 3), 255, np.uint8)
    for i, (text, size, thick) in enumerate(lines):
        put_text(head, text, (8, line_h * (i + 1) - 6), size, thick=thick)
    body = np.full((H + 8, head.shape[1], 3), 255, np.uint8)
    body[:H, :W] = big
    body[:H, W + 16 :] = bar
    return np.concatenate([head, body]), note
