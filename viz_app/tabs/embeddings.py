"""Embeddings: position-embedding similarity (paper Fig. 7 centre), patch-embedding filters
(Fig. 7 left) and token norms with high-norm outliers."""

from __future__ import annotations

import math

import numpy as np
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import colormaps, figures, render
from viz_app.tabs import state
from viz_app.tabs.common import NO_TOOLBAR, Ctx, chart_key, clicked_points, clicked_tile, next_chart


def on_tile_click(cols: int) -> None:
    """Callback of the similarity tiles: the clicked tile's patch is shown large."""
    points = clicked_points(chart_key("pe_tiles"))
    next_chart("pe_tiles")
    tile = clicked_tile(points, cols)
    if tile is not None:
        st.session_state.update(pe_row=tile[0], pe_col=tile[1])


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    gh, gw = c.grid
    pos = ctx.lm.model.pos_embed.detach().float().cpu()[0, c.pos_embed_prefix :]
    sim = A.position_similarity(pos)
    tiles = A.similarity_tiles(sim, c.grid).numpy()
    st.markdown(
        "**Position-embedding similarity** (paper Fig. 7, centre): tile (r, c) shows the cosine similarity of "
        "patch (r, c)'s position embedding to every patch's; one scale from -1 (blue) through 0 (white) to 1 (red)."
    )
    left, right = st.columns(2)
    with right:
        a, b = st.columns(2)
        pr = state.number("Patch row", 0, gh - 1, gh // 2, key="pe_row", container=a)
        pc = state.number("Patch column", 0, gw - 1, gw // 2, key="pe_col", container=b)
        try:
            value = A.neighbour_contrast(sim, c.grid)
            contrast = (
                f"Neighbour contrast (4-neighbours minus 4+ apart): {value:.3f}."
                if math.isfinite(value)
                else "No neighbour contrast: the position embeddings hold NaN or infinite values."
            )
        except ValueError:  # grids of 4 x 4 or fewer patches have no patches 4 apart
            contrast = f"No neighbour contrast: the {gh}x{gw} grid has no patches 4 or more apart."
        st.caption(f"{contrast} Click a tile of the grid below to show it large.")
    with left:
        st.plotly_chart(
            figures.patch_heatmap(
                tiles[pr, pc],
                num_prefix=c.num_prefix_tokens,
                zmin=-1,
                zmax=1,
                colorscale=colormaps.DEFAULT_DIVERGING,
                title=f"Similarity to patch ({pr}, {pc})",
                colorbar_title="cosine",
                marked=(pr, pc),
                height=380,
            ),
            key="pe_big",
        )
    st.plotly_chart(  # every tile, the full width of the page: the grid needs the room
        figures.tile_figure(
            tiles,
            row_name="patch row",
            col_name="patch column",
            row_labels=[str(i) for i in range(gh)],
            col_labels=[str(j) for j in range(gw)],
            colorbar_title="cosine",
            zmin=-1,
            zmax=1,
            colorscale=colormaps.DEFAULT_DIVERGING,
            selected=(pr, pc),
            height=680,
        ),
        key=chart_key("pe_tiles"),
        on_select=lambda: on_tile_click(gw),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    if c.linear_patch_embed:
        patch_filters(ctx)
    else:
        st.markdown("**Patch-embedding filters** (paper Fig. 7, left)")
        st.info(
            f"Not available for this model: it embeds patches with a convolutional stem ({len(c.conv_stem)} "
            "stride-2 conv layers before the projection), so there is no linear filter per patch whose principal "
            "components could be shown in pixel space."
        )
    st.markdown("**Token norms per layer**, with high-norm outlier patch tokens (over 2x the layer's median) marked")
    norms = ctx.result.token_norms
    outl = A.token_norm_outliers(torch.from_numpy(norms), num_prefix=c.num_prefix_tokens).numpy()
    st.plotly_chart(
        figures.token_norm_map(norms, outl, num_prefix=c.num_prefix_tokens, prefix_names=c.prefix_names), key="pe_norms"
    )


def patch_filters(ctx: Ctx) -> None:
    c = ctx.lm.config
    st.markdown(
        "**Patch-embedding filters** (paper Fig. 7, left): principal components of the linear patch "
        "embedding, centred first, each with its own symmetric contrast (grey = 0), sign fixed."
    )
    pca = A.filter_pca(ctx.lm.model.patch_embed.proj.weight.detach().float().cpu())
    st.image(render.filter_tiles(pca.components.numpy(), cols=7, scale=max(2, 48 // c.patch_size)))
    ev = pca.explained_variance_ratio.numpy()
    pre = ctx.lm.preprocessing
    if not np.isfinite(ev).all():  # filter_pca returns NaN for filters with NaN or infinite entries
        st.caption(
            "No principal components: the filters hold NaN or infinite values (hatched grey). "
            f"The filters act on normalized pixels: mean {pre.mean}, std {pre.std}."
        )
        return
    st.caption(
        f"Explained variance of the first {len(ev)}: {ev.sum():.1%} (first three: "
        + ", ".join(f"{v:.1%}" for v in ev[:3])
        + f"). The filters act on normalized pixels: mean {pre.mean}, std {pre.std}."
    )
