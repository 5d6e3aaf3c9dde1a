"""Distance: mean attention distance per head (paper Fig. 7 right), in both prefix conventions,
with the share of attention each head sends to prefix tokens; for this image or the gallery."""

from __future__ import annotations

import numpy as np
import streamlit as st

from viz_app import figures, render
from viz_app.tabs.common import Ctx


def scatters(mad: np.ndarray, mad_r: np.ndarray, share: np.ndarray, title: str, key: str) -> None:
    top = render.finite_max(np.stack([mad, mad_r]), 1.0) * 1.05  # one y range for both, from the finite values
    a, b = st.columns(2)
    a.plotly_chart(
        figures.mad_scatter_figure(mad, title=title, convention="as_is", prefix_share=share, ymax=top),
        key=f"{key}_as_is",
    )
    b.plotly_chart(
        figures.mad_scatter_figure(mad_r, title=title, convention="renormalized", prefix_share=share, ymax=top),
        key=f"{key}_renorm",
    )


def draw(ctx: Ctx) -> None:
    r = ctx.result
    st.markdown(
        "**Mean attention distance** (paper Fig. 7, right): for each head, the attention-weighted distance in "
        "pixels between a patch query and the patches it attends to, averaged over the queries. Left: mass on "
        "prefix tokens (class, distillation, registers) counts as distance 0, the authors' convention; right: "
        "each query's attention renormalized over the patches. A head that sends most of its attention to "
        "prefix tokens looks local on the left and not on the right (open circles)."
    )
    scatters(r.mad, r.mad_renorm, r.prefix_share, "This image", "md_this")
    st.plotly_chart(
        figures.layer_head_matrix(
            r.prefix_share, title="Share of each head's attention on prefix tokens", unit="share", zmin=0, zmax=1
        ),
        key="md_prefix",
    )
    if st.button("Average over the example gallery", key="md_examples"):
        st.session_state["md_show_examples"] = True
    if st.session_state.get("md_show_examples"):
        with st.spinner("Running the model on every example image..."):
            (mad, n), (mad_r, _), (share, _) = (ctx.example_mad(k) for k in ("as_is", "renormalized", "prefix"))
        scatters(mad, mad_r, share, f"Mean over {n} example images", "md_avg")
