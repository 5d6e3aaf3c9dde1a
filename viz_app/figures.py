"""Interactive plotly figures: heat maps with patch indices on hover, a clickable patch grid,
curves. Arrays in, figures out; no Streamlit here."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from viz_app import colormaps

# Every colour reaches plotly as an explicit `rgb(...)` string from viz_app/colormaps.py: named
# plotly scales and hex colours can collide with the placeholders Streamlit's theme replaces.


def head_colors(n: int) -> list[str]:
    """n distinguishable colours for n heads: samples of viridis from purple to green-yellow."""
    lut = colormaps.get("viridis").lut
    picks = np.linspace(0, 230, max(n, 1)).round().astype(int)
    return [f"rgb({r}, {g}, {b})" for r, g, b in lut[picks].tolist()]


def _layout(fig: go.Figure, *, title: str = "", height: int = 360, square: bool = True) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        height=height,
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
    )
    if square:
        fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain", showgrid=False)
        fig.update_xaxes(constrain="domain", showgrid=False)
    return fig


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
    zmin, zmax = colormaps.value_range(values, cmap.kind, zmin, zmax)
    rr, cc = np.mgrid[0:gh, 0:gw]
    tokens = num_prefix + rr * gw + cc
    fig = go.Figure(
        go.Heatmap(
            z=values,
            zmin=zmin,
            zmax=zmax,
            colorscale=cmap.plotly_scale(),
            customdata=tokens,
            colorbar=dict(title=colorbar_title, thickness=12),
            hovertemplate="row %{y}, col %{x}<br>token %{customdata}<br>value %{z:.4g}<extra></extra>",
        )
    )
    if marked is not None:
        r, c = marked
        box = dict(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color="cyan", width=3))
        fig.update_layout(shapes=[box])
    return _layout(fig, title=title, height=height)


def clickable_view(
    view: np.ndarray, patch_size: int, *, num_prefix: int, selected: tuple[int, int] | None
) -> go.Figure:
    """The model's view with an invisible point on every patch centre: clicking one selects it."""
    H, W = view.shape[:2]
    gh, gw = H // patch_size, W // patch_size
    rr, cc = np.mgrid[0:gh, 0:gw]
    fig = go.Figure(go.Image(z=view, hoverinfo="skip"))
    fig.add_trace(
        go.Scatter(
            x=((cc + 0.5) * patch_size).ravel(),
            y=((rr + 0.5) * patch_size).ravel(),
            mode="markers",
            marker=dict(size=max(6, min(24, 360 // max(gh, gw))), color="rgba(255,255,255,0.01)", symbol="square"),
            customdata=np.stack([rr.ravel(), cc.ravel(), num_prefix + rr.ravel() * gw + cc.ravel()], axis=1),
            hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>token %{customdata[2]}<extra></extra>",
            showlegend=False,
        )
    )
    grid_line = dict(color="white", width=0.5)
    shapes = [dict(type="line", x0=0, x1=W, y0=k * patch_size, y1=k * patch_size, line=grid_line) for k in range(1, gh)]
    shapes += [
        dict(type="line", y0=0, y1=H, x0=k * patch_size, x1=k * patch_size, line=grid_line) for k in range(1, gw)
    ]
    if selected is not None:
        r, c = selected
        x0, y0 = c * patch_size, r * patch_size
        shapes.append(
            dict(type="rect", x0=x0, x1=x0 + patch_size, y0=y0, y1=y0 + patch_size, line=dict(color="cyan", width=3))
        )
    # all shapes in one assignment: add_shape re-validates every earlier shape (quadratic)
    fig.update_layout(
        shapes=shapes, height=380, margin=dict(l=0, r=0, t=0, b=0), clickmode="event+select", dragmode=False
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


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
    zmin, zmax = colormaps.value_range(values, "sequential", zmin, zmax)
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=list(range(1, H + 1)),
            y=list(range(1, L + 1)),
            zmin=zmin,
            zmax=zmax,
            colorscale=colormaps.get(colorscale).plotly_scale(),
            colorbar=dict(title=unit, thickness=12),
            hovertemplate="layer %{y}, head %{x}: %{z:.3g} " + unit + "<extra></extra>",
        )
    )
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=height, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_xaxes(title="head", dtick=1 if H <= 16 else None)
    fig.update_yaxes(title="layer", autorange="reversed", dtick=1 if L <= 16 else None)
    return fig


def curves(series: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure()
    for name, (x, y) in series.items():
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(
        title=title, xaxis_title=x_title, yaxis_title=y_title, height=320, margin=dict(l=10, r=10, t=40, b=10)
    )
    return fig


def top_classes(names: list[str], probs: list[float]) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=probs[::-1],
            y=names[::-1],
            orientation="h",
            text=[f"{p:.1%}" for p in probs[::-1]],
            textposition="auto",
            marker=dict(color="rgb(49, 104, 142)"),
        )
    )
    fig.update_layout(height=240, margin=dict(l=10, r=10, t=10, b=10), xaxis=dict(range=[0, 1], title="probability"))
    return fig


def token_norm_map(
    norms: np.ndarray, outliers: np.ndarray, *, num_prefix: int, prefix_names: tuple[str, ...]
) -> go.Figure:
    """(L+1, T) norms as layers x tokens, high-norm patch tokens marked."""
    Lp1, T = norms.shape
    labels = list(prefix_names) + [f"p{i}" for i in range(T - num_prefix)]
    fig = go.Figure(
        go.Heatmap(
            z=norms,
            x=list(range(T)),
            y=["embed"] + [f"L{i}" for i in range(1, Lp1)],
            customdata=np.broadcast_to(np.array(labels, dtype=object), norms.shape),
            colorscale=colormaps.get("viridis").plotly_scale(),
            colorbar=dict(title="norm", thickness=12),
            hovertemplate="%{y}, token %{x} (%{customdata}): %{z:.3g}<extra></extra>",
        )
    )
    ly, lx = np.nonzero(outliers)
    if len(ly):
        fig.add_trace(
            go.Scatter(
                x=lx + num_prefix,
                y=[(["embed"] + [f"L{i}" for i in range(1, Lp1)])[k] for k in ly],
                mode="markers",
                marker=dict(symbol="x", color="red", size=7),
                name="high-norm outlier",
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        height=340, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="token", legend=dict(orientation="h")
    )
    fig.update_yaxes(autorange="reversed")
    return fig


PREFIX_SHARE_MARK = 0.5  # heads whose patch queries send at least this share to prefix tokens


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
    are drawn as open circles, since there the two conventions disagree most."""
    L, H = mad.shape
    fig = go.Figure()
    high = np.zeros_like(mad, dtype=bool) if prefix_share is None else prefix_share >= PREFIX_SHARE_MARK
    for h, color in zip(range(H), head_colors(H)):
        fig.add_trace(
            go.Scatter(
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
                customdata=None if prefix_share is None else prefix_share[:, h],
                hovertemplate="layer %{x}, head "
                + str(h + 1)
                + ": %{y:.1f} px"
                + ("" if prefix_share is None else "<br>prefix share %{customdata:.2f}")
                + "<extra></extra>",
            )
        )
    label = "prefix mass counts as distance 0" if convention == "as_is" else "renormalized over patches"
    top = max(1.0, float(np.nanmax(mad)) if mad.size else 1.0) * 1.05 if ymax is None else ymax
    fig.update_layout(
        title=dict(
            text=f"{title}<br><sup>{label}"
            + (f"; open: prefix share >= {PREFIX_SHARE_MARK}" if high.any() else "")
            + "</sup>",
            font=dict(size=14),
        ),
        xaxis_title="network depth (layer)",
        yaxis_title="mean attention distance (pixels)",
        xaxis=dict(dtick=1 if L <= 24 else None),
        yaxis=dict(range=[0, top]),
        margin=dict(l=50, r=20, t=60, b=40),
        height=400,
    )
    return fig


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
    cells = np.full((R, h + gap, C, w + gap), np.nan, np.float32)  # each tile with a blank gap below/right
    cells[:, :h, :, :w] = np.asarray(tiles, np.float32).transpose(0, 2, 1, 3)
    big = cells.reshape(R * (h + gap), C * (w + gap))[:-gap, :-gap]
    row_labels = row_labels or [str(i + 1) for i in range(R)]
    col_labels = col_labels or [str(j + 1) for j in range(C)]
    cy = np.arange(R) * (h + gap) + (h - 1) / 2
    cx = np.arange(C) * (w + gap) + (w - 1) / 2
    cmap = colormaps.get(colorscale)
    fig = go.Figure(
        go.Heatmap(
            z=big,
            zmin=zmin,
            zmax=zmax,
            colorscale=cmap.plotly_scale(),
            colorbar=dict(title=colorbar_title, thickness=12),
            hoverinfo="skip",
        )
    )
    rr, cc = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    fig.add_trace(
        go.Scatter(
            x=cx[cc.ravel()],
            y=cy[rr.ravel()],
            mode="markers",
            marker=dict(size=max(8, min(40, 600 // max(R, C))), color="rgba(255,255,255,0.01)", symbol="square"),
            customdata=np.stack([rr.ravel(), cc.ravel()], axis=1),
            text=[f"{row_name} {row_labels[r]}, {col_name} {col_labels[c]}" for r, c in zip(rr.ravel(), cc.ravel())],
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        )
    )
    shapes = []
    if selected is not None:
        r, c = selected
        y0, x0 = r * (h + gap) - 0.5, c * (w + gap) - 0.5
        shapes.append(dict(type="rect", x0=x0, x1=x0 + w, y0=y0, y1=y0 + h, line=dict(color="cyan", width=2)))
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        shapes=shapes,
        # about 40-110 px per tile row, whatever the tile's own size
        height=height or int(110 + R * min(110, max(40, 700 / R))),
        margin=dict(l=10, r=10, t=90 if title else 50, b=10),
        clickmode="event+select",
        dragmode=False,
    )
    fig.update_xaxes(
        tickvals=cx, ticktext=col_labels, title=col_name, side="top", showgrid=False, zeroline=False, constrain="domain"
    )
    fig.update_yaxes(
        tickvals=cy,
        ticktext=row_labels,
        title=row_name,
        autorange="reversed",
        scaleanchor="x",
        showgrid=False,
        zeroline=False,
        constrain="domain",
    )
    return fig
