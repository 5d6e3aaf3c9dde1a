"""Colour maps: one table of 256 RGB colours per map, used by every picture (render.py) and every
plotly figure (figures.py), so a PNG, an overlay and an interactive chart of the same values have
the same colours, pixel for pixel.

Two kinds, and a view picks the kind from its quantity:
- sequential, for non-negative quantities (attention, rollout, distances): the lowest value is
  the darkest colour (inferno, magma, viridis, cividis: perceptually uniform, dark to light);
- diverging, for signed quantities (differences, cosine similarity): the centre of the range is
  white, negative values blue and positive red, and the range is made symmetric around 0.

Plotly figures get the table itself as `rgb(r, g, b)` stops. Named plotly scales, and hex colours
like `#000004` (the first colour of inferno), must not reach the page: Streamlit's theme uses
`#000001` to `#000040` as placeholders and replaces them in the figure's text, which had turned the
darkest colour of inferno into a light pink.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np

# ColorBrewer RdBu (11 classes), from blue (negative) through white to red (positive)
_BLUE_WHITE_RED = "053061 2166ac 4393c3 92c5de d1e5f0 f7f7f7 fddbc7 f4a582 d6604d b2182b 67001f"  # low -> high


@dataclass(frozen=True)
class Colormap:
    name: str
    kind: str  # "sequential" | "diverging"
    lut: np.ndarray  # (256, 3) uint8 RGB, index 0 = the lowest value
    reads: str  # how to read it, for captions

    def plotly_scale(self) -> list[list]:
        """The table as a plotly colorscale: every 4th entry and the last (65 stops, at k/255) in
        `rgb(r, g, b)` form. plotly interpolates linearly between stops, which stays within 1-3
        RGB units of the full table (plotly validates each stop: 256 of them cost 17 ms a
        figure); the first and last colours are exact."""
        return _plotly_scale(self.name)

    def color(self, u: float) -> tuple[int, int, int]:
        """The colour of a value already scaled to [0, 1]."""
        r, g, b = self.lut[int(np.clip(u, 0.0, 1.0) * 255 + 0.5)]
        return int(r), int(g), int(b)


@cache
def _plotly_scale(name: str) -> list[list]:
    lut = get(name).lut
    return [[k / 255, "rgb({}, {}, {})".format(*lut[k].tolist())] for k in (*range(0, 255, 4), 255)]


def _opencv(code: int) -> np.ndarray:
    ramp = np.arange(256, dtype=np.uint8)[:, None]
    return np.ascontiguousarray(cv2.applyColorMap(ramp, code)[:, 0, ::-1])  # BGR -> RGB


def _interpolated(hex_stops: str) -> np.ndarray:
    stops = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in hex_stops.split()], np.float64)
    at = np.linspace(0.0, 1.0, len(stops))
    u = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(u, at, stops[:, ch]) for ch in range(3)], axis=1).round().astype(np.uint8)


@cache
def _table() -> dict[str, Colormap]:
    dark_to_light = "0 = darkest, highest = lightest"
    maps = [
        Colormap("inferno", "sequential", _opencv(cv2.COLORMAP_INFERNO), f"{dark_to_light} (black to pale yellow)"),
        Colormap("magma", "sequential", _opencv(cv2.COLORMAP_MAGMA), f"{dark_to_light} (black to pale pink)"),
        Colormap("viridis", "sequential", _opencv(cv2.COLORMAP_VIRIDIS), f"{dark_to_light} (purple to yellow)"),
        Colormap("cividis", "sequential", _opencv(cv2.COLORMAP_CIVIDIS), f"{dark_to_light} (blue to yellow)"),
        Colormap("blue-white-red", "diverging", _interpolated(_BLUE_WHITE_RED), "negative blue, 0 white, positive red"),
    ]
    for m in maps:
        m.lut.setflags(write=False)
    return {m.name: m for m in maps}


SEQUENTIAL = ("inferno", "magma", "viridis", "cividis")
DIVERGING = ("blue-white-red",)
DEFAULT_SEQUENTIAL = "inferno"
DEFAULT_DIVERGING = "blue-white-red"


def get(name: str) -> Colormap:
    table = _table()
    if name not in table:
        raise ValueError(f"unknown colour map {name!r}; choose from {', '.join(table)}")
    return table[name]


def names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in _table().items() if kind is None or m.kind == kind)


def value_range(values: np.ndarray, kind: str, vmin: float | None = None, vmax: float | None = None):
    """The (vmin, vmax) a map is drawn with: given bounds win; otherwise sequential maps run from
    0 (or the data minimum when it is negative) to the data maximum, diverging maps from -m to m
    with m the largest absolute value, so that 0 is white."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if kind == "diverging":
        m = float(np.abs(finite).max()) if finite.size else 1.0
        m = m if m > 0 else 1.0
        return (-m if vmin is None else vmin), (m if vmax is None else vmax)
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    return lo, (hi if hi > lo else lo + 1.0)
