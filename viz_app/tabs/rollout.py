"""Rollout: head fusion, discard ratio, layer range, read-out token, a class-specific map for any
class (gradient rollout or LRP), mass-threshold masks, the rollout after each layer, and layers in
motion (an animation, exported as GIF or MP4). Its settings are also what Overview and Download use."""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import animation, figures, render, report
from viz_app.tabs import state
from viz_app.tabs.common import (
    MOTION,
    NO_TOOLBAR,
    Ctx,
    chart_key,
    clicked_points,
    clicked_tile,
    display_options,
    mask_controls,
    method_select,
    motion_frames,
    motion_maps,
    next_chart,
    readout_choices,
    result_slot,
    rollout_map,
    rollout_settings,
    show_map,
    target_mask,
)

METHOD_TITLES = {
    "gradient": "**Gradient rollout** (Chefer et al., ICCV 2021)",
    "lrp": "**Transformer Attribution, LRP** (Chefer et al., CVPR 2021)",
}


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


def mask_note(ctx: Ctx, heat: np.ndarray, tau: float) -> tuple[np.ndarray, str]:
    """The map's mass-threshold mask (gh, gw) and a sentence on it (its size; its IoU with a demo
    scene's target)."""
    mask = A.mass_threshold_mask(torch.from_numpy(np.asarray(heat, np.float32)), tau).numpy()
    note = f" Outlined: the {int(mask.sum())} patches holding {tau:.0%} of the map's mass"
    target = target_mask(ctx)
    if target is not None:
        note += f" (IoU with the scene's target {float(A.mask_iou(mask, target, ctx.lm.config.patch_size)):.2f})"
    return mask, note + "."


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    controls(ctx)
    opts = display_options()
    show_mask, tau = mask_controls()
    s = rollout_settings(ctx)
    first, last = s.layer_range(c.depth)
    target = method = None
    if c.num_classes:  # chosen above both maps, so that they stand side by side at one height
        top = int(r.top5[0][0])
        a, b = st.columns(2)
        target = state.select(
            "Class of the class-specific map",
            list(range(c.num_classes)),
            top,
            key="ro_class",
            container=a,
            format_func=lambda i: f"{ctx.label(i)} ({percent(r.probs[i])})",
            help="the class whose logit's gradient weighs the attention; the top-1 class by default",
        )
        method = method_select("Method", b)
    left, right = st.columns(2)
    with left:
        st.markdown("**Attention rollout** (Abnar & Zuidema 2020)")
        heat = rollout_map(ctx, s)
        mask, note = mask_note(ctx, heat, tau) if show_mask else (None, "")
        show_map(
            ctx,
            heat,
            opts,
            label="rollout",
            outline=mask,
            caption=f"Layers {first}-{last}, {s.rollout_fusion} fusion, discard {s.rollout_discard:.2f}, "
            f"read-out {s.rollout_readout}. 0 is the darkest colour.{note}",
        )
    with right:
        if target is not None:
            st.markdown(METHOD_TITLES[method])
            with st.spinner("One backward pass for the class..."):
                gmap = ctx.class_map(int(target), method)
            mask, note = mask_note(ctx, gmap, tau) if show_mask else (None, "")
            show_map(
                ctx,
                gmap,
                opts,
                label="relevance",
                outline=mask,
                caption=f"For '{ctx.label(int(target))}', all layers. 0 is the darkest colour.{note}",
            )
        else:
            st.markdown(METHOD_TITLES["gradient"])
            st.info("Class-specific maps need a classifier head; this model has none.")
    strip = A.rollout_per_layer(r.forward.attentions, **report.per_layer_options(c, s))[
        0
    ].numpy()  # (L, gh, gw), every layer
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
    motion_section(ctx, s, opts)


def motion_files(ctx: Ctx, what: str, s: report.Settings, opts: dict, fps: int) -> dict:
    """The frames of one animation and its GIF and MP4 bytes, made once per image and settings."""
    slot = result_slot(
        (
            "motion",
            ctx.source,
            str(ctx.lm.device),
            ctx.lm.precision,
            ctx.image_digest,
            what,
            s,
            tuple(opts.items()),
            fps,
        )
        + ((int(state.read("hd_head") or 1),) if what == "head" else ())
    )
    if "frames" not in slot:
        maps, labels, quantity = motion_maps(ctx, what, s)
        frames = motion_frames(ctx, maps, labels, opts, quantity)
        slot.update(
            frames=frames,
            sources=([figures.picture_source(f) for f in frames], frames[0].shape[:2]),
            labels=labels,
            gif=animation.gif_bytes(frames, fps),
            mp4=animation.mp4_bytes(frames, fps),
        )
    return slot


def motion_section(ctx: Ctx, s: report.Settings, opts: dict) -> None:
    """Layers in motion: the rollout after each layer, or one head through the layers, played as
    an animation (play, pause, a slider that moves while playing) and exported as GIF or MP4."""
    c = ctx.lm.config
    st.markdown("**Layers in motion**")
    a, b = st.columns([2, 1])
    what = state.radio(
        "Play",
        list(MOTION),
        state.DEFAULTS["mo_what"],
        key="mo_what",
        container=a,
        format_func=MOTION.get,
        horizontal=True,
    )
    with b:
        fps = state.slider("Frames per second", 1, 10, state.DEFAULTS["mo_fps"], key="mo_fps")
    with st.spinner("Drawing the frames..."):
        files = motion_files(ctx, what, s, opts, int(fps))
    st.plotly_chart(
        figures.animation(files["sources"], [str(i + 1) for i in range(c.depth)], fps=fps, slider_name="layer"),
        key="mo_anim",
        config=NO_TOOLBAR,
    )
    st.caption(
        "Each frame from 0 to its own maximum (its colour bar beside it); the exports hold the same frames. "
        "MP4: MPEG-4 Part 2, which plays in VLC, mpv and QuickTime, not in every browser."
    )
    x, y = st.columns(2)
    x.download_button("Animation (GIF)", files["gif"], file_name=f"{what}_layers.gif", mime="image/gif", key="mo_gif")
    y.download_button("Animation (MP4)", files["mp4"], file_name=f"{what}_layers.mp4", mime="video/mp4", key="mo_mp4")


def on_strip_click(depth: int) -> None:
    """Callback of the per-layer strip: the rollout ends at the clicked layer."""
    points = clicked_points(chart_key("ro_strip"))
    next_chart("ro_strip")
    tile = clicked_tile(points, depth)
    if tile is not None:
        last = tile[1] + 1
        first = state.read("ro_layers", (1, depth))[0]
        st.session_state["ro_layers"] = (min(first, last), last)
