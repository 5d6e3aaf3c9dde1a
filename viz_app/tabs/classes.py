"""Classes: the class-specific maps of the top-k classes side by side on one colour scale, and the
contrastive map of two classes (share of A's relevance minus share of B's).

The maps are results.CLASS_MAPS's (gradient rollout, Chefer et al. ICCV 2021, or Transformer
Attribution, Chefer et al. CVPR 2021), one backward pass per class, cached per (image, class, method)
by ctx.class_map; the method is the kept setting ro_method, shared with the Rollout tab.
Upsampling, colour map and opacity are the Rollout tab's (common.display_settings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import colormaps, render
from viz_app.results import CLASS_MAPS
from viz_app.tabs import state
from viz_app.tabs.common import Ctx, display_settings, method_select
from viz_app.tabs.rollout import percent

MAX_K = 10  # most classes side by side
PER_ROW = 5  # maps a row
MIN_SLOTS = 3  # a row is at least this many maps wide (one map alone is not drawn page-wide)
MIN_SIDE = 224  # small inputs enlarged (nearest) to at least this, as common.show_map does
NO_CLASSIFIER = "Class-specific maps need a classifier head; this model has none."
CONTRAST_CAPTION = "share of A's relevance minus share of B's; red: more for A, blue: more for B"
CONTRAST_LABEL = "share A - share B"


# ---- what is chosen ------------------------------------------------------------------------------


def has_classifier(ctx: Ctx) -> bool:
    return ctx.lm.config.num_classes > 0 and ctx.result.probs is not None


def _method(value) -> str:
    return value if value in CLASS_MAPS else state.DEFAULTS["ro_method"]


def _class(value, num_classes: int, default: int) -> int:
    """A kept class index that fits the model, else the default."""
    try:
        i = int(value)
    except (TypeError, ValueError):
        return default
    return i if 0 <= i < num_classes and not isinstance(value, bool) else default


def ranked(ctx: Ctx, k: int) -> list[int]:
    """The k most probable classes, most probable first (torch.topk, as the report's top-5)."""
    probs = torch.from_numpy(np.asarray(ctx.result.probs, np.float32))
    return [int(i) for i in probs.topk(min(k, probs.shape[-1])).indices]


def k_limit(ctx: Ctx) -> int:
    return min(MAX_K, ctx.lm.config.num_classes)


def chosen(ctx: Ctx) -> tuple[str, list[int], tuple[int, int]]:
    """(method, the k classes, (A, B)) as the tab has them now, read with state.read (so also when
    the tab is not open): the kept ro_method, cl_k clamped to 1..min(10, C), the k most probable
    classes, and cl_a / cl_b where they fit the model, else the top-1 and top-2 classes (top-1 for
    both when the model has one class). A model without a classifier: (method, [], (-1, -1))."""
    method = _method(state.read("ro_method"))
    if not has_classifier(ctx):
        return method, [], (-1, -1)
    C = ctx.lm.config.num_classes
    try:
        k = min(max(int(state.read("cl_k")), 1), k_limit(ctx))
    except (TypeError, ValueError):
        k = min(state.DEFAULTS["cl_k"], k_limit(ctx))
    order = ranked(ctx, max(k, 2))
    a = _class(state.read("cl_a"), C, order[0])
    b = _class(state.read("cl_b"), C, order[1] if len(order) > 1 else order[0])
    return method, order[:k], (a, b)


# ---- computation ---------------------------------------------------------------------------------


def class_maps(
    ctx: Ctx, method: str, classes: Sequence[int], progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """(k, gh, gw) float32: ctx.class_map of each class, in the order given. progress(done, total)
    is called after each class (one backward pass each, unless cached)."""
    gh, gw = ctx.lm.config.grid
    maps = []
    for i, cls in enumerate(classes):
        maps.append(np.asarray(ctx.class_map(int(cls), method), np.float32))
        if progress is not None:
            progress(i + 1, len(classes))
    return np.stack(maps) if maps else np.zeros((0, gh, gw), np.float32)


def contrast(map_a: np.ndarray, map_b: np.ndarray) -> np.ndarray:
    """(gh, gw) float32: analysis.contrastive_map of two class maps."""
    return np.asarray(A.contrastive_map(np.asarray(map_a, np.float32), np.asarray(map_b, np.float32)), np.float32)


def report_arrays(ctx: Ctx) -> dict[str, np.ndarray]:
    """What the tab shows, for the report: class_maps (k, gh, gw) float32 and class_map_classes (k,)
    int64 (most probable first), contrastive_map (gh, gw) float32 and contrastive_classes (2,) int64
    (A, B). Empty for a model without a classifier."""
    method, classes, (a, b) = chosen(ctx)
    if not classes:
        return {}
    maps = class_maps(ctx, method, classes)
    return {
        "class_maps": maps,
        "class_map_classes": np.asarray(classes, np.int64),
        "contrastive_map": contrast(ctx.class_map(a, method), ctx.class_map(b, method)),
        "contrastive_classes": np.asarray([a, b], np.int64),
    }


# ---- pictures ------------------------------------------------------------------------------------


def enlarged(img: np.ndarray) -> np.ndarray:
    """A small picture enlarged (nearest, whole factor) to at least MIN_SIDE, as on the Rollout tab."""
    return render.enlarge(img, MIN_SIDE)[0]


def shared_max(maps: np.ndarray) -> float:
    """The top of the one colour scale of the maps shown together: their largest finite value."""
    return render.finite_max(maps)


def tiles(ctx: Ctx, maps: np.ndarray, opts: dict) -> list[np.ndarray]:
    """The overlay of each map on the model's view, one scale (0 to shared_max), enlarged for the page."""
    vmax = shared_max(maps)
    view, p = ctx.result.prepared.view, ctx.lm.config.patch_size
    return [enlarged(render.overlay(view, m, vmin=0.0, vmax=vmax, patch_size=p, **opts)) for m in maps]


def scale_bar(height: int, maps: np.ndarray, opts: dict) -> np.ndarray:
    """The colour bar of the shared scale, `height` px tall."""
    if opts["method"] == "paper":
        return render.colorbar(height, cmap="inferno", vmin=0.0, vmax=1.0, label="mask (share of the largest value)")
    return render.colorbar(height, cmap=opts["cmap"], vmin=0.0, vmax=shared_max(maps), label="relevance")


def class_title(ctx: Ctx, cls: int) -> str:
    """'name (prob%)', as the Rollout tab labels a class."""
    return f"{ctx.label(cls)} ({percent(float(ctx.result.probs[cls]))})"


def grey(view: np.ndarray) -> np.ndarray:
    """The view in grey (ITU-R BT.601 luminance, 3 channels): under the diverging colours, the
    image's own reds and blues would read as values."""
    lum = view[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((lum + 0.5).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def contrast_overlay(ctx: Ctx, heat: np.ndarray, opts: dict) -> np.ndarray:
    """The contrastive map over the model's view in grey, in the diverging colours from -m to m (m
    the largest absolute value): 0 is white. 'paper' (an alpha mask for one-signed maps) is drawn
    bilinear."""
    vmin, vmax = colormaps.value_range(heat, "diverging")
    method = "bilinear" if opts["method"] == "paper" else opts["method"]
    return render.overlay(
        grey(ctx.result.prepared.view),
        heat,
        method=method,
        alpha=opts["alpha"],
        cmap=colormaps.DEFAULT_DIVERGING,
        patch_size=ctx.lm.config.patch_size,
        vmin=vmin,
        vmax=vmax,
    )


def contrast_figure(
    view: np.ndarray,
    heat: np.ndarray,
    share_a: np.ndarray,
    share_b: np.ndarray,
    *,
    patch_size: int,
    alpha: float,
    smooth: bool,
    names: tuple[str, str],
) -> go.Figure:
    """The contrastive map (gh, gw) as a heat map over the view (pass it in grey): one cell a patch, the
    diverging colours from -m to m (m its largest absolute value, 0 white), `alpha` its opacity;
    hover gives the patch, both shares and their difference. NaN cells are blank (the view shows)."""
    gh, gw = heat.shape
    H, W = view.shape[:2]
    vmin, vmax = colormaps.value_range(heat, "diverging")
    rr, cc = np.mgrid[0:gh, 0:gw]
    z = np.array(heat, np.float64)
    z[~np.isfinite(z)] = np.nan
    custom = np.stack([rr, cc, 100 * np.asarray(share_a, np.float64), 100 * np.asarray(share_b, np.float64)], -1)
    a, b = names
    image = dict(type="image", z=np.asarray(view), x0=0.5, y0=0.5, hoverinfo="skip")  # pixel i spans [i, i + 1]
    cells = dict(
        type="heatmap",
        z=z,
        x0=patch_size / 2,
        dx=patch_size,
        y0=patch_size / 2,
        dy=patch_size,
        zmin=vmin,
        zmax=vmax,
        zsmooth="best" if smooth else False,
        opacity=alpha,
        colorscale=colormaps.get(colormaps.DEFAULT_DIVERGING).plotly_scale(),
        colorbar=dict(title=dict(text=CONTRAST_LABEL), thickness=12),
        customdata=custom,
        hovertemplate=(
            "patch row %{customdata[0]}, col %{customdata[1]}"
            f"<br>share of {_hover_safe(a)}: %{{customdata[2]:.2f}}%"
            f"<br>share of {_hover_safe(b)}: %{{customdata[3]:.2f}}%"
            "<br>difference %{z:+.4f}<extra></extra>"
        ),
    )
    layout = dict(
        title=dict(text=f"Share of '{_hover_safe(a)}' minus share of '{_hover_safe(b)}'", font=dict(size=14)),
        height=460,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(visible=False, range=[0, W], constrain="domain"),
        yaxis=dict(visible=False, range=[H, 0], scaleanchor="x", constrain="domain"),
    )
    if not np.isfinite(z).any():
        note = "no value: a map's relevance total is zero or not finite"
        layout["annotations"] = [dict(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)]
    return go.Figure(dict(data=[image, cells], layout=layout), _validate=False)


def _hover_safe(text: str) -> str:
    """A class name inside a plotly template or title: no '%{' (a template field) and no HTML."""
    return text.replace("%{", "% {").replace("<", "&lt;").replace(">", "&gt;")


# ---- downloads -----------------------------------------------------------------------------------


def _fit_text(text: str, room: int, scale: float) -> str:
    """text shortened to fit `room` px at `scale`, ending in '..' when shortened."""
    if cv2.getTextSize(text, render.FONT, scale, 1)[0][0] <= room:
        return text
    while len(text) > 1 and cv2.getTextSize(text + "..", render.FONT, scale, 1)[0][0] > room:
        text = text[:-1]
    return text + ".."


def _text_under(fig: np.ndarray, texts: list[tuple[int, int, str]], scale: float) -> np.ndarray:
    """A white strip under a picture, one line: each (x, room, text) written from x, at most room px wide."""
    (_, th), _ = cv2.getTextSize("Ag", render.FONT, scale, 1)
    strip = np.full((th * 2 + 16, fig.shape[1], 3), 255, np.uint8)
    for x, room, text in texts:
        render.put_text(strip, _fit_text(text, room, scale), (x, th + 6), scale)
    return np.concatenate([fig, strip])


def downloads(ctx: Ctx) -> dict[str, tuple[str, bytes]]:
    """file name -> (button label, PNG) of what the tab shows with the current settings: the top-k
    maps side by side on their one scale (titles under the maps), and the contrastive map. Empty
    for a model without a classifier."""
    method, classes, (a, b) = chosen(ctx)
    if not classes:
        return {}
    opts = display_settings()
    maps = class_maps(ctx, method, classes)
    view, p = ctx.result.prepared.view, ctx.lm.config.patch_size
    vmax = shared_max(maps)
    gap = 8
    row = [render.overlay(view, m, vmin=0.0, vmax=vmax, patch_size=p, **opts) for m in maps]
    h, w = row[0].shape[:2]
    spaced = [
        np.pad(t, ((0, 0), (0, gap if i < len(row) - 1 else 0), (0, 0)), constant_values=255) for i, t in enumerate(row)
    ]
    strip = np.concatenate(spaced, axis=1)
    paper = opts["method"] == "paper"
    bar = (
        dict(cmap="inferno", vmin=0.0, vmax=1.0, label="mask (share of the largest value)")
        if paper
        else dict(cmap=opts["cmap"], vmin=0.0, vmax=vmax, label="relevance")
    )
    name = CLASS_MAPS[method].split(" (")[0]
    fig, _ = render.publication_figure(
        strip, title=f"{name[0].upper()}{name[1:]}: top {len(classes)} classes, one colour scale", **bar
    )
    factor = max(1, int(np.ceil(1024 / max(strip.shape[:2]))))  # publication_figure's enlargement
    titles = [
        (i * (w + gap) * factor + 4, w * factor - 8, f"{i + 1}. {class_title(ctx, c)}") for i, c in enumerate(classes)
    ]
    top_k = _text_under(fig, titles, max(0.6, w * factor / 420))
    heat = contrast(ctx.class_map(a, method), ctx.class_map(b, method))
    lo, hi = colormaps.value_range(heat, "diverging")
    contrast_png = render.publication_figure(
        contrast_overlay(ctx, heat, opts),
        title=f"Contrastive map ({name}): share of A's relevance minus share of B's",
        cmap=colormaps.DEFAULT_DIVERGING,
        vmin=lo,
        vmax=hi,
        label=CONTRAST_LABEL,
    )[0]
    reading = f"A = {class_title(ctx, a)}, B = {class_title(ctx, b)}; red: more for A, blue: more for B"
    contrast_png = _text_under(contrast_png, [(8, contrast_png.shape[1] - 16, reading)], contrast_png.shape[1] / 1600)
    return {
        "class_maps.png": (f"Top {len(classes)} class maps", render.to_png(top_k)),
        "contrastive_map.png": ("Contrastive map", render.to_png(contrast_png)),
    }


# ---- the tab -------------------------------------------------------------------------------------


def controls(ctx: Ctx) -> None:
    """Method and k, side by side (their values are read back with chosen)."""
    a, b = st.columns([2, 1])
    method_select("Class-specific map", a, "; each class costs one backward pass")
    hi = k_limit(ctx)
    if hi > 1:
        with b:
            state.slider(
                "Classes side by side",
                1,
                hi,
                min(state.DEFAULTS["cl_k"], hi),
                key="cl_k",
                help="the most probable first",
            )


def class_pickers(ctx: Ctx) -> None:
    """Classes A and B of the contrastive map (default: the top-1 and top-2 classes)."""
    C = ctx.lm.config.num_classes
    order = ranked(ctx, 2)
    a, b = st.columns(2)
    for box, key, name, default in ((a, "cl_a", "Class A", order[0]), (b, "cl_b", "Class B", order[-1])):
        state.select(
            name,
            list(range(C)),
            default,
            key=key,
            container=box,
            format_func=lambda i: class_title(ctx, i),
            help="the top-1 class by default" if key == "cl_a" else "the top-2 class by default",
        )


def draw_maps(ctx: Ctx, maps: np.ndarray, classes: list[int], opts: dict, method: str) -> None:
    pictures = tiles(ctx, maps, opts)
    bar = scale_bar(pictures[0].shape[0], maps, opts)
    k = len(classes)
    slots = max(MIN_SLOTS, min(k, PER_ROW))
    for start in range(0, k, PER_ROW):
        cols = st.columns([1] * slots + [bar.shape[1] / pictures[0].shape[1]])
        for j, i in enumerate(range(start, min(k, start + PER_ROW))):
            cols[j].image(pictures[i], caption=f"{i + 1}. {class_title(ctx, classes[i])}", output_format="PNG")
        if start == 0:
            cols[-1].image(bar, output_format="PNG")
    if opts["method"] == "paper":
        scale = "each map an alpha mask over black (paper upsampling), 1 where a map reaches the largest value of any of them"
    else:
        scale = (
            f"0 (the darkest colour) to the largest value of any of them ({shared_max(maps):.3g}), "
            f"{opts['method']} upsampling"
        )
    st.caption(
        f"{CLASS_MAPS[method]}, one backward pass per class. One colour scale for all {k} maps (the bar): {scale}; "
        "a map that stays dark holds little relevance next to the others."
    )


def draw_contrast(ctx: Ctx, maps: dict[int, np.ndarray], a: int, b: int, opts: dict) -> None:
    heat = contrast(maps[a], maps[b])
    fig = contrast_figure(
        grey(ctx.result.prepared.view),
        heat,
        A.relevance_share(maps[a]),
        A.relevance_share(maps[b]),
        patch_size=ctx.lm.config.patch_size,
        alpha=opts["alpha"],
        smooth=opts["method"] != "nearest",
        names=(ctx.label(a), ctx.label(b)),
    )
    st.plotly_chart(fig, key="cl_contrast", config={"displayModeBar": False})
    lo, hi = colormaps.value_range(heat, "diverging")
    notes = [f"A = {class_title(ctx, a)}, B = {class_title(ctx, b)}: {CONTRAST_CAPTION}."]
    notes.append(f"Colours from {lo:+.3g} to {hi:+.3g}, white at 0; each map first divided by its own total.")
    if a == b:
        notes.append("A and B are the same class: the map is 0 everywhere.")
    if not np.isfinite(heat).any():
        notes.append("No value: a map's total relevance is zero or not finite.")
    st.caption(" ".join(notes))


def draw(ctx: Ctx) -> None:
    if not has_classifier(ctx):
        st.info(NO_CLASSIFIER)
        return
    controls(ctx)
    method = _method(state.read("ro_method"))
    opts = display_settings()
    busy = st.empty()
    top_box = st.container()
    st.markdown("**Contrastive map**: where A's relevance lies rather than B's")
    class_pickers(ctx)
    method, classes, (a, b) = chosen(ctx)
    need = list(dict.fromkeys([*classes, a, b]))
    bar = busy.progress(0.0, text=f"Class maps: 0 of {len(need)} backward passes...")

    def step(done: int, total: int) -> None:
        bar.progress(done / total, text=f"Class maps: {done} of {total} backward passes...")

    found = dict(zip(need, class_maps(ctx, method, need, progress=step)))
    busy.empty()
    with top_box:
        st.markdown(f"**Top {len(classes)} classes**")
        draw_maps(ctx, np.stack([found[c] for c in classes]), classes, opts, method)
    draw_contrast(ctx, found, a, b, opts)
