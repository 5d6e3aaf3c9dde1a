"""Interactive plotly figures: heat maps with patch indices on hover, a clickable patch grid,
curves. Arrays in, figures out; no Streamlit here."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

COLORSCALE = "Inferno"
DIVERGING = "RdBu_r"


def _layout(fig: go.Figure, *, title: str = "", height: int = 360, square: bool = True) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40 if title else 10, b=10))
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
    colorscale: str = COLORSCALE,
    colorbar_title: str = "",
    height: int = 360,
) -> go.Figure:
    """(gh, gw) map; hover shows row, column, token index and value."""
    gh, gw = values.shape
    rr, cc = np.mgrid[0:gh, 0:gw]
    tokens = num_prefix + rr * gw + cc
    fig = go.Figure(
        go.Heatmap(
            z=values,
            zmin=zmin,
            zmax=zmax,
            colorscale=colorscale,
            customdata=tokens,
            colorbar=dict(title=colorbar_title, thickness=12),
            hovertemplate="row %{y}, col %{x}<br>token %{customdata}<br>value %{z:.4g}<extra></extra>",
        )
    )
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


def layer_head_matrix(values: np.ndarray, *, title: str, unit: str, height: int = 320) -> go.Figure:
    """(L, H) per-head scalars (distance, entropy) as a heat map, layers as rows."""
    L, H = values.shape
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=[f"h{h}" for h in range(H)],
            y=[f"L{i + 1}" for i in range(L)],
            colorscale="Viridis",
            colorbar=dict(title=unit, thickness=12),
            hovertemplate="layer %{y}, head %{x}: %{z:.3g} " + unit + "<extra></extra>",
        )
    )
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_yaxes(autorange="reversed")
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
            x=probs[::-1], y=names[::-1], orientation="h", text=[f"{p:.1%}" for p in probs[::-1]], textposition="auto"
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
            colorscale="Viridis",
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


def mad_scatter_figure(mad: np.ndarray, *, title: str = "Mean attention distance", convention: str = "as_is"):
    """Paper Fig. 7 right / Fig. 11: one dot per (layer, head), depth on x, pixels on y. (L, H)."""
    L, H = mad.shape
    fig = go.Figure()
    for h in range(H):
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, L + 1),
                y=mad[:, h],
                mode="markers",
                name=f"head {h}",
                hovertemplate="layer %{x}, head " + str(h) + ": %{y:.1f} px<extra></extra>",
            )
        )
    label = "prefix mass counts as 0" if convention == "as_is" else "renormalized over patches"
    fig.update_layout(
        title=f"{title} ({label})",
        xaxis_title="network depth (layer)",
        yaxis_title="mean attention distance (pixels)",
        xaxis=dict(dtick=1),
        # distances start at 0 as in the paper's figure: a range fitted to the data would make
        # heads that differ by a pixel look specialised
        yaxis=dict(range=[0, max(1.0, float(np.nanmax(mad)) if mad.size else 1.0) * 1.05]),
        margin=dict(l=50, r=20, t=50, b=40),
        height=380,
    )
    return fig
