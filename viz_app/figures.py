"""Interactive plotly figures: heat maps with patch indices on hover, clickable grids, curves.
Arrays in, figures out; no Streamlit here.

Figures are written as plotly's JSON spec (dicts) and wrapped without plotly's property-by-property
validation, which cost 5-20 ms a figure (a page redraws up to seven); tests/test_render.py
validates the output of every function here in full instead.

Every colour reaches plotly as an explicit `rgb(...)` string from viz_app/colormaps.py: named
plotly scales and hex colours can collide with the placeholders Streamlit's theme replaces.

NaN and infinite values (a broken checkpoint): plotly's JSON writer turns a NaN or infinite
number in a list or a layout field into null, so a colour range or an axis range would silently
lose its bound; in a binary-encoded array they stay IEEE values, which plotly.js skips. So every
array passes through _values (non-finite -> NaN: a blank heat-map cell, a missing point) and every
range is computed from the finite values only (_range, _top): no figure carries a non-finite
bound.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
import plotly.graph_objects as go

from viz_app import colormaps

CYAN = "rgb(0, 255, 255)"
BLUE = "rgb(49, 104, 142)"
SELECTED = "rgb(255, 75, 75)"  # the frame of a selected tile (cyan outlines masks)
PREFIX_SHARE_MARK = 0.5  # heads whose patch queries send at least this share to prefix tokens


def _figure(data: list[dict], layout: dict) -> go.Figure:
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def _title(text: str) -> dict:
    return dict(text=text, font=dict(size=14))


def _colorbar(title: str) -> dict:
    return dict(title=dict(text=title), thickness=12)


def _values(values) -> np.ndarray:
    """float64 copy with every NaN or infinite value as NaN: blank in a heat map, no point in a
    scatter."""
    v = np.array(values, dtype=np.float64)
    v[~np.isfinite(v)] = np.nan
    return v


def _range(values, kind: str, zmin: float | None, zmax: float | None) -> tuple[float, float]:
    """colormaps.value_range with a NaN or infinite bound counted as not given: always finite."""
    zmin = zmin if zmin is not None and np.isfinite(zmin) else None
    zmax = zmax if zmax is not None and np.isfinite(zmax) else None
    lo, hi = colormaps.value_range(values, kind, zmin, zmax)
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def _blank(values, layout: dict, x_range: list[float], y_range: list[float]) -> dict:
    """A heat map without one finite value: plotly.js would drop the trace and shrink its axes to
    whatever else is drawn, so the axes get the cells' extents and the plot says why it is empty."""
    if np.isfinite(np.asarray(values, dtype=np.float64)).any():
        return layout
    xaxis = {**layout.get("xaxis", {}), "range": x_range, "autorange": False}
    yaxis = {**layout.get("yaxis", {}), "range": y_range, "autorange": False}
    note = dict(text="no value (NaN or infinite)", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return {**layout, "xaxis": xaxis, "yaxis": yaxis, "annotations": [*layout.get("annotations", ()), note]}


def _top(values, floor: float = 1.0) -> float:
    """The largest finite value, at least `floor` (the top of an axis that starts at 0)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return max(floor, float(finite.max())) if finite.size else floor


def head_colors(n: int) -> list[str]:
    """n distinguishable colours for n heads: samples of viridis from purple to green-yellow."""
    lut = colormaps.get("viridis").lut
    picks = np.linspace(0, 230, max(n, 1)).round().astype(int)
    return [f"rgb({r}, {g}, {b})" for r, g, b in lut[picks].tolist()]


def _square_axes() -> dict:
    return dict(
        yaxis=dict(autorange="reversed", scaleanchor="x", constrain="domain", showgrid=False),
        xaxis=dict(constrain="domain", showgrid=False),
    )


def patch_heatmap(
    values: np.ndarray,
    *,
    num_prefix: int,
    title: str = "",
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str = colormaps.DEFAULT_SEQUENTIAL,
    colorbar_title: str = "",
    height: int = 360,
    marked: tuple[int, int] | None = None,
) -> go.Figure:
    """(gh, gw) map; hover shows row, column, token index and value. colorscale: a name from
    viz_app/colormaps.py; the range is colormaps.value_range's unless zmin/zmax are given.
    marked: a patch (row, col) outlined (the query)."""
    gh, gw = values.shape
    cmap = colormaps.get(colorscale)
    zmin, zmax = _range(values, cmap.kind, zmin, zmax)
    rr, cc = np.mgrid[0:gh, 0:gw]
    trace = dict(
        type="heatmap",
        z=_values(values),
        zmin=zmin,
        zmax=zmax,
        colorscale=cmap.plotly_scale(),
        customdata=num_prefix + rr * gw + cc,
        colorbar=_colorbar(colorbar_title),
        hovertemplate="row %{y}, col %{x}<br>token %{customdata}<br>value %{z:.4g}<extra></extra>",
    )
    shapes = []
    if marked is not None:
        r, c = marked
        shapes.append(dict(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color=CYAN, width=3)))
    layout = dict(
        title=_title(title),
        height=height,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
        shapes=shapes,
        **_square_axes(),
    )
    return _figure([trace], _blank(values, layout, [-0.5, gw - 0.5], [gh - 0.5, -0.5]))


def clickable_view(
    view: np.ndarray, patch_size: int, *, num_prefix: int, selected: tuple[int, int] | None
) -> go.Figure:
    """The model's view with an invisible point on every patch centre: clicking one selects it."""
    H, W = view.shape[:2]
    gh, gw = H // patch_size, W // patch_size
    rr, cc = np.mgrid[0:gh, 0:gw]
    # pixel i spans [i, i + 1] (x0 = y0 = 0.5: plotly centres pixel i on x0 + i), so patch c spans
    # [c * p, (c + 1) * p] like the grid lines, the click points and every box drawn over it
    image = dict(type="image", z=np.asarray(view), x0=0.5, y0=0.5, hoverinfo="skip")
    points = dict(
        type="scatter",
        x=((cc + 0.5) * patch_size).ravel(),
        y=((rr + 0.5) * patch_size).ravel(),
        mode="markers",
        marker=dict(size=max(6, min(24, 360 // max(gh, gw))), color="rgba(255,255,255,0.01)", symbol="square"),
        customdata=np.stack([rr.ravel(), cc.ravel(), num_prefix + rr.ravel() * gw + cc.ravel()], axis=1),
        hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>token %{customdata[2]}<extra></extra>",
        showlegend=False,
    )
    line = dict(color="white", width=0.5)
    shapes = [dict(type="line", x0=0, x1=W, y0=k * patch_size, y1=k * patch_size, line=line) for k in range(1, gh)]
    shapes += [dict(type="line", y0=0, y1=H, x0=k * patch_size, x1=k * patch_size, line=line) for k in range(1, gw)]
    if selected is not None:
        r, c = selected
        x0, y0 = c * patch_size, r * patch_size
        shapes.append(
            dict(type="rect", x0=x0, x1=x0 + patch_size, y0=y0, y1=y0 + patch_size, line=dict(color=CYAN, width=3))
        )
    step = max(1, -(-max(gh, gw) // 16))  # at most about 16 numbers a side
    ticks = dict(showgrid=False, zeroline=False, ticks="", tickfont=dict(size=11))
    layout = dict(
        shapes=shapes,
        height=380,
        margin=dict(l=28, r=0, t=24, b=0),
        clickmode="event+select",
        dragmode=False,
        # rows and columns numbered from 0 at the patch centres, as on the Overview's grid
        xaxis=dict(
            tickvals=[(c + 0.5) * patch_size for c in range(0, gw, step)],
            ticktext=[str(c) for c in range(0, gw, step)],
            side="top",
            **ticks,
        ),
        yaxis=dict(
            tickvals=[(r + 0.5) * patch_size for r in range(0, gh, step)],
            ticktext=[str(r) for r in range(0, gh, step)],
            **ticks,
        ),
    )
    return _figure([image, points], layout)


def layer_head_matrix(
    values: np.ndarray,
    *,
    title: str,
    unit: str,
    height: int = 300,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str = "viridis",
) -> go.Figure:
    """(L, H) per-head scalars (distance, entropy, shares) as a heat map: layers as rows, heads as
    columns, both counted from 1."""
    L, H = values.shape
    zmin, zmax = _range(values, "sequential", zmin, zmax)
    trace = dict(
        type="heatmap",
        z=_values(values),
        x=list(range(1, H + 1)),
        y=list(range(1, L + 1)),
        zmin=zmin,
        zmax=zmax,
        colorscale=colormaps.get(colorscale).plotly_scale(),
        colorbar=_colorbar(unit),
        hovertemplate="layer %{y}, head %{x}: %{z:.3g} " + unit + "<extra></extra>",
    )
    layout = dict(
        title=_title(title),
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(title=dict(text="head"), dtick=1 if H <= 16 else None),
        yaxis=dict(title=dict(text="layer"), autorange="reversed", dtick=1 if L <= 16 else None),
    )
    return _figure([trace], _blank(values, layout, [0.5, H + 0.5], [L + 0.5, 0.5]))


def curves(series: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str, x_title: str, y_title: str) -> go.Figure:
    data = [
        dict(type="scatter", x=_values(x), y=_values(y), mode="lines+markers", name=name, line=dict(color=c))
        for (name, (x, y)), c in zip(series.items(), (BLUE, "rgb(230, 97, 1)", "rgb(94, 60, 153)", "rgb(27, 158, 119)"))
    ]
    layout = dict(
        title=_title(title),
        xaxis=dict(title=dict(text=x_title)),
        yaxis=dict(title=dict(text=y_title)),
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return _figure(data, layout)


def top_classes(names: list[str], probs: list[float]) -> go.Figure:
    """Horizontal bars of the top classes' probabilities; a NaN or infinite one has no bar and
    reads 'no value'."""
    p = _values(probs[::-1])
    bar = dict(
        type="bar",
        x=p,
        y=list(names[::-1]),
        orientation="h",
        text=[f"{v:.1%}" if np.isfinite(v) else "no value" for v in p],
        textposition="auto",
        marker=dict(color=BLUE),
    )
    layout = dict(
        height=240, margin=dict(l=10, r=10, t=10, b=10), xaxis=dict(range=[0, 1], title=dict(text="probability"))
    )
    return _figure([bar], layout)


def token_norm_map(
    norms: np.ndarray, outliers: np.ndarray, *, num_prefix: int, prefix_names: tuple[str, ...]
) -> go.Figure:
    """(L+1, T) norms as layers x tokens, high-norm patch tokens marked."""
    Lp1, T = norms.shape
    labels = list(prefix_names) + [f"p{i}" for i in range(T - num_prefix)]
    rows = ["embed"] + [f"L{i}" for i in range(1, Lp1)]
    data = [
        dict(
            type="heatmap",
            z=_values(norms),
            x=list(range(T)),
            y=rows,
            customdata=[labels] * Lp1,
            colorscale=colormaps.get("viridis").plotly_scale(),
            colorbar=_colorbar("norm"),
            hovertemplate="%{y}, token %{x} (%{customdata}): %{z:.3g}<extra></extra>",
        )
    ]
    ly, lx = np.nonzero(outliers)
    if len(ly):
        data.append(
            dict(
                type="scatter",
                x=lx + num_prefix,
                y=[rows[k] for k in ly],
                mode="markers",
                marker=dict(symbol="x", color="red", size=7),
                name="high-norm outlier",
                hoverinfo="skip",
            )
        )
    layout = dict(
        height=340,
        margin=dict(l=10, r=10, t=10, b=10),
        xaxis=dict(title=dict(text="token")),
        yaxis=dict(autorange="reversed"),
        legend=dict(orientation="h"),
    )
    return _figure(data, _blank(norms, layout, [-0.5, T - 0.5], [Lp1 - 0.5, -0.5]))


def mad_scatter_figure(
    mad: np.ndarray,
    *,
    title: str = "Mean attention distance",
    convention: str = "as_is",
    prefix_share: np.ndarray | None = None,
    ymax: float | None = None,
) -> go.Figure:
    """Paper Fig. 7 right / Fig. 11: one dot per (layer, head), depth on x, pixels on y. (L, H).

    The y axis starts at 0 (as in the paper): a range fitted to the data would make heads that
    differ by a pixel look specialised. prefix_share (L, H): heads at or above PREFIX_SHARE_MARK
    are drawn as open circles, since there the two conventions disagree most. Heads whose
    distance is NaN or infinite have no dot (the subtitle counts them); the y range comes from
    the finite values (a NaN or infinite ymax counts as not given)."""
    L, H = mad.shape
    mad = _values(mad)
    share = None if prefix_share is None else _values(prefix_share)
    high = np.zeros_like(mad, dtype=bool) if share is None else np.nan_to_num(share, nan=-1.0) >= PREFIX_SHARE_MARK
    data = []
    for h, color in zip(range(H), head_colors(H)):
        trace = dict(
            type="scatter",
            x=np.arange(1, L + 1),
            y=mad[:, h],
            mode="markers",
            marker=dict(
                color=color,
                size=8,
                symbol=["circle-open" if v else "circle" for v in high[:, h]],
                line=dict(width=2, color=color),
            ),
            name=f"head {h + 1}",
            hovertemplate=f"layer %{{x}}, head {h + 1}: %{{y:.1f}} px"
            + ("" if prefix_share is None else "<br>prefix share %{customdata:.2f}")
            + "<extra></extra>",
        )
        if share is not None:
            trace["customdata"] = share[:, h]
        data.append(trace)
    label = "prefix mass counts as distance 0" if convention == "as_is" else "renormalized over patches"
    top = ymax if ymax is not None and np.isfinite(ymax) and ymax > 0 else _top(mad) * 1.05
    note = f"; open: prefix share >= {PREFIX_SHARE_MARK}" if high.any() else ""
    missing = int(np.isnan(mad).sum())
    if missing:
        note += f"; no value (NaN or infinite) for {missing} of {L * H} heads"
    layout = dict(
        title=_title(f"{title}<br><sup>{label}{note}</sup>"),
        xaxis=dict(title=dict(text="network depth (layer)"), dtick=1 if L <= 24 else None),
        yaxis=dict(title=dict(text="mean attention distance (pixels)"), range=[0, top]),
        margin=dict(l=50, r=20, t=60, b=40),
        height=400,
    )
    return _figure(data, layout)


def tile_figure(
    tiles: np.ndarray,
    *,
    row_name: str,
    col_name: str,
    colorbar_title: str,
    title: str = "",
    zmin: float = 0.0,
    zmax: float = 1.0,
    colorscale: str = colormaps.DEFAULT_SEQUENTIAL,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    selected: tuple[int, int] | None = None,
    height: int | None = None,
) -> go.Figure:
    """(R, C, h, w) small maps as one labelled grid with a colour bar; a transparent marker on
    every tile's centre makes the tile clickable (the selection's customdata is [row, col]).

    Rows and columns are labelled with row_labels / col_labels (default: 1..R, 1..C)."""
    R, C, h, w = tiles.shape
    gap = 1
    zmin, zmax = _range(tiles, colormaps.get(colorscale).kind, zmin, zmax)
    cells = np.full((R, h + gap, C, w + gap), np.nan, np.float32)  # each tile with a blank gap below/right
    cells[:, :h, :, :w] = _values(tiles).astype(np.float32).transpose(0, 2, 1, 3)  # no value: blank too
    big = cells.reshape(R * (h + gap), C * (w + gap))[:-gap, :-gap]
    row_labels = row_labels or [str(i + 1) for i in range(R)]
    col_labels = col_labels or [str(j + 1) for j in range(C)]
    cy = np.arange(R) * (h + gap) + (h - 1) / 2
    cx = np.arange(C) * (w + gap) + (w - 1) / 2
    rr, cc = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    heat = dict(
        type="heatmap",
        z=big,
        zmin=zmin,
        zmax=zmax,
        colorscale=colormaps.get(colorscale).plotly_scale(),
        colorbar=_colorbar(colorbar_title),
        hoverinfo="skip",
    )
    points = dict(
        type="scatter",
        x=cx[cc.ravel()],
        y=cy[rr.ravel()],
        mode="markers",
        marker=dict(size=max(8, min(40, 600 // max(R, C))), color="rgba(255,255,255,0.01)", symbol="square"),
        customdata=np.stack([rr.ravel(), cc.ravel()], axis=1),
        text=[f"{row_name} {row_labels[r]}, {col_name} {col_labels[c]}" for r, c in zip(rr.ravel(), cc.ravel())],
        hovertemplate="%{text}<extra></extra>",
        showlegend=False,
    )
    shapes = []
    if selected is not None:
        r, c = selected
        y0, x0 = r * (h + gap) - 0.5, c * (w + gap) - 0.5
        shapes.append(dict(type="rect", x0=x0, x1=x0 + w, y0=y0, y1=y0 + h, line=dict(color=CYAN, width=2)))
    axis = dict(showgrid=False, zeroline=False, constrain="domain")
    layout = dict(
        title=_title(title),
        shapes=shapes,
        # about 40-110 px per tile row, whatever the tile's own size
        height=height or int(110 + R * min(110, max(40, 700 / R))),
        margin=dict(l=10, r=10, t=90 if title else 50, b=10),
        clickmode="event+select",
        dragmode=False,
        xaxis=dict(tickvals=cx, ticktext=col_labels, title=dict(text=col_name), side="top", **axis),
        yaxis=dict(
            tickvals=cy, ticktext=row_labels, title=dict(text=row_name), autorange="reversed", scaleanchor="x", **axis
        ),
    )
    extent_x, extent_y = [-0.5, C * (w + gap) - gap - 0.5], [R * (h + gap) - gap - 0.5, -0.5]
    return _figure([heat, points], _blank(tiles, layout, extent_x, extent_y))


def picture_source(image: np.ndarray) -> str:
    """An RGB picture as a data URI for an image trace's `source`: JPEG at quality 95 without
    chroma subsampling (4:4:4), as Streamlit sends its own pictures. A twelve-head grid of 224 px
    overlays is about 200 kB this way (PNG: 1 MB, which the page would carry on every rerun) and
    encodes in 6 ms; colours stay within a few levels of the drawing (the downloads are PNG)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), params)
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def clickable_tiles(
    picture: np.ndarray | tuple[str, tuple[int, int]],
    boxes: list[tuple[int, int, int, int]],
    *,
    hover: list[str],
    selected: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """A picture of tiles (render.tile_mosaic, with anything beside it such as a colour bar) with
    an invisible marker on each tile's centre: clicking a tile selects it (the selection's point
    index is the tile's index, as figures.tile_figure's second trace). The selected tile is framed
    in red (cyan outlines the masks). picture: the RGB array, or (its picture_source, (H, W)) made
    once and kept."""
    source, (H, W) = (picture_source(picture), picture.shape[:2]) if isinstance(picture, np.ndarray) else picture
    image = dict(type="image", source=source, x0=0, y0=0, dx=1, dy=1, hoverinfo="skip")
    cx = [(x0 + x1) / 2 for x0, _, x1, _ in boxes]
    cy = [(y0 + y1) / 2 for _, y0, _, y1 in boxes]
    side = min(x1 - x0 for x0, _, x1, _ in boxes)
    points = dict(
        type="scatter",
        x=cx,
        y=cy,
        mode="markers",
        marker=dict(size=max(12, min(60, side // 3)), color="rgba(255,255,255,0.01)", symbol="square"),
        text=hover,
        hovertemplate="%{text}<extra></extra>",
        showlegend=False,
    )
    shapes = []
    if selected is not None and 0 <= selected < len(boxes):
        x0, y0, x1, y1 = boxes[selected]
        shapes.append(dict(type="rect", x0=x0 - 3, x1=x1 + 3, y0=y0 - 3, y1=y1 + 3, line=dict(color=SELECTED, width=3)))
    axis = dict(showgrid=False, zeroline=False, showticklabels=False, ticks="", constrain="domain")
    layout = dict(
        shapes=shapes,
        height=height or int(min(900, max(260, 700 * H / max(W, 1)))),
        margin=dict(l=0, r=0, t=0, b=0),
        clickmode="event+select",
        dragmode=False,
        xaxis=dict(range=[0, W], **axis),
        yaxis=dict(range=[H, 0], scaleanchor="x", **axis),
    )
    return _figure([image, points], layout)


def animation(
    pictures: list[np.ndarray] | tuple[list[str], tuple[int, int]], labels: list[str], *, fps: float, slider_name: str
) -> go.Figure:
    """Equal-size RGB pictures as a plotly animation: a play and a pause button and a slider that
    moves on its own while playing (and can be dragged), one step per picture, `fps` pictures a
    second. pictures: the RGB arrays, or (their picture_source, (H, W)) made once and kept."""
    if isinstance(pictures, tuple):
        sources, (H, W) = pictures
    else:
        sources, (H, W) = [picture_source(p) for p in pictures], pictures[0].shape[:2] if pictures else (0, 0)
    if not sources:
        raise ValueError("an animation needs at least one picture")
    trace = lambda src: dict(type="image", source=src, x0=0, y0=0, dx=1, dy=1, hoverinfo="skip")  # noqa: E731
    frames = [dict(name=label, data=[trace(src)]) for label, src in zip(labels, sources)]
    ms = int(round(1000 / fps))
    play = dict(frame=dict(duration=ms, redraw=True), transition=dict(duration=0), fromcurrent=True, mode="immediate")
    pause = dict(frame=dict(duration=0, redraw=False), transition=dict(duration=0), mode="immediate")
    axis = dict(showgrid=False, zeroline=False, showticklabels=False, ticks="", constrain="domain")
    layout = dict(
        height=int(min(760, max(300, 640 * H / max(W, 1)))) + 90,
        margin=dict(l=0, r=0, t=10, b=10),
        dragmode=False,
        xaxis=dict(range=[0, W], **axis),
        yaxis=dict(range=[H, 0], scaleanchor="x", **axis),
        updatemenus=[
            dict(
                type="buttons",
                direction="left",
                x=0.0,
                y=0.0,
                xanchor="left",
                yanchor="top",
                pad=dict(t=10, r=10),
                showactive=False,
                buttons=[
                    dict(label="Play", method="animate", args=[None, play]),
                    dict(label="Pause", method="animate", args=[[None], pause]),
                ],
            )
        ],
        sliders=[
            dict(
                active=0,
                x=0.15,
                len=0.85,
                y=0.0,
                yanchor="top",
                pad=dict(t=10),
                currentvalue=dict(prefix=f"{slider_name}: "),
                steps=[
                    dict(
                        label=label,
                        method="animate",
                        args=[[label], dict(frame=dict(duration=0, redraw=True), mode="immediate")],
                    )
                    for label in labels
                ],
            )
        ],
    )
    return go.Figure(dict(data=[trace(sources[0])], layout=layout, frames=frames), _validate=False)
