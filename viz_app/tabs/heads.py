"""Heads: every layer x head map for one query (the read-out token or a clicked patch), one head
large, the reverse view, and per-head distance, prefix share and entropy.

Layers and heads are counted from 1 on this tab; patch rows and columns from 0.
"""

from __future__ import annotations

import math

import numpy as np
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import figures, render
from viz_app.tabs import state
from viz_app.tabs.common import (
    NO_TOOLBAR,
    Ctx,
    chart_key,
    clicked_points,
    clicked_tile,
    display_settings,
    mask_controls,
    next_chart,
    overlay,
    result_slot,
    target_mask,
)

MIN_TILE = 160  # px: per-head overlays of small inputs are enlarged (nearest) to at least this


def on_patch_click(patch_size: int, grid: tuple[int, int]) -> None:
    """Callback of the patch picker: the clicked patch becomes the query."""
    points = clicked_points(chart_key("hd_click"))
    next_chart("hd_click")
    if not points:
        return
    try:
        row, col, _ = render.patch_at(
            float(points[0]["x"]), float(points[0]["y"]), patch_size=patch_size, grid=grid, num_prefix=0
        )
    except ValueError:
        return  # a click on the margin
    st.session_state.update(hd_row=row, hd_col=col, hd_query="patch")


def on_tile_click(heads: int) -> None:
    """Callback of the layer x head grid: the clicked tile becomes the large map."""
    points = clicked_points(chart_key("hd_grid"))
    next_chart("hd_grid")
    tile = clicked_tile(points, heads)
    if tile is not None:
        st.session_state.update(hd_layer=tile[0] + 1, hd_head=tile[1] + 1)


def on_overlay_click(cols: int, heads: int) -> None:
    """Callback of the per-head overlays: the clicked head becomes the selected one."""
    points = clicked_points(chart_key("hd_overlays"))
    next_chart("hd_overlays")
    tile = clicked_tile(points, cols)
    if tile is not None and tile[0] * cols + tile[1] < heads:
        st.session_state["hd_head"] = tile[0] * cols + tile[1] + 1


def overlay_columns(heads: int) -> int:
    """Tiles per row of the per-head overlays: 6 heads in rows of 3, 12 in rows of 4, 16 in rows of 4."""
    return min(heads, max(3, math.ceil(math.sqrt(heads))))


def head_overlays(
    ctx: Ctx,
    maps: np.ndarray,
    *,
    shared: bool,
    masks: np.ndarray | None,
    labels: list[str],
    opts: dict,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], int]:
    """One layer's maps (H, gh, gw) over the model's view, as labelled tiles with one colour bar
    (each map from 0 to its own maximum, or all from 0 to the layer's maximum), each mask
    (H, gh, gw) outlined. -> (picture, tile boxes, tiles per row)."""
    top = render.finite_max(maps)
    tiles = []
    for h, heat in enumerate(maps):
        img = overlay(ctx, heat, opts, vmax=top if shared else None, outline=None if masks is None else masks[h])
        tiles.append(render.enlarge(img, MIN_TILE)[0])
    cols = overlay_columns(len(tiles))
    mosaic, boxes = render.tile_mosaic(tiles, labels, cols=cols)
    if opts["method"] == "paper":
        bar = render.colorbar(mosaic.shape[0], cmap="inferno", vmin=0.0, vmax=1.0, label="mask (share of max)")
    elif shared:
        bar = render.colorbar(mosaic.shape[0], cmap=opts["cmap"], vmin=0.0, vmax=top, label="attention")
    else:
        bar = render.colorbar(mosaic.shape[0], cmap=opts["cmap"], vmin=0.0, vmax=1.0, label="share of each map's max")
    return np.concatenate([mosaic, bar], axis=1), boxes, cols


