"""Arrays -> pictures (uint8 RGB arrays, PNG bytes). No Streamlit here; plotly figures are in figures.py."""

from __future__ import annotations

import cv2
import numpy as np

from model.preprocess import PreparedImage

COLORMAPS = {
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "jet": cv2.COLORMAP_JET,
    "magma": cv2.COLORMAP_MAGMA,
    "turbo": cv2.COLORMAP_TURBO,
    "coolwarm": cv2.COLORMAP_TWILIGHT_SHIFTED,
}
UPSAMPLING = ("nearest", "bilinear", "paper")


def normalize(heat: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] between vmin and vmax (default: the map's own min and max)."""
    h = np.asarray(heat, dtype=np.float64)
    lo = float(np.nanmin(h)) if vmin is None else vmin
    hi = float(np.nanmax(h)) if vmax is None else vmax
    if hi <= lo:
        return np.zeros_like(h)
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0)


def colorize(
    heat: np.ndarray, cmap: str = "inferno", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """(h, w) float -> (h, w, 3) uint8 RGB with an OpenCV colormap."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colormap {cmap!r}; choose from {sorted(COLORMAPS)}")
    u8 = (normalize(heat, vmin, vmax) * 255 + 0.5).astype(np.uint8)
    return cv2.applyColorMap(u8, COLORMAPS[cmap])[..., ::-1].copy()


def upsample(heat: np.ndarray, size: tuple[int, int], method: str = "nearest", *, patch_size: int = 16) -> np.ndarray:
    """(gh, gw) -> (H, W) float32.

    nearest: every patch a flat block (honest, patch-level; the default).
    bilinear: smooth interpolation between patch centres.
    paper: our reconstruction of the look of the paper's Fig. 6 (no code for it was released):
        max-normalize, Lanczos resize, Gaussian blur with standard deviation = patch size; the
        result is an alpha mask in [0, 1].
    """
    H, W = size
    h = np.asarray(heat, dtype=np.float32)
    if method == "nearest":
        return cv2.resize(h, (W, H), interpolation=cv2.INTER_NEAREST)
    if method == "bilinear":
        return cv2.resize(h, (W, H), interpolation=cv2.INTER_LINEAR)
    if method == "paper":
        m = h / h.max() if h.max() > 0 else np.zeros_like(h)
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
    over black (paper Fig. 6); otherwise a colormap blended with `alpha`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    H, W = view.shape[:2]
    up = upsample(heat, (H, W), method, patch_size=patch_size)
    if method == "paper":
        return (view.astype(np.float32) * up[..., None]).astype(np.uint8)
    color = colorize(up, cmap, vmin, vmax)
    return (view.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha + 0.5).astype(np.uint8)


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


def draw_patch_grid(
    view: np.ndarray, patch_size: int, *, labels: bool = True, highlight: tuple[int, int] | None = None
) -> np.ndarray:
    """Patch grid on the model's view, with row/column numbers in a margin; optionally one patch
    (row, col) outlined."""
    H, W = view.shape[:2]
    gh, gw = H // patch_size, W // patch_size
    img = view.copy()
    line = (255, 255, 255)
    for r in range(1, gh):
        img[r * patch_size, :] = line
    for c in range(1, gw):
        img[:, c * patch_size] = line
    if highlight is not None:
        r, c = highlight
        cv2.rectangle(
            img,
            (c * patch_size, r * patch_size),
            ((c + 1) * patch_size - 1, (r + 1) * patch_size - 1),
            (0, 255, 255),
            2,
        )
    if not labels:
        return img
    scale = 3 if max(H, W) < 400 else 1  # small model inputs get upscaled so labels stay legible
    img = cv2.resize(img, (W * scale, H * scale), interpolation=cv2.INTER_NEAREST)
    ps = patch_size * scale
    margin = 22
    canvas = np.full((H * scale + margin, W * scale + margin, 3), 255, np.uint8)
    canvas[margin:, margin:] = img
    step = max(1, int(np.ceil(14 / ps)))  # skip labels that would overlap
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.35
    for c in range(0, gw, step):
        cv2.putText(canvas, str(c), (margin + c * ps + 2, 15), font, fs, (40, 40, 40), 1, cv2.LINE_AA)
    for r in range(0, gh, step):
        cv2.putText(canvas, str(r), (2, margin + r * ps + min(ps, 14)), font, fs, (40, 40, 40), 1, cv2.LINE_AA)
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
    (0 maps to mid-grey)."""
    K, C, p, _ = components.shape
    rows = int(np.ceil(K / cols))
    t = p * scale
    out = np.full((rows * (t + gap) + gap, cols * (t + gap) + gap, 3), 255, np.uint8)
    for k in range(K):
        comp = np.moveaxis(np.asarray(components[k], dtype=np.float64), 0, -1)  # (p, p, C)
        if C == 1:
            comp = np.repeat(comp, 3, axis=-1)
        m = np.abs(comp).max()
        img = 0.5 + 0.5 * comp / m if m > 0 else np.full_like(comp, 0.5)
        img = cv2.resize((img[..., :3] * 255 + 0.5).astype(np.uint8), (t, t), interpolation=cv2.INTER_NEAREST)
        r, c = divmod(k, cols)
        out[gap + r * (t + gap) : gap + r * (t + gap) + t, gap + c * (t + gap) : gap + c * (t + gap) + t] = img
    return out


def mad_scatter_png(mad: np.ndarray, *, size: tuple[int, int] = (640, 420), title: str = "") -> np.ndarray:
    """The same scatter as a PNG-ready RGB array (for the CLI; no browser needed)."""
    L, H = mad.shape
    W, Hh = size
    img = np.full((Hh, W, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 36, 50
    ymax = max(1.0, float(np.nanmax(mad)) * 1.1)
    x_of = lambda i: int(left + (i + 0.5) / L * (W - left - right))  # noqa: E731
    y_of = lambda v: int(Hh - bottom - v / ymax * (Hh - top - bottom))  # noqa: E731
    black, grey = (0, 0, 0), (200, 200, 200)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in np.linspace(0, ymax, 6):
        y = y_of(t)
        cv2.line(img, (left, y), (W - right, y), grey, 1)
        cv2.putText(img, f"{t:.0f}", (8, y + 4), font, 0.4, black, 1, cv2.LINE_AA)
    cv2.line(img, (left, Hh - bottom), (W - right, Hh - bottom), black, 1)
    cv2.line(img, (left, top), (left, Hh - bottom), black, 1)
    step = max(1, L // 12)
    for i in range(0, L, step):
        cv2.putText(img, str(i + 1), (x_of(i) - 4, Hh - bottom + 16), font, 0.4, black, 1, cv2.LINE_AA)
    palette = cv2.applyColorMap(np.linspace(0, 255, max(H, 2)).astype(np.uint8)[:, None], cv2.COLORMAP_TURBO)[
        :, 0, ::-1
    ]
    for i in range(L):
        for h in range(H):
            color = tuple(int(v) for v in palette[h])
            cv2.circle(img, (x_of(i), y_of(float(mad[i, h]))), 4, color, -1, cv2.LINE_AA)
    cv2.putText(img, "network depth (layer)", (W // 2 - 80, Hh - 12), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.putText(img, "mean attention distance (px)", (left, 22), font, 0.45, black, 1, cv2.LINE_AA)
    if title:
        cv2.putText(img, title, (W - right - 8 * len(title), 22), font, 0.4, black, 1, cv2.LINE_AA)
    return img


def to_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
