"""Download: exactly the maps the other tabs show, with their current settings, at publication size
(a title, the upscaling named, a colour bar), and the analysis report (NPZ, and its JSON)."""

from __future__ import annotations

import json

import numpy as np
import streamlit as st

from viz_app import analysis as A
from viz_app import colormaps, render, report
from viz_app.tabs import state
from viz_app.tabs.common import Ctx, display_settings, overlay, rollout_settings

ATTENTIONS_LIMIT_MB = 64  # above this the report leaves the full maps out unless asked


def build_report(ctx: Ctx, settings: report.Settings) -> report.Report:
    """The report of what the page shows now (the Rollout and Heads tabs' settings)."""
    grad = None
    if settings.grad_rollout:
        cls = int(settings.grad_class if settings.grad_class is not None else ctx.result.top5[0][0])
        grad = (cls, ctx.gradient_map(cls))
    arrays = ctx.result.report_arrays(ctx.lm, settings, grad)
    image = {
        "name": ctx.image_name,
        "sha256_prefix": ctx.image_digest,
        "original_size": list(ctx.result.prepared.original_size),
    }
    return report.Report(arrays, settings, report.model_meta(ctx.lm, ctx.source), image, display_meta(ctx))


def display_meta(ctx: Ctx) -> dict:
    c = ctx.lm.config
    return {
        **display_settings(),
        "heads_layer": int(state.read("hd_layer", c.depth) or c.depth),
        "heads_head": int(state.read("hd_head") or 1),
        "mean_attention_distance_plot_starts_at_0": True,
    }


def _png(image: np.ndarray, **kw) -> bytes:
    fig, _ = render.publication_figure(image, **kw)
    return render.to_png(fig)


