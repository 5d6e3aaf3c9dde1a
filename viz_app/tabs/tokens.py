"""Tokens: per layer x head, the share of attention on each prefix token (class, distillation,
registers) and on the high-norm patch tokens (Darcet et al., "Vision Transformers Need Registers",
ICLR 2024), how many patches are high-norm in each layer, and where they lie on the image.

Layers and heads are counted from 1 on this tab; patch rows and columns from 0.
"""

from __future__ import annotations

import cv2
import numpy as np
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import figures, render
from viz_app.analysis.tokens import QUERIES
from viz_app.tabs import state
from viz_app.tabs.common import Ctx

FACTOR_RANGE = (1.0, 10.0)  # the high-norm factor's slider
QUERY_LABELS = {"patches": "patch queries", "readout": "the read-out token", "all": "all queries"}
PANELS_PER_ROW = 3  # budget heat maps side by side (page and PNG)
MARK = (0, 255, 255)  # outline of a high-norm patch on the image
MIN_VIEW = 336  # px: small inputs are enlarged (nearest) to at least this on the page
PICTURE_WIDTH = 1400  # px: the PNG's heat maps side by side (publication_figure adds the colour bar)
QUERY_SHORT = {"patches": "patch queries", "readout": "read-out token", "all": "all queries"}


def settings() -> tuple[float, str]:
    """(factor, queries) as the tab has them now (defaults where never set, clamped when out of range)."""
    try:
        factor = float(state.read("tk_factor"))
    except (TypeError, ValueError):
        factor = float(state.DEFAULTS["tk_factor"])
    if not np.isfinite(factor):
        factor = float(state.DEFAULTS["tk_factor"])
    factor = min(max(factor, FACTOR_RANGE[0]), FACTOR_RANGE[1])
    queries = state.read("tk_queries", "patches")
    return factor, queries if queries in QUERIES else "patches"


def compute(ctx: Ctx, factor: float, queries: str) -> tuple[np.ndarray, np.ndarray]:
    """(token budgets (L, H, P+1) float32, high-norm patches (L+1, N) bool: row 0 after the embedding,
    row l after block l, so row l - 1 is layer l's input) for this image."""
    c = ctx.lm.config
    norms = torch.from_numpy(np.asarray(ctx.result.token_norms, np.float32))
    budget = A.token_budgets(
        ctx.result.attentions,
        norms,
        num_prefix=c.num_prefix_tokens,
        factor=factor,
        queries=queries,
        readout_tokens=c.readout_tokens,
    )
    high = A.token_norm_outliers(norms, num_prefix=c.num_prefix_tokens, factor=factor)
    return budget.numpy(), high.numpy()


def panel_title(name: str, prefix: bool) -> str:
    return f"Attention on the {name} token" if prefix else f"Attention on {name}"


def what(ctx: Ctx, factor: float, queries: str) -> str:
    """The sentence saying which queries are averaged and what counts as high-norm."""
    c = ctx.lm.config
    who = QUERY_LABELS[queries]
    if queries == "readout":
        tokens = [c.prefix_names[t] for t in c.readout_tokens]
        who = (
            f"the read-out token ({' and '.join(tokens)})" if tokens else "the read-out (the mean of the patch queries)"
        )
    return f"queries: {who}; high-norm patch: norm above {factor:g} x the median patch-token norm of the layer's input"


def mark_patches(view: np.ndarray, high: np.ndarray, patch_size: int) -> np.ndarray:
    """The model's view with the other patches dimmed and each high-norm patch (high (gh, gw) bool)
    outlined, enlarged (nearest) to at least MIN_VIEW px."""
    img = np.asarray(view, np.uint8).copy()
    if high.any():  # with none, the view as it is
        dim = np.repeat(np.repeat(~high, patch_size, axis=0), patch_size, axis=1)
        img[dim] = (img[dim] * 0.45).astype(np.uint8)
    img, k = render.enlarge(img, MIN_VIEW)
    p = patch_size * k
    for r, col in zip(*np.nonzero(high)):
        cv2.rectangle(img, (int(col) * p, int(r) * p), ((int(col) + 1) * p - 1, (int(r) + 1) * p - 1), MARK, 2)
    return img