def per_head_section(ctx: Ctx, maps: np.ndarray, layer: int, head: int, who: str, shared: bool, query) -> None:
    """Every head of one layer over the image (DINO's visualize_attention), one click to select a
    head, each head's mass-threshold mask outlined, and its IoU with a demo scene's target. The
    picture is made once per layer and settings (a head change only moves the frame)."""
    c = ctx.lm.config
    show, tau = mask_controls()
    opts = display_settings()
    key = ("head_overlays", ctx.source, str(ctx.lm.device), ctx.lm.precision, ctx.image_digest, layer, query)
    slot = result_slot(key + (bool(state.read("hd_drop")), shared, show, tau, tuple(opts.items())))
    if "source" not in slot:
        layer_maps = maps[layer - 1]  # (H, gh, gw)
        masks = A.mass_threshold_mask(torch.from_numpy(layer_maps), tau).numpy()
        target = target_mask(ctx)
        ious = A.mask_iou(masks, target, c.patch_size) if target is not None else None
        labels = [f"head {h + 1}" + (f"  IoU {ious[h]:.2f}" if ious is not None else "") for h in range(c.num_heads)]
        picture, boxes, cols = head_overlays(
            ctx, layer_maps, shared=shared, masks=masks if show else None, labels=labels, opts=opts
        )
        finite = np.where(np.isfinite(layer_maps), layer_maps, np.nan).reshape(c.num_heads, -1)
        largest = [render.finite_max(m, 0.0, default=float("nan")) for m in finite]
        table = {
            "head": list(range(1, c.num_heads + 1)),
            "largest attention": largest,
            "patches in mask": [int(v) for v in masks.reshape(c.num_heads, -1).sum(axis=1)],
        }
        if ious is not None:
            table["mask IoU"] = [float(v) for v in ious]
        hover = [
            f"head {h + 1}: largest attention {largest[h]:.4f}, mask {table['patches in mask'][h]} patches"
            + (f", IoU {ious[h]:.3f}" if ious is not None else "")
            for h in range(c.num_heads)
        ]
        slot.update(
            source=(figures.picture_source(picture), picture.shape[:2]),
            boxes=boxes,
            cols=cols,
            hover=hover,
            table=table,
        )
    st.markdown(f"**Layer {layer}, every head over the image: attention of {who}** (click a head to select it)")
    st.plotly_chart(
        figures.clickable_tiles(slot["source"], slot["boxes"], hover=slot["hover"], selected=head - 1),
        key=chart_key("hd_overlays"),
        on_select=lambda: on_overlay_click(slot["cols"], c.num_heads),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    scale = "all heads from 0 to the layer's largest value" if shared else "each head from 0 to its own maximum"
    st.caption(
        f"Colour scale: {scale} (the grid colour scale below). "
        + (
            f"Outlined in {render.MASK_COLOR_NAME}: the patches holding {tau:.0%} of each map's patch mass. "
            if show
            else ""
        )
        + ("IoU: the mask against the scene's target, pixel by pixel. " if "mask IoU" in slot["table"] else "")
        + "Upsampling, colour map and opacity as set on the Rollout tab."
    )
    with st.expander(f"Per-head numbers of layer {layer}"):
        st.dataframe(slot["table"], hide_index=True, key="hd_table")


def query_selector(ctx: Ctx) -> int | None:
    """Read-out token (default) or a patch, chosen by clicking the picture or by row/column."""
    c = ctx.lm.config
    gh, gw = c.grid
    mode = state.radio(
        "Query",
        ["read-out token", "patch"],
        state.DEFAULTS["hd_query"],
        key="hd_query",
        horizontal=True,
        help="Whose attention",
    )
    a, b = st.columns(2)
    row = state.number("Patch row", 0, gh - 1, state.DEFAULTS["hd_row"], key="hd_row", container=a)
    col = state.number("Patch column", 0, gw - 1, state.DEFAULTS["hd_col"], key="hd_col", container=b)
    st.plotly_chart(
        figures.clickable_view(
            ctx.result.prepared.view,
            c.patch_size,
            num_prefix=c.num_prefix_tokens,
            selected=(row, col) if mode == "patch" else None,
        ),
        key=chart_key("hd_click"),
        on_select=lambda: on_patch_click(c.patch_size, c.grid),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    st.caption("Click a patch to make it the query.")
    if mode == "read-out token":
        return None
    return c.num_prefix_tokens + row * gw + col


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    left, right = st.columns([1, 1.3])
    with left:
        query = query_selector(ctx)
        drop = state.toggle("Drop prefix tokens and renormalize", state.DEFAULTS["hd_drop"], key="hd_drop")
    marked = None
    if query is None:
        who = "the read-out token" if c.readout_tokens else "the mean of the patch tokens"
    else:
        who = ctx.patch_name(query)
        marked = divmod(query - c.num_prefix_tokens, c.grid[1])
    maps = A.attention_maps(r.attentions, query=query, readout_tokens=c.readout_tokens, drop_prefix=drop, **ctx.kw)
    maps = maps.numpy()  # (L, H, gh, gw)
    with right:
        a, b = st.columns([2, 1])
        with a:
            layer = state.slider("Layer", 1, c.depth, c.depth, key="hd_layer")
        head = state.select(
            "Head", list(range(1, c.num_heads + 1)), state.DEFAULTS["hd_head"], key="hd_head", container=b
        )
        st.plotly_chart(
            figures.patch_heatmap(
                maps[layer - 1, head - 1],
                num_prefix=c.num_prefix_tokens,
                zmin=0,
                title=f"Layer {layer}, head {head}: attention of {who}",
                colorbar_title="attention",
                marked=marked,
            ),
            key="hd_big",
        )
        st.caption("0 is the darkest colour." + (" Cyan: the query patch." if marked else ""))
    scale = state.radio(
        "Grid colour scale",
        ["per map", "shared"],
        "per map",
        horizontal=True,
        key="hd_scale",
        help="per map: each tile from 0 to its own maximum; shared: all tiles from 0 to the largest value",
    )
    per_head_section(ctx, maps, layer, head, who, shared=scale != "per map", query=query)
    tiles = render.share_of_max(maps, shared=scale != "per map")
    bar = "share of each map's max" if scale == "per map" else f"share of {render.finite_max(maps):.3g}"
    st.markdown(f"**Every layer and head: attention of {who}** (click a tile to show it large)")
    st.plotly_chart(
        figures.tile_figure(
            tiles,
            row_name="layer",
            col_name="head",
            colorbar_title=bar,
            selected=(layer - 1, head - 1),
        ),
        key=chart_key("hd_grid"),
        on_select=lambda: on_tile_click(c.num_heads),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    a, b = st.columns(2)
    with a:
        if query is not None and query >= c.num_prefix_tokens:
            patch = query - c.num_prefix_tokens
            rev = A.attention_to_patch(r.attentions[layer - 1, head - 1], patch=patch, **ctx.kw).numpy()
            st.plotly_chart(
                figures.patch_heatmap(
                    rev,
                    num_prefix=c.num_prefix_tokens,
                    zmin=0,
                    title=f"Who attends to {ctx.patch_name(query)} (layer {layer}, head {head})",
                    colorbar_title="attention",
                    marked=marked,
                ),
                key="hd_rev",
            )
        else:
            st.info("Pick a patch as the query to see the reverse view: which patches attend to it.")
    with b:
        st.plotly_chart(figures.layer_head_matrix(r.mad, title="Mean attention distance", unit="px"), key="hd_mad")
        st.plotly_chart(
            figures.layer_head_matrix(
                r.prefix_share, title="Share of attention on prefix tokens", unit="share", zmin=0, zmax=1
            ),
            key="hd_prefix",
        )
        st.plotly_chart(
            figures.layer_head_matrix(r.entropy, title="Attention entropy (mean over queries)", unit="nats", zmin=0),
            key="hd_ent",
        )
