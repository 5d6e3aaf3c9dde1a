"""Compare: a second model on the same image. Position-embedding similarity on a common grid
(named resampling), the difference, decay curves, anisotropy, and both rollouts side by side."""

from __future__ import annotations

import streamlit as st

from viz_app import analysis as A
from viz_app import colormaps, figures, results
from viz_app.tabs import state
from viz_app.tabs.common import Ctx, display_settings, show_map

METHODS = {
    "bicubic": "timm: bicubic with antialias",
    "bilinear": "the original JAX code: scipy zoom order 1, corner centres aligned",
    "bicubic_dino": "DINO: bicubic, 0.1 added to the target size inside the scale factor",
    "bicubic_plain": "bicubic without antialias",
    "nearest": "nearest neighbour",
}


def draw(ctx: Ctx) -> None:
    with st.expander("Second model", expanded=True):
        picked = ctx.second_model()
    if picked is None:
        st.info("Choose a second model above to compare it with the current one.")
        return
    other, other_result = picked
    if other_result is not None and other_result.nonfinite:  # the page warned about the first model only
        st.warning(results.nonfinite_warning(other_result.nonfinite, other.name))
    ca, cb = ctx.lm.config, other.config
    name_a, name_b = ctx.lm.name, other.name
    a, b = st.columns(2)
    method = state.select(
        "Resampling to the common grid",
        list(METHODS),
        "bicubic",
        key="cmp_method",
        container=a,
        format_func=lambda m: f"{m} ({METHODS[m]})",
    )
    grids = sorted({ca.grid, cb.grid}, key=lambda g: g[0] * g[1])[::-1]
    names = [f"{g[0]}x{g[1]}" for g in grids]
    grid = grids[names.index(state.select("Common grid", names, names[0], key="cmp_grid", container=b))]
    pa = ctx.lm.model.pos_embed.detach().float().cpu()[0, ca.pos_embed_prefix :]
    pb = other.model.pos_embed.detach().float().cpu()[0, cb.pos_embed_prefix :]
    cmp = A.compare_position_embeddings(pa, ca.grid, pb, cb.grid, grid=grid, method=method)
    cols = st.columns(3)
    diverging = colormaps.DEFAULT_DIVERGING
    panels = (
        (cmp.sim_a, f"{name_a}", "cosine"),
        (cmp.sim_b, f"{name_b}", "cosine"),
        (cmp.difference, "Difference (first - second)", "difference"),
    )
    for col, (sim, title, unit), key in zip(cols, panels, ("cmp_a", "cmp_b", "cmp_diff")):
        col.plotly_chart(
            figures.tile_figure(
                A.similarity_tiles(sim, grid).numpy(),
                row_name="patch row",
                col_name="patch column",
                row_labels=[str(i) for i in range(grid[0])],
                col_labels=[str(j) for j in range(grid[1])],
                colorbar_title=unit,
                zmin=-1,
                zmax=1,
                colorscale=diverging,
                title=title,
                height=420,
            ),
            key=key,
            config={"displayModeBar": False},
        )
    st.caption(
        f"Both resampled to {grid[0]}x{grid[1]} with '{method}' ({METHODS[method]}). Similarity: cosine from -1 "
        "(blue) through 0 (white) to 1 (red). Difference: from -1 (blue, the second model's similarity is higher) "
        "through 0 (white) to +1 (red, the first model's is higher)."
    )
    left, right = st.columns(2)
    left.plotly_chart(
        figures.curves(
            {
                name_a: (cmp.decay_a[0].numpy(), cmp.decay_a[1].numpy()),
                name_b: (cmp.decay_b[0].numpy(), cmp.decay_b[1].numpy()),
            },
            title="Similarity decay",
            x_title="grid distance (patches)",
            y_title="mean cosine similarity",
        ),
        key="cmp_decay",
    )
    right.markdown(
        f"**Row vs column anisotropy** (mean similarity along rows minus along columns):\n\n"
        f"- {name_a}: {cmp.anisotropy_a:+.3f}\n- {name_b}: {cmp.anisotropy_b:+.3f}"
    )
    if other_result is not None:
        opts = display_settings()
        x, y = st.columns(2)
        with x:
            show_map(ctx, ctx.result.rollout, opts, label="rollout", caption=f"Rollout (paper settings): {name_a}")
        with y:
            other_ctx = ctx.with_model(other, other_result)
            show_map(
                other_ctx, other_result.rollout, opts, label="rollout", caption=f"Rollout (paper settings): {name_b}"
            )
