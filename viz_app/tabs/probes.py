"""Probes: causal tests of what the model uses for this image.

Head ablation: heads clicked on the layer x head grid are removed (their output zeroed, or replaced
by its mean over the image's tokens, before the block's projection); the prediction, the target
logit and the rollout of the ablated model stand next to the full model's, with the logit change
of each removed head alone and of all of them together. "Rank heads" removes every head alone
(one batched pass per layer) and draws the logit drops as a layer x head map.

Token dropping: patches clicked on the model's view, and those outside the top share of a map, are
dropped from the sequence (the prefix tokens stay); the prediction and the maps of the remaining
tokens stand next to the full image's.

Both are arguments of the model's forward (viz_app/probes.py), never a write to the shared model.
Layers and heads are counted from 1; patches are row-major indices from 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import colormaps, figures, probes, render, report
from viz_app.pipeline import run_forward
from viz_app.tabs import state
from viz_app.tabs.common import (
    NO_TOOLBAR,
    Ctx,
    chart_key,
    clicked_points,
    clicked_tile,
    display_settings,
    next_chart,
    rollout_map,
    rollout_settings,
    target_class,
)

FILLS = {
    "zero": "the head's output is set to 0 before the block's output projection",
    "mean": "the head's output is replaced by its mean over this image's tokens (a per-image mean ablation)",
}
KEEP_MAPS = ("rollout", "gradient rollout", "last layer")
DROP_VIEWS = ("rollout", "last layer")
MEMO_SIZE = 4  # ablated or token-dropped runs kept per session (their attention maps are large)


# ---- state ---------------------------------------------------------------------------------------


def removed_heads(config) -> list[tuple[int, int]]:
    """The kept pr_ablate (flat layer, head pairs counted from 1) as sorted pairs that exist in this
    model; anything else in it (an odd tail, text, a head of a larger model) is left out."""
    flat = state.read("pr_ablate") or ()
    pairs = set()
    try:
        values = [int(v) for v in flat]
    except (TypeError, ValueError):
        return []
    for i in range(0, len(values) - 1, 2):
        layer, head = values[i], values[i + 1]
        if 1 <= layer <= config.depth and 1 <= head <= config.num_heads:
            pairs.add((layer, head))
    return sorted(pairs)


def _store_heads(pairs) -> None:
    st.session_state["pr_ablate"] = tuple(v for pair in sorted(set(pairs)) for v in pair)


def toggle_head(config, layer: int, head: int) -> None:
    """Remove the head if it is kept, restore it if it is removed."""
    pairs = set(removed_heads(config))
    pairs.symmetric_difference_update({(layer, head)})
    _store_heads(pairs)


def dropped_patches(num_patches: int) -> list[int]:
    """The kept pr_drop (row-major patch indices) as sorted indices inside this model's grid."""
    try:
        values = {int(v) for v in (state.read("pr_drop") or ())}
    except (TypeError, ValueError):
        return []
    return sorted(v for v in values if 0 <= v < num_patches)


def toggle_patch(num_patches: int, index: int) -> None:
    found = set(dropped_patches(num_patches))
    found.symmetric_difference_update({index})
    st.session_state["pr_drop"] = tuple(sorted(found))


def on_head_click(chart: str, config) -> None:
    """Callback of both layer x head grids (the heads and the ranking): toggle the clicked head."""
    points = clicked_points(chart_key(chart))
    next_chart(chart)
    tile = clicked_tile(points, config.num_heads)
    if tile is not None and 0 <= tile[0] < config.depth:
        toggle_head(config, tile[0] + 1, tile[1] + 1)


def on_patch_click(config) -> None:
    """Callback of the patch picker: toggle the clicked patch in the dropped set."""
    points = clicked_points(chart_key("pr_view"))
    next_chart("pr_view")
    if not points:
        return
    try:
        row, col, _ = render.patch_at(
            float(points[0]["x"]), float(points[0]["y"]), patch_size=config.patch_size, grid=config.grid, num_prefix=0
        )
    except (KeyError, TypeError, ValueError):
        return  # a click on the margin
    toggle_patch(config.num_patches, row * config.grid[1] + col)


def _clear(key: str) -> None:
    st.session_state[key] = ()


