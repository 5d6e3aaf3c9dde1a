"""Download: exactly the maps the other tabs show, with their current settings, at publication size
(a title, the upscaling named, a colour bar), and the analysis report (NPZ, and its JSON)."""

from __future__ import annotations

import json

import numpy as np
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import colormaps, render, report
from viz_app.tabs import classes, compare, heads, rollout, state, tokens
from viz_app.tabs.common import Ctx, display_settings, overlay, rollout_settings, target_mask

ATTENTIONS_LIMIT_MB = 64  # above this the report leaves the full maps out unless asked


def build_report(ctx: Ctx, settings: report.Settings) -> report.Report:
    """The report of what the page shows now (every tab's settings)."""
    grad = None
    if settings.grad_rollout:
        cls = int(settings.grad_class if settings.grad_class is not None else ctx.result.top5[0][0])
        grad = (cls, ctx.class_map(cls, settings.class_method))
    arrays = ctx.result.report_arrays(ctx.lm, settings, grad)
    target = target_mask(ctx)
    if target is not None:
        p = ctx.lm.config.patch_size
        arrays["mask_iou_heads"] = A.mask_iou(arrays["head_masks"], target, p).astype(np.float32)
        arrays["mask_iou_rollout"] = np.asarray(A.mask_iou(arrays["rollout_mask"], target, p), np.float32)
    if settings.class_maps or settings.contrast_classes:
        arrays |= classes.report_arrays(ctx)
    other = compare.compared(ctx)
    if other is not None:
        arrays |= compare.report_arrays(ctx, *other)
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
        "heads_scale": "shared" if state.read("hd_scale") == "shared" else "per map",
        "mask_outlined": bool(state.read("mk_show")),
        "motion": state.read("mo_what") if state.read("mo_what") in ("rollout", "head") else "rollout",
        "motion_fps": int(state.clamped("mo_fps", 1, 10)),
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
    outlined = rep.display["mask_outlined"]
    tau = f"{settings.mask_tau:.0%} of the mass"
    if outlined:
        out["rollout_mask.png"] = (
            "Rollout with its mass mask",
            _png(
                overlay(ctx, heat, opts, outline=arrays["rollout_mask"]),
                title=f"Attention rollout, {what}; outlined: the patches holding {tau}",
                label="rollout",
                **bar,
            ),
        )
    for key, name in (("grad_rollout", "Gradient rollout"), ("transformer_attribution", "Transformer Attribution")):
        if key not in arrays:
            continue
        g = arrays[key]
        cls = int(arrays["grad_class"])
        mask = A.mass_threshold_mask(torch.from_numpy(g), settings.mask_tau).numpy() if outlined else None
        gbar = dict(cmap=bar["cmap"], vmin=0.0, vmax=render.finite_max(g))
        extra = f"; outlined: the patches holding {tau}" if outlined else ""
        out[f"{key}.png"] = (
            f"{name} overlay",
            _png(
                overlay(ctx, g, opts, outline=mask),
                title=f"{name} for '{ctx.label(cls)}'{extra}",
                label="relevance",
                **gbar,
            ),
        )
    layer = min(max(rep.display["heads_layer"], 1), c.depth)
    head = min(max(rep.display["heads_head"], 1), c.num_heads)
    maps = arrays.get("query_attention", arrays["readout_attention"])
    who = "the read-out token" if settings.query_patch is None else f"patch {tuple(settings.query_patch)}"
    shared = rep.display["heads_scale"] == "shared"
    ious = arrays.get("mask_iou_heads")
    labels = [
        f"head {h + 1}" + (f"  IoU {ious[layer - 1, h]:.2f}" if ious is not None else "") for h in range(c.num_heads)
    ]
    picture, _, _ = heads.head_overlays(
        ctx,
        maps[layer - 1],
        shared=shared,
        masks=arrays["head_masks"][layer - 1] if outlined else None,
        labels=labels,
        opts=opts,
    )
    out["head_overlays.png"] = (
        f"Layer {layer}, every head over the image",
        _png(
            picture,
            title=f"Layer {layer}, every head: attention of {who}"
            + (f"; outlined: the patches holding {tau}" if outlined else ""),
            cmap=None,
        ),
    )
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
    out |= tokens.downloads(ctx)
    if c.num_classes:
        out |= classes.downloads(ctx)
    other = compare.compared(ctx)
    if other is not None:
        out |= compare.downloads(ctx, *other)
    return out


def animations(ctx: Ctx, rep: report.Report) -> dict[str, tuple[str, bytes, str]]:
    """file name -> (button label, bytes, MIME type) of the Rollout tab's layers in motion."""
    what, fps = rep.display["motion"], rep.display["motion_fps"]
    opts = {k: rep.display[k] for k in ("method", "cmap", "alpha")}
    files = rollout.motion_files(ctx, what, rep.settings, opts, fps)
    name = "the rollout after each layer" if what == "rollout" else "the head through the layers"
    return {
        f"{what}_layers.gif": (f"Layers in motion: {name} (GIF)", files["gif"], "image/gif"),
        f"{what}_layers.mp4": (f"Layers in motion: {name} (MP4)", files["mp4"], "video/mp4"),
    }


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    settings = rollout_settings(ctx)
    size_mb = c.depth * c.num_heads * c.num_tokens**2 * 4 / 2**20
    include = st.toggle(
        f"Include every attention map in the report ({size_mb:.0f} MB)",
        size_mb <= ATTENTIONS_LIMIT_MB,
        key="dl_attentions",
    )
    chosen = {"save_attentions": include}
    if c.num_classes:
        _, top_k, pair = classes.chosen(ctx)
        chosen |= {"class_maps": len(top_k), "contrast_classes": list(pair)}
    settings = report.Settings.from_dict({**settings.to_dict(), **chosen})
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
    st.markdown(
        "**Figures** (PNG, at least 1024 px on the long side, with title and colour bar) and the layers in motion "
        "(GIF and MP4, the frames the Rollout tab plays)"
    )
    cols = st.columns(2)  # two a row: the labels stay whole at 1024 px
    files = {name: (label, data, "image/png") for name, (label, data) in figures_png(ctx, rep).items()}
    files |= animations(ctx, rep)
    for k, (name, (label, data, mime)) in enumerate(files.items()):
        cols[k % 2].download_button(label, data, file_name=name, mime=mime, key=f"dl_{name}")
    with st.expander("What the report holds (keys, shapes, units, conventions)"):
        st.markdown(
            "The NPZ holds these arrays for this image plus `report_json` (the settings that produced them, "
            "the model, preprocessing, image and library versions). `vit-lens analyze` writes the same format "
            "per image.\n\n" + report.schema_markdown()
        )
