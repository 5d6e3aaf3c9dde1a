"""Rollout: head fusion, discard ratio, layer range, read-out token, the gradient rollout for any
class, and the rollout after each layer. Its settings are also what Overview and Download use."""

from __future__ import annotations

import numpy as np
import streamlit as st

from viz_app import analysis as A
from viz_app import figures, render, report
from viz_app.tabs import state
from viz_app.tabs.common import (
    NO_TOOLBAR,
    Ctx,
    chart_key,
    clicked_points,
    clicked_tile,
    display_options,
    next_chart,
    readout_choices,
    rollout_map,
    rollout_settings,
    show_map,
)


def percent(p: float) -> str:
    return f"{p:.1%}" if np.isfinite(p) else "no value"


def controls(ctx: Ctx) -> None:
    c = ctx.lm.config
    a, b, d = st.columns(3)
    state.select(
        "Head fusion",
        list(report.FUSIONS),
        state.DEFAULTS["ro_fusion"],
        key="ro_fusion",
        container=a,
        help="mean is the paper's choice",
    )
    with b:
        state.slider(
            "Discard ratio",
            0.0,
            0.95,
            state.DEFAULTS["ro_discard"],
            key="ro_discard",
            step=0.05,
            help="zero this share of the lowest fused entries per layer (never the read-out token's own)",
        )
    choices = readout_choices(ctx)
    state.select("Read-out token", choices, choices[0], key="ro_readout", container=d)
    state.range_slider("Layers", 1, c.depth, (1, c.depth), key="ro_layers")


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    controls(ctx)
    opts = display_options()
    s = rollout_settings(ctx)
    first, last = s.layer_range(c.depth)
    target = None
    if c.num_classes:  # chosen above both maps, so that they stand side by side at one height
        top = int(r.top5[0][0])
        target = state.select(
            "Class of the gradient rollout",
            list(range(c.num_classes)),
            top,
            key="ro_class",
            format_func=lambda i: f"{ctx.label(i)} ({percent(r.probs[i])})",
            help="the class whose logit's gradient weighs the attention; the top-1 class by default",
        )
    left, right = st.columns(2)
    with left:
        st.markdown("**Attention rollout** (Abnar & Zuidema 2020)")
        show_map(
            ctx,
            rollout_map(ctx, s),
            opts,
            label="rollout",
            caption=f"Layers {first}-{last}, {s.rollout_fusion} fusion, discard {s.rollout_discard:.2f}, "
            f"read-out {s.rollout_readout}. 0 is the darkest colour.",
        )
    with right:
        st.markdown("**Gradient rollout** (Chefer et al. 2021)")
        if target is not None:
            with st.spinner("One backward pass for the class..."):
                gmap = ctx.gradient_map(int(target))
            show_map(
                ctx,
                gmap,
                opts,
                label="relevance",
                caption=f"For '{ctx.label(int(target))}', all layers. 0 is the darkest colour.",
            )
        else:
            st.info("Class-specific maps need a classifier head; this model has none.")
    options = {k: v for k, v in report.rollout_options(c, s).items() if k not in ("start", "end")}
    strip = A.rollout_per_layer(r.forward.attentions, **options)[0].numpy()  # (L, gh, gw), every layer
    tiles = render.share_of_max(strip)
    st.markdown("**Rollout after each layer**, from layer 1 (each map from 0 to its own maximum)")
    st.plotly_chart(
        figures.tile_figure(
            tiles[None],
            row_name="",
            col_name="after layer",
            row_labels=[""],
            colorbar_title="share of max",
            height=max(160, 90 + 600 // c.depth),
        ),
        key=chart_key("ro_strip"),
        on_select=lambda: on_strip_click(c.depth),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    st.caption("Click a layer to end the rollout there.")


def on_strip_click(depth: int) -> None:
    """Callback of the per-layer strip: the rollout ends at the clicked layer."""
    points = clicked_points(chart_key("ro_strip"))
    next_chart("ro_strip")
    tile = clicked_tile(points, depth)
    if tile is not None:
        last = tile[1] + 1
        first = state.read("ro_layers", (1, depth))[0]
        st.session_state["ro_layers"] = (min(first, last), last)