def head_name(layer: int, head: int) -> str:
    return f"layer {layer}, head {head}"


# ---- computation (memoized per session: the model and the image are shared, these are not) ------


def _memo(ctx: Ctx, what: str, key: tuple, compute: Callable[[], object]):
    """compute() once per (model, device, precision, image, what, key) in this session; the most
    recent MEMO_SIZE results are kept."""
    memo = st.session_state.setdefault("pr_memo", {})
    full = (ctx.source, str(ctx.lm.device), str(ctx.lm.dtype), ctx.image_digest, what, key)
    if full in memo:
        memo[full] = memo.pop(full)  # most recently used last
        return memo[full]
    value = compute()
    memo[full] = value
    while len(memo) > MEMO_SIZE:
        memo.pop(next(iter(memo)))
    return value


def run_probe(ctx: Ctx, *, heads: Sequence[tuple[int, int]] = (), fill: str = "zero", keep=None) -> dict:
    """One forward pass with the heads removed and/or only the `keep` patches in the sequence:
    logits (C,) or None and the attention maps (L, H, T', T'), float32 on the CPU."""
    mask = probes.head_mask_for(ctx.lm.config, list(heads))
    keep_t = None if keep is None else torch.as_tensor(np.asarray(keep, np.int64))
    fwd = run_forward(ctx.lm.model, ctx.pixels, keep=keep_t, head_mask=mask, head_fill=fill)
    return {
        "logits": None if fwd.logits is None else fwd.logits[0].cpu().numpy(),
        "attentions": fwd.attentions[0].cpu(),
    }


def rank_heads(ctx: Ctx, target: int, fill: str, base: Sequence[tuple[int, int]], progress) -> np.ndarray:
    """(L, H) drop of the target logit when each head alone is removed on top of `base`."""
    return probes.head_effects(
        ctx.lm.model,
        ctx.pixels,
        target,
        base_mask=probes.head_mask_for(ctx.lm.config, list(base)),
        head_fill=fill,
        progress=progress,
    )


