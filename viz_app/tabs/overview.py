"""Overview: top-5 predictions, the patch grid the model sees, and the rollout overlay."""

from __future__ import annotations

import math

import streamlit as st

from viz_app import figures
from viz_app.tabs import state
from viz_app.tabs.common import Ctx, display_settings, rollout_map, rollout_settings, show_map


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    if ctx.source == "demo" and not ctx.image_name.startswith("scene: "):
        st.warning(
            "The demo model was trained on generated shape scenes only: it knows eight shapes, not photos. "
            "On a photo its predictions and maps say nothing about the photo. Pick a 'scene: ...' example, "
            "or load a pretrained model in the sidebar."
        )
    left, mid, right = st.columns([1, 1.2, 1.2])
    with left:
        st.markdown("**Top-5 predictions**")
        if r.probs is None:
            st.info("This model has no classifier: it returns features, so there are no class predictions.")
        else:
            names = [ctx.label(i) for i, _ in r.top5]
            st.plotly_chart(figures.top_classes(names, [p for _, p in r.top5]), key="ov_top5")
            if not all(math.isfinite(p) for _, p in r.top5):
                st.caption("No bar: these probabilities are NaN or infinite (the logits are not finite).")
    with mid:
        grid = r.patch_grid(c.patch_size)
        st.image(
            grid,
            caption=f"What the model sees: {c.image_size[1]}x{c.image_size[0]} px, "
            f"{c.grid[0]}x{c.grid[1]} patches of {c.patch_size} px (rows and columns from 0)",
            width="stretch",
        )
    with right:
        on_original = state.toggle("Show on the original image", False, key="ov_original")
        s = rollout_settings(ctx)
        heat = rollout_map(ctx, s)
        first, last = s.layer_range(c.depth)
        show_map(
            ctx,
            heat,
            display_settings(),
            label="rollout",
            on_original=on_original,
            caption=f"Attention rollout, layers {first}-{last}, {s.rollout_fusion} fusion, discard "
            f"{s.rollout_discard:.2f} (set on the Rollout tab). 0 is the darkest colour.",
        )