def _text_size(text: str, fs: float, thick: int = 1) -> tuple[int, int]:
    return cv2.getTextSize(text, render.FONT, fs, thick)[0]


def budget_panel(values: np.ndarray, title: str, width: int) -> np.ndarray:
    """One (L, H) heat map as an RGB picture about `width` px wide: a title, the heads numbered
    from 1 along the top under 'head', the layers down the left under 'layer', one square cell per
    value on the 0..1 viridis scale (NaN hatched grey)."""
    L, H = values.shape
    fs = max(0.5, width / 900)  # the numbers grow with the panel
    num_w, num_h = _text_size(str(max(L, H)), fs)
    name_h = _text_size("layer", fs)[1]
    left = name_h + 12 + num_w + 8  # the rotated axis name, then the row numbers
    cell = max(4, (width - left - 1) // H - 1)
    grid = render.tile_grid(values[:, :, None, None], vmin=0.0, vmax=1.0, cmap="viridis", scale=cell, gap=1)
    title_fs = min(1.5 * fs, 0.9, (left + grid.shape[1] - 8) / _text_size(title, 1.0, 2)[0])
    title_h = _text_size(title, title_fs, 2)[1] + 14
    top = title_h + name_h + num_h + 20
    out = np.full((top + grid.shape[0], left + grid.shape[1], 3), 255, np.uint8)
    out[top:, left:] = grid
    render.put_text(out, title, (4, title_h - 8), title_fs, thick=2)
    render.put_text(out, "head", (left, title_h + name_h + 4), fs)
    step = max(1, int(np.ceil((num_w + 6) / (cell + 1))))  # every step-th number, so that none touch
    for h in range(0, H, step):
        w = _text_size(str(h + 1), fs)[0]
        render.put_text(out, str(h + 1), (left + 1 + h * (cell + 1) + (cell - w) // 2, top - 6), fs)
    step = max(1, int(np.ceil((num_h + 6) / (cell + 1))))
    for layer in range(0, L, step):
        w = _text_size(str(layer + 1), fs)[0]
        y = top + 1 + layer * (cell + 1) + (cell + num_h) // 2
        render.put_text(out, str(layer + 1), (left - 6 - w, y), fs)
    tw, th = _text_size("layer", fs)
    strip = np.full((th + 8, tw + 4, 3), 255, np.uint8)
    render.put_text(strip, "layer", (2, th + 2), fs)
    strip = np.rot90(strip)
    y0 = top + max(0, (grid.shape[0] - strip.shape[0]) // 2)
    out[y0 : y0 + strip.shape[0], 2 : 2 + strip.shape[1]] = strip[: out.shape[0] - y0]
    return out


def budget_picture(budget: np.ndarray, names: list[str], prefix: int) -> np.ndarray:
    """The L x H heat maps of every column of budget (L, H, P+1), PANELS_PER_ROW a row, each titled
    and with its axes named and numbered from 1, on one 0..1 viridis scale (RGB, white background),
    about PICTURE_WIDTH px wide."""
    n = budget.shape[-1]
    cols = min(n, PANELS_PER_ROW)
    gap = 32
    width = min(1100, (PICTURE_WIDTH - (cols - 1) * gap) // cols)  # one panel: just over publication size
    panels = [budget_panel(budget[..., j], panel_title(names[j], j < prefix), width) for j in range(n)]
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    rows = []
    for start in range(0, n, cols):
        row = np.full((h, cols * (w + gap) - gap, 3), 255, np.uint8)
        for k, p in enumerate(panels[start : start + cols]):
            row[: p.shape[0], k * (w + gap) : k * (w + gap) + p.shape[1]] = p
        rows.append(row)
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    out = [rows[0]]
    for r in rows[1:]:
        out += [spacer, r]
    return np.concatenate(out)


def downloads(ctx: Ctx) -> dict[str, tuple[str, bytes]]:
    """file name -> (button label, PNG) of the budget heat maps with the tab's current settings."""
    c = ctx.lm.config
    factor, queries = settings()
    budget, _ = compute(ctx, factor, queries)
    picture = budget_picture(budget, A.budget_names(c), c.num_prefix_tokens)
    who = QUERY_SHORT[queries] if queries != "readout" or c.readout_tokens else "read-out: patch mean"
    title = f"Token budgets ({who}; high-norm: > {factor:g}x the median patch norm)"
    fig, _ = render.publication_figure(
        picture, title=title, cmap="viridis", vmin=0.0, vmax=1.0, label="share of attention"
    )
    return {"token_budgets.png": ("Token budgets", render.to_png(fig))}


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    P, L = c.num_prefix_tokens, c.depth
    gh, gw = c.grid
    st.markdown(
        "**Token budgets**: for each layer and head, the share of attention that goes to each prefix token "
        '(class, distillation, registers) and to the *high-norm* patch tokens. Darcet et al. ("Vision '
        'Transformers Need Registers", ICLR 2024) found that large ViTs turn a few low-information background '
        "patches into high-norm tokens that collect much of the attention (the artifacts in attention maps); "
        "register tokens take that role instead. Here a patch is high-norm when its norm exceeds the factor "
        "below times the median patch-token norm of the layer's input."
    )
    a, b = st.columns(2)
    with a:
        factor = state.slider(
            "High-norm factor",
            *FACTOR_RANGE,
            float(state.DEFAULTS["tk_factor"]),
            key="tk_factor",
            step=0.1,
            help="a patch token is high-norm when its norm is above this times the layer's median patch norm",
        )
    queries = state.radio(
        "Queries",
        list(QUERIES),
        "patches",
        key="tk_queries",
        container=b,
        format_func=lambda q: QUERY_LABELS[q],
        horizontal=True,
        help="whose attention is averaged: the patch queries (as the Distance tab's prefix share), "
        "the read-out token, or every token",
    )
    budget, high = compute(ctx, float(factor), queries)
    names = A.budget_names(c)
    st.caption(
        f"One heat map per token ({what(ctx, float(factor), queries)}): the mean share of each head's attention "
        "on that token, 0 to 1 on one colour scale. In the high-norm map, layer l's row is the share on the patches "
        "that are high-norm in layer l's input (the embedding's output for layer 1), summed over those patches."
        + (" This model has no prefix tokens: only the high-norm column." if P == 0 else "")
    )
    cols = st.columns(min(len(names), PANELS_PER_ROW))
    for j, name in enumerate(names):
        fig = figures.layer_head_matrix(
            budget[..., j], title=panel_title(name, j < P), unit="share", zmin=0.0, zmax=1.0, height=300
        )
        cols[j % len(cols)].plotly_chart(fig, key=f"tk_budget_{j}")
    counts = high.sum(axis=-1)  # (L+1,)
    undefined = np.isnan(np.asarray(ctx.result.token_norms, np.float64)[:, P:]).any(axis=-1)
    shown = np.where(undefined[:L], np.nan, counts[:L].astype(np.float64))
    st.plotly_chart(
        figures.curves(
            {"high-norm patches": (np.arange(1, L + 1), shown)},
            title="High-norm patches in each layer's input",
            x_title="layer",
            y_title=f"patches (of {gh * gw})",
        ),
        key="tk_counts",
    )
    last = "no value" if undefined[L] else f"{int(counts[L])} of {gh * gw}"
    st.caption(f"After the last layer: {last} patches are high-norm.")
    filled = np.where(np.isfinite(shown), shown, -1.0)
    busiest = L - int(np.argmax(filled[::-1])) if filled.max() > 0 else L  # the last layer with the most, default
    layer = state.slider("Layer (its input)", 1, L, busiest, key="tk_layer") if L > 1 else 1  # a slider needs 2
    norms = np.asarray(ctx.result.token_norms, np.float64)[layer - 1, P:].reshape(gh, gw)
    mask = high[layer - 1].reshape(gh, gw)
    left, right = st.columns(2)
    fig = figures.patch_heatmap(
        norms, num_prefix=P, title=f"Patch-token norms, input of layer {layer}", colorbar_title="norm"
    )
    for r, col in zip(*np.nonzero(mask)):
        fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=r - 0.5, y1=r + 0.5, line=dict(color="red", width=2))
    left.plotly_chart(fig, key="tk_norms")
    right.image(
        mark_patches(ctx.result.prepared.view, mask, c.patch_size),
        caption=f"Input of layer {layer}: {int(mask.sum())} high-norm patches outlined (the others dimmed)"
        if mask.any()
        else f"Input of layer {layer}: no high-norm patch",
        width="stretch",
    )