def figures_png(ctx: Ctx, rep: report.Report) -> dict[str, tuple[str, bytes]]:
    """file name -> (button label, PNG) for every map the page shows, drawn from the report with
    its settings and display (so the pictures and the report always agree)."""
    c = ctx.lm.config
    settings, arrays = rep.settings, rep.arrays
    opts = {k: rep.display[k] for k in ("method", "cmap", "alpha")}
    first, last = settings.layer_range(c.depth)
    heat = arrays["rollout"]
    what = f"layers {first}-{last}, {settings.rollout_fusion} fusion, discard {settings.rollout_discard:.2f}"
    bar = dict(cmap=None if opts["method"] == "paper" else opts["cmap"], vmin=0.0, vmax=render.finite_max(heat))
    out = {
        "rollout.png": (
            "Rollout overlay",
            _png(overlay(ctx, heat, opts), title=f"Attention rollout, {what}", label="rollout", **bar),
        ),
        "rollout_original.png": (
            "Rollout on the original image",
            _png(
                overlay(ctx, heat, opts, on_original=True),
                title=f"Attention rollout on the original image, {what}",
                label="rollout",
                **bar,
            ),
        ),
    }
    if "grad_rollout" in arrays:
        g = arrays["grad_rollout"]
        cls = int(arrays["grad_class"])
        gbar = dict(cmap=bar["cmap"], vmin=0.0, vmax=render.finite_max(g))
        out["grad_rollout.png"] = (
            "Gradient rollout overlay",
            _png(overlay(ctx, g, opts), title=f"Gradient rollout for '{ctx.label(cls)}'", label="relevance", **gbar),
        )
    layer = min(max(rep.display["heads_layer"], 1), c.depth)
    head = min(max(rep.display["heads_head"], 1), c.num_heads)
    maps = arrays.get("query_attention", arrays["readout_attention"])
    who = "the read-out token" if settings.query_patch is None else f"patch {tuple(settings.query_patch)}"
    one = maps[layer - 1, head - 1]
    big = render.colorize(render.upsample(one, c.image_size, "nearest"), "inferno", 0.0, render.finite_max(one))
    if settings.query_patch is not None:
        r, col = settings.query_patch
        p = c.patch_size
        big[r * p : (r + 1) * p, [col * p, (col + 1) * p - 1]] = (0, 255, 255)
        big[[r * p, (r + 1) * p - 1], col * p : (col + 1) * p] = (0, 255, 255)
    out["head.png"] = (
        f"Layer {layer}, head {head}",
        _png(
            big,
            title=f"Layer {layer}, head {head}: attention of {who}",
            cmap="inferno",
            vmax=render.finite_max(one),
            label="attention",
        ),
    )
    tiles = render.share_of_max(maps)
    grid = render.labelled_grid(tiles, row_name="layer", col_name="head", cmap="inferno", vmin=0.0, vmax=1.0)
    out["layers_heads.png"] = (
        "Every layer and head",
        _png(grid, title=f"Every layer and head: attention of {who}", cmap="inferno", label="share of each map's max"),
    )
    pos = ctx.lm.model.pos_embed.detach().float().cpu()[0, c.pos_embed_prefix :]
    sim_tiles = A.similarity_tiles(A.position_similarity(pos), c.grid).numpy()
    div = colormaps.DEFAULT_DIVERGING
    pe = render.labelled_grid(
        sim_tiles, row_name="patch row", col_name="patch column", cmap=div, vmin=-1, vmax=1, first=0
    )
    out["position_similarity.png"] = (
        "Position-embedding similarity",
        _png(pe, title="Position-embedding similarity (cosine)", cmap=div, vmin=-1.0, vmax=1.0, label="cosine"),
    )
    mad, mad_r = arrays["mean_attention_distance"], arrays["mean_attention_distance_renormalized"]
    ymax = render.finite_max(np.stack([mad, mad_r]), 1.0) * 1.05
    share = arrays["prefix_mass_share"]
    conventions = (
        ("as_is", mad, "prefix mass as distance 0", "prefix as 0"),
        ("renormalized", mad_r, "renormalized", "renormalized"),
    )
    for name, values, conv, short in conventions:
        img = render.mad_scatter_png(values, title=f"Mean attention distance ({conv})", prefix_share=share, ymax=ymax)
        out[f"distance_{name}.png"] = (f"Attention distance ({short})", render.to_png(img))
    return out


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    settings = rollout_settings(ctx)
    size_mb = c.depth * c.num_heads * c.num_tokens**2 * 4 / 2**20
    include = st.toggle(
        f"Include every attention map in the report ({size_mb:.0f} MB)",
        size_mb <= ATTENTIONS_LIMIT_MB,
        key="dl_attentions",
    )
    settings = report.Settings.from_dict({**settings.to_dict(), "save_attentions": include})
    rep = build_report(ctx, settings)
    st.markdown(
        "Every file below is what the other tabs show now, with their current settings "
        f"(rollout: layers {settings.layer_range(c.depth)[0]}-{settings.layer_range(c.depth)[1]}, "
        f"{settings.rollout_fusion} fusion, discard {settings.rollout_discard:.2f}; "
        f"query: {'read-out token' if settings.query_patch is None else 'patch ' + str(settings.query_patch)})."
    )
    a, b = st.columns(2)
    a.download_button(
        "Report (NPZ)",
        rep.npz_bytes(),
        file_name="vit_lens_report.npz",
        mime="application/octet-stream",
        key="dl_npz",
    )
    b.download_button(
        "Report metadata (JSON)",
        json.dumps(rep.meta(), indent=2),
        file_name="vit_lens_report.json",
        mime="application/json",
        key="dl_json",
    )
    st.markdown("**Figures** (PNG, at least 1024 px on the long side, with title and colour bar)")
    cols = st.columns(2)  # two a row: the labels stay whole at 1024 px
    for k, (name, (label, data)) in enumerate(figures_png(ctx, rep).items()):
        cols[k % 2].download_button(label, data, file_name=name, mime="image/png", key=f"dl_{name}")
    with st.expander("What the report holds (keys, shapes, units, conventions)"):
        st.markdown(
            "The NPZ holds these arrays for this image plus `report_json` (the settings that produced them, "
            "the model, preprocessing, image and library versions). `vit-lens analyze` writes the same format "
            "per image.\n\n" + report.schema_markdown()
        )