def _rollout(ctx: Ctx, attentions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Rollout with the Rollout tab's settings of (L, H, T, T) maps on `grid` -> (gh, gw)."""
    options = report.rollout_options(ctx.lm.config, rollout_settings(ctx))
    options["grid"] = grid
    return A.attention_rollout(attentions[None], **options)[0].numpy()


def _last_layer(ctx: Ctx, attentions: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    c = ctx.lm.config
    maps = A.attention_maps(attentions[-1], num_prefix=c.num_prefix_tokens, grid=grid, readout_tokens=c.readout_tokens)
    return maps.mean(0).numpy()


def _settings_text(ctx: Ctx) -> str:
    s = rollout_settings(ctx)
    first, last = s.layer_range(ctx.lm.config.depth)
    return (
        f"layers {first}-{last}, {s.rollout_fusion} fusion, discard {s.rollout_discard:.2f}, "
        f"read-out {s.rollout_readout} (the Rollout tab's settings)"
    )


# ---- figures and pictures --------------------------------------------------------------------------


def _with_shapes(fig: go.Figure, shapes: list[dict]) -> go.Figure:
    spec = fig.to_plotly_json()
    layout = dict(spec.get("layout", {}))
    layout["shapes"] = list(layout.get("shapes") or ()) + shapes
    return go.Figure(dict(data=spec["data"], layout=layout), _validate=False)


def removed_marks(boxes: list[tuple[float, float, float, float]]) -> list[dict]:
    """An X with an outline over each (x0, x1, y0, y1) box: white under black, so that it shows
    on dark and on light cells alike."""
    shapes = []
    for x0, x1, y0, y1 in boxes:
        for color, width in (("white", 5), ("black", 2)):
            line = dict(color=color, width=width)
            shapes.append(dict(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=line))
            shapes.append(dict(type="line", x0=x0, x1=x1, y0=y0, y1=y1, line=line))
            shapes.append(dict(type="line", x0=x0, x1=x1, y0=y1, y1=y0, line=line))
    return shapes


def heads_grid_figure(tiles: np.ndarray, removed: Sequence[tuple[int, int]]) -> go.Figure:
    """(L, H, gh, gw) head maps as the clickable grid of figures.tile_figure, removed heads crossed out."""
    L, H, h, w = tiles.shape
    fig = figures.tile_figure(
        tiles,
        row_name="layer",
        col_name="head",
        colorbar_title="share of max",
        height=int(90 + L * min(64, max(34, 480 / L))),
    )
    boxes = []
    for layer, head in removed:
        x0, y0 = (head - 1) * (w + 1) - 0.5, (layer - 1) * (h + 1) - 0.5
        boxes.append((x0, x0 + w, y0, y0 + h))
    fig = _with_shapes(fig, removed_marks(boxes))
    # fixed ranges: autorange would pad the axes for the large transparent markers, which shrinks
    # the square grid to a thumbnail in a narrow column
    fig.layout.xaxis.update(range=[-0.5, H * (w + 1) - 1.5], autorange=False)
    fig.layout.yaxis.update(range=[L * (h + 1) - 1.5, -0.5], autorange=False)
    fig.data[0].colorbar.title.side = "right"  # along the bar: the grid keeps the column's width
    return fig


def rank_figure(drops: np.ndarray, removed: Sequence[tuple[int, int]]) -> go.Figure:
    """(L, H) logit drops as a heat map (blue-white-red, 0 white) with a transparent marker on every
    cell, in row-major order as the figure's second trace (common.clicked_tile reads it)."""
    L, H = drops.shape
    cmap = colormaps.get(colormaps.DEFAULT_DIVERGING)
    zmin, zmax = colormaps.value_range(drops, "diverging")
    rr, cc = np.mgrid[0:L, 0:H]
    heat = dict(
        type="heatmap",
        z=np.asarray(drops, np.float64),
        x=list(range(1, H + 1)),
        y=list(range(1, L + 1)),
        zmin=zmin,
        zmax=zmax,
        colorscale=cmap.plotly_scale(),
        colorbar=dict(title=dict(text="logit drop"), thickness=12),
        hoverinfo="skip",
    )
    points = dict(
        type="scatter",
        x=(cc + 1).ravel(),
        y=(rr + 1).ravel(),
        mode="markers",
        marker=dict(size=max(8, min(30, 420 // max(L, H))), color="rgba(255,255,255,0.01)", symbol="square"),
        text=[f"layer {r + 1}, head {c + 1}: drop {drops[r, c]:+.4g}" for r, c in zip(rr.ravel(), cc.ravel())],
        hovertemplate="%{text}<extra></extra>",
        showlegend=False,
    )
    boxes = [(h - 0.5, h + 0.5, la - 0.5, la + 0.5) for la, h in removed]
    layout = dict(
        height=int(80 + L * min(40, max(18, 420 / L))),
        margin=dict(l=10, r=10, t=10, b=10),
        clickmode="event+select",
        dragmode=False,
        shapes=removed_marks(boxes),
        # fixed ranges (autorange would pad them for the transparent markers)
        xaxis=dict(
            title=dict(text="head"),
            range=[0.5, H + 0.5],
            dtick=1 if H <= 16 else None,
            side="top",
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(
            title=dict(text="layer"), range=[L + 0.5, 0.5], dtick=1 if L <= 16 else None, showgrid=False, zeroline=False
        ),
    )
    return go.Figure(dict(data=[heat, points], layout=layout), _validate=False)


def drop_view_figure(ctx: Ctx, clicked: Sequence[int], outside: Sequence[int]) -> go.Figure:
    """The patch picker (figures.clickable_view) with the dropped patches greyed: clicked ones
    dark with an X, those outside the map's top share lighter."""
    c = ctx.lm.config
    p, gw = c.patch_size, c.grid[1]
    fig = figures.clickable_view(ctx.result.prepared.view, p, num_prefix=c.num_prefix_tokens, selected=None)
    shapes = []
    for idx, fill in [(i, "rgba(120,120,120,0.55)") for i in outside] + [(i, "rgba(70,70,70,0.8)") for i in clicked]:
        r, col = divmod(int(idx), gw)
        shapes.append(
            dict(
                type="rect",
                x0=col * p,
                x1=(col + 1) * p,
                y0=r * p,
                y1=(r + 1) * p,
                fillcolor=fill,
                line=dict(width=0),
            )
        )
    for idx in clicked:
        r, col = divmod(int(idx), gw)
        x0, y0 = col * p, r * p
        line = dict(color="white", width=1.5)
        shapes.append(dict(type="line", x0=x0, x1=x0 + p, y0=y0, y1=y0 + p, line=line))
        shapes.append(dict(type="line", x0=x0, x1=x0 + p, y0=y0 + p, y1=y0, line=line))
    return _with_shapes(fig, shapes)


def map_picture(
    ctx: Ctx, heat: np.ndarray, *, vmax: float, opts: dict, label: str, method: str | None = None
) -> np.ndarray:
    """The map over the model's view from 0 to vmax with its colour bar; NaN patches (dropped
    tokens, or values that are not finite) drawn in render's no-value pattern, at the enlarged
    size. Small views are enlarged (nearest) to 224 px."""
    c = ctx.lm.config
    view = ctx.result.prepared.view
    method = method or (opts["method"] if opts["method"] in ("nearest", "bilinear") else "nearest")
    missing = ~np.isfinite(heat)
    vmax = render.finite_max(np.asarray(vmax))
    img = render.overlay(
        view,
        np.where(missing, 0.0, heat),
        method=method,
        alpha=opts["alpha"],
        cmap=opts["cmap"],
        patch_size=c.patch_size,
        vmin=0.0,
        vmax=vmax,
    )
    img, scale = render.enlarge(img, 224)
    if missing.any():
        ps = c.patch_size * scale
        gh, gw = heat.shape
        full = np.kron(missing, np.ones((ps, ps), dtype=bool))[: img.shape[0], : img.shape[1]]
        img = render.paint_no_value(img.copy(), full)
    bar = render.colorbar(img.shape[0], cmap=opts["cmap"], vmin=0.0, vmax=vmax, label=label)
    return np.concatenate([img, bar], axis=1)


# ---- tables --------------------------------------------------------------------------------------


def top5_rows(ctx: Ctx, logits: np.ndarray, target: int, who: str) -> dict[str, list]:
    """The five most likely classes (probability and logit), then the target class if it is not
    among them."""
    probs = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1).numpy()
    order = [int(i) for i in np.argsort(-logits, kind="stable")[:5]]
    if target not in order:
        order.append(target)
    value = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (an empty cell: no value)
    return {
        f"class ({who})": [ctx.label(i) + (" (target)" if i == target else "") for i in order],
        "probability": [value(probs[i]) for i in order],
        "logit": [value(logits[i]) for i in order],
    }


PROB_COLUMNS = {
    "probability": st.column_config.NumberColumn("probability", format="%.4g"),
    "logit": st.column_config.NumberColumn("logit", format="%.3f"),
}


def show_prediction(ctx: Ctx, logits: np.ndarray, target: int, *, who: str) -> None:
    """The top-5 table; its first column is named 'class (<who>)'."""
    st.dataframe(top5_rows(ctx, logits, target, who), hide_index=True, column_config=PROB_COLUMNS)


# ---- the tab -------------------------------------------------------------------------------------


def draw(ctx: Ctx) -> None:
    st.subheader("Head ablation")
    try:
        draw_ablation(ctx)
    except (ValueError, RuntimeError) as e:  # a model run that failed (memory, a device error)
        st.error(f"Head ablation failed: {e}")
    st.divider()
    st.subheader("Token dropping")
    if state.read("pr_ablate"):
        st.caption("Token dropping runs the full model: the heads removed above are not removed here.")
    try:
        draw_dropping(ctx)
    except (ValueError, RuntimeError) as e:
        st.error(f"Token dropping failed: {e}")


def draw_ablation(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    removed = removed_heads(c)
    if tuple(v for pair in removed for v in pair) != tuple(state.read("pr_ablate") or ()):
        _store_heads(removed)  # what does not fit this model is dropped (the Faithfulness tab reads it too)
    target = target_class(ctx)
    left, right = st.columns([1.5, 1])
    with left:
        st.markdown("**Heads** (click a tile to remove the head, click again to restore it)")
        maps = A.attention_maps(r.attentions, readout_tokens=c.readout_tokens, **ctx.kw).numpy()  # (L, H, gh, gw)
        tiles = render.share_of_max(maps)
        st.plotly_chart(
            heads_grid_figure(tiles, removed),
            key=chart_key("pr_heads"),
            on_select=lambda: on_head_click("pr_heads", c),
            selection_mode="points",
            config=NO_TOOLBAR,
        )
        st.caption(
            "Each tile: the head's attention of the read-out token in the full model, from 0 to its own "
            "maximum. Crossed out: removed heads."
        )
    with right:
        fill = state.radio(
            "A removed head leaves",
            list(FILLS),
            state.DEFAULTS["pr_fill"],
            key="pr_fill",
            horizontal=True,
            captions=["zeros", "its mean over the tokens"],
            help="zero: " + FILLS["zero"] + ". mean: " + FILLS["mean"] + ".",
        )
        a, b = st.columns([2, 1])
        a.markdown(
            f"**Removed: {len(removed)} of {c.depth * c.num_heads} heads**"
            + (": " + "; ".join(f"L{la}H{h}" for la, h in removed) if removed else "")
        )
        b.button("Clear", key="pr_clear_heads", on_click=_clear, args=("pr_ablate",), disabled=not removed)
        if target is None:
            st.info("This model has no classifier: there is no prediction or logit to follow, only the rollout.")
        else:
            effects_panel(ctx, removed, fill, target)
    ablated = (
        _memo(ctx, "ablate", (tuple(removed), fill), lambda: run_probe(ctx, heads=removed, fill=fill))
        if removed
        else None
    )
    a, b = st.columns(2)
    with a:
        st.markdown("**Full model**")
    with b:
        st.markdown(f"**Without {len(removed)} head{'s' if len(removed) != 1 else ''}** ({fill} fill)")
    if target is not None:
        with a:
            show_prediction(ctx, r.forward.logits[0].numpy(), target, who="full model")
        with b:
            if ablated is None:
                st.info("Click tiles of the grid to remove heads.")
            else:
                show_prediction(ctx, ablated["logits"], target, who="ablated")
        st.caption(
            "Top-5 classes (and the target class if it is not among them): probability after softmax and the raw logit."
        )
    full_map = rollout_map(ctx, rollout_settings(ctx))
    abl_map = None if ablated is None else _rollout(ctx, ablated["attentions"], c.grid)
    vmax = render.finite_max(full_map if abl_map is None else np.stack([full_map, abl_map]))
    opts = display_settings()
    a, b = st.columns(2)
    a.image(map_picture(ctx, full_map, vmax=vmax, opts=opts, label="rollout"), width="stretch")
    if abl_map is not None:
        b.image(map_picture(ctx, abl_map, vmax=vmax, opts=opts, label="rollout"), width="stretch")
    st.caption(
        f"Attention rollout, {_settings_text(ctx)}; both maps on one scale, 0 (darkest) to the larger "
        "maximum. The ablated model's maps are those its heads compute with the removed heads' outputs gone "
        "(the removed heads' own maps still count in the rollout)."
    )
    if target is not None:
        rank_panel(ctx, removed, fill, target)


def effects_panel(ctx: Ctx, removed: list[tuple[int, int]], fill: str, target: int) -> None:
    """Target logit before/after and the drop of each removed head alone and of all together."""
    before = float(ctx.result.forward.logits[0, target])
    name = ctx.label(target)
    if not removed:
        st.metric(f"Logit of '{name}'", f"{before:.3f}")
        st.caption(
            "The target class is the Rollout tab's class of the gradient rollout (the top-1 by default). "
            "Remove heads to see how its logit changes."
        )
        return
    ablated = _memo(ctx, "ablate", (tuple(removed), fill), lambda: run_probe(ctx, heads=removed, fill=fill))
    after = float(ablated["logits"][target])
    st.metric(f"Logit of '{name}', heads removed", f"{after:.3f}", f"{after - before:+.3f} vs full model")
    alone = _memo(
        ctx,
        "alone",
        (tuple(removed), fill, target),
        lambda: probes.head_effects(ctx.lm.model, ctx.pixels, target, heads=removed, head_fill=fill),
    )
    rows = {
        "removed": [head_name(la, h) for la, h in removed],
        "logit drop": [float(v) for v in alone],
    }
    if len(removed) > 1:
        rows["removed"].append(f"all {len(removed)} together")
        rows["logit drop"].append(before - after)
    st.dataframe(
        rows,
        hide_index=True,
        column_config={"logit drop": st.column_config.NumberColumn("logit drop", format="%+.4f")},
    )
    st.caption(
        f"Logit drop = the target logit of the full model ({before:.3f}) minus its logit with the head removed "
        "alone (one row per head)"
        + (" or with all of them removed at once (last row)" if len(removed) > 1 else "")
        + ". Positive: the head supported the class"
        + ("; the heads interact, so the rows need not add up to the last one." if len(removed) > 1 else ".")
    )


def rank_panel(ctx: Ctx, removed: list[tuple[int, int]], fill: str, target: int) -> None:
    c = ctx.lm.config
    memo = st.session_state.setdefault("pr_ranks", {})
    model_key = (ctx.source, str(ctx.lm.device), str(ctx.lm.dtype), ctx.image_digest)
    key = (*model_key, target, fill, tuple(removed))
    st.markdown("**Rank heads**: remove each head alone and measure the drop of the target logit")
    a, b = st.columns([1, 3])
    go_ = a.button(
        "Rank heads", key="pr_rank", help=f"{c.depth} batched passes of {c.num_heads} images (one per layer)"
    )
    if go_ and key not in memo:
        bar = b.progress(0.0, text="Ranking heads...")
        drops = rank_heads(
            ctx,
            target,
            fill,
            removed,
            lambda f: bar.progress(min(1.0, f), text=f"Ranking heads: {f:.0%}"),
        )
        bar.empty()
        memo[key] = drops
        while len(memo) > MEMO_SIZE:
            memo.pop(next(iter(memo)))
    # the latest ranking of this model and image, fresh or not
    found = [(k, v) for k, v in memo.items() if k[:4] == model_key]
    if not found:
        b.caption(f"Takes {c.depth} batched forward passes; the result is kept for this model, image, class and fill.")
        return
    shown, drops = (key, memo[key]) if key in memo else found[-1]
    r_target, r_fill, r_base = shown[4:]
    base = "no heads removed" if not r_base else "on top of " + "; ".join(f"L{la}H{h}" for la, h in r_base)
    stale = (r_target, r_fill, r_base) != (target, fill, tuple(removed))
    if stale:
        b.warning(
            "This ranking was made before the last change of class, fill or removed heads: press Rank heads to update it."
        )
    st.plotly_chart(
        rank_figure(drops, removed),
        key=chart_key("pr_rank_grid"),
        on_select=lambda: on_head_click("pr_rank_grid", c),
        selection_mode="points",
        config=NO_TOOLBAR,
    )
    order = np.argsort(-drops, axis=None, kind="stable")[:3]
    top = ", ".join(f"L{i // c.num_heads + 1}H{i % c.num_heads + 1} ({drops.flat[i]:+.3f})" for i in order)
    st.caption(
        f"Drop of the logit of '{ctx.label(r_target)}' when each head alone is removed ({r_fill} fill, {base}): "
        "logit before minus logit after, in logit units. Red: the head supports the class; blue: removing it raises "
        f"the logit; white: no effect (the colours are symmetric around 0). Largest drops: {top}. "
        "Click a cell to remove or restore that head."
    )


def draw_dropping(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    N = c.num_patches
    clicked = dropped_patches(N)
    if list(state.read("pr_drop") or ()) != clicked:
        st.session_state["pr_drop"] = tuple(clicked)
    target = target_class(ctx)
    left, right = st.columns([1.3, 1])
    with right:
        choices = [m for m in KEEP_MAPS if m != "gradient rollout" or target is not None]
        which = state.radio(
            "Map for the top share",
            choices,
            choices[0],
            key="pr_keep_map",
            horizontal=True,
            help="rollout with the Rollout tab's settings; gradient rollout for the target class; the last "
            "layer's attention of the read-out token, mean of its heads",
        )
        share = state.slider(
            "Keep only the top share of the map",
            0.05,
            1.0,
            state.DEFAULTS["pr_keep_top"],
            key="pr_keep_top",
            step=0.05,
            help="drop every patch outside this share of the patches where the map is highest; 1.0 keeps all",
        )
        if share < 1.0:
            if which == "rollout":
                heat = rollout_map(ctx, rollout_settings(ctx))
            elif which == "gradient rollout":
                with st.spinner("One backward pass for the class..."):
                    heat = ctx.gradient_map(int(target))
            else:
                heat = _last_layer(ctx, r.attentions, c.grid)
            top = probes.top_share_keep(heat, share)
        else:
            top = np.arange(N)
        kept = np.array(sorted(set(top.tolist()) - set(clicked)), np.int64)
        outside = sorted(set(range(N)) - set(top.tolist()) - set(clicked))
        st.markdown(
            f"**Kept {len(kept)} of {N} patches**: {len(clicked)} dropped by clicking, "
            f"{len(outside)} outside the top {share:.0%} of the {which} map."
        )
        st.caption(
            (f"The prefix tokens ({', '.join(c.prefix_names)}) always stay. " if c.num_prefix_tokens else "")
            + "Dropped tokens leave the sequence after the position embeddings are added: the remaining ones keep "
            "their positions."
        )
    with left:
        st.markdown("**The model's view** (click a patch to drop it, click again to bring it back)")
        st.plotly_chart(
            drop_view_figure(ctx, clicked, outside),
            key=chart_key("pr_view"),
            on_select=lambda: on_patch_click(c),
            selection_mode="points",
            config=NO_TOOLBAR,
        )
        a, b = st.columns([2, 1])
        a.caption("Dark with an X: dropped by clicking. Light grey: outside the map's top share.")
        b.button("Clear", key="pr_clear_drop", on_click=_clear, args=("pr_drop",), disabled=not clicked)
    if len(kept) == N:
        st.info("Every patch is kept: click patches or lower the top share to drop some.")
        return
    if len(kept) < ctx.lm.model.min_kept_patches:
        st.warning(
            "Every patch is dropped, and this model pools its patch tokens: it needs at least "
            f"{ctx.lm.model.min_kept_patches} patch kept. Bring a patch back or raise the top share."
        )
        return
    probe = _memo(ctx, "keep", tuple(kept.tolist()), lambda: run_probe(ctx, keep=kept))
    a, b = st.columns(2)
    a.markdown("**Full image**")
    b.markdown(f"**Remaining {len(kept)} patch tokens**")
    if target is not None:
        with a:
            show_prediction(ctx, r.forward.logits[0].numpy(), target, who="full image")
        with b:
            show_prediction(ctx, probe["logits"], target, who="kept tokens")
        st.caption(
            "Top-5 classes (and the target class if it is not among them): probability and logit, of the full "
            "image and of the sequence with the dropped patches' tokens removed."
        )
    view = state.radio("Map", list(DROP_VIEWS), DROP_VIEWS[0], key="pr_drop_map", horizontal=True)
    if view == "rollout":
        full = rollout_map(ctx, rollout_settings(ctx))
        part = _rollout(ctx, probe["attentions"], (1, len(kept))).reshape(-1) if len(kept) else np.zeros(0)
        what = f"Attention rollout, {_settings_text(ctx)}"
    else:
        full = _last_layer(ctx, r.attentions, c.grid)
        part = _last_layer(ctx, probe["attentions"], (1, len(kept))).reshape(-1) if len(kept) else np.zeros(0)
        what = "The last layer's attention of the read-out token, mean of its heads"
    scattered = probes.scatter_kept(part, kept, c.grid)
    vmax = render.finite_max(np.stack([full, scattered]))
    opts = display_settings()
    a, b = st.columns(2)
    a.image(map_picture(ctx, full, vmax=vmax, opts=opts, label=view, method="nearest"), width="stretch")
    b.image(map_picture(ctx, scattered, vmax=vmax, opts=opts, label=view, method="nearest"), width="stretch")
    st.caption(
        f"{what}; left of the full image, right of the remaining tokens, put back at their patches. Hatched grey: "
        "dropped patches, which have no value (they were not in the sequence). Both on one scale, 0 (darkest) to "
        "the larger maximum; one flat block per patch."
    )
