"""Compare: a second model on the same image. Position-embedding similarity on a common grid
(named resampling), the difference, decay curves and anisotropy; then, with the settings of the
Rollout and Heads tabs, both models' rollouts, class-specific maps, per-head maps and mean attention
distances side by side.

Conventions of the side-by-side views (the captions repeat them):
- Layers: layer l of the first model (L_a layers) maps to layer round(l * L_b / L_a) of the second
  (halves up, at least 1): the same relative depth, the last layer to the last. The Rollout tab's
  layer range maps end by end the same way.
- Query patch: the second model's patch is the one under the centre of the first model's patch in
  the original image (each model resizes and crops on its own); when that point lies outside the
  second model's crop, the nearest patch, and the caption says so.
- Colour scale: one convention for every map of both models, named on the page: "per map" (each map
  from 0 to its own maximum) or "shared" (within each view, both models from 0 to the largest value
  among them).
- Size: both models' pictures at one height and width (nearest upscaling, at least 224 px high, the
  narrower one centred on white).

`compared`, `downloads` and `report_arrays` give the Download tab the same views without drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import plotly.graph_objects as go
import streamlit as st

from model import ViTLensError
from model.preprocess import PreparedImage
from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import cache, colormaps, figures, pipeline, render, report, results
from viz_app.results import ImageResult
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

METHODS = {
    "bicubic": "timm: bicubic with antialias",
    "bilinear": "the original JAX code: scipy zoom order 1, corner centres aligned",
    "bicubic_dino": "DINO: bicubic, 0.1 added to the target size inside the scale factor",
    "bicubic_plain": "bicubic without antialias",
    "nearest": "nearest neighbour",
}
SCALES = {
    "per map": "each map from 0 to its own maximum",
    "shared": "within each view, both models' maps from 0 to the largest value among them",
}
CONVENTIONS = {"as_is": "prefix mass counts as distance 0", "renormalized": "renormalized over the patches"}
# the report's name of each class-specific map (viz_app/report.py SCHEMA)
CLASS_MAP_KEYS = {"gradient": "grad_rollout", "lrp": "transformer_attribution"}
HEADS_PER_ROW = 16  # more heads wrap to further rows
MIN_DISPLAY_SIDE = 224  # px: both models' pictures are at least this high
TILE_PX = 96  # px: a head's tile in the downloaded per-head sheet


# ---- how the second model's layer and patch follow the first's ------------------------------------


def same_depth(layer: int, depth: int, other_depth: int) -> int:
    """Layer `layer` (1-based) of a `depth`-layer model -> the layer of an `other_depth`-layer model
    at the same relative depth: round(layer * other_depth / depth), halves up, within
    1..other_depth (the last layer maps to the last, equal depths to the same layer)."""
    return min(max((2 * layer * other_depth + depth) // (2 * depth), 1), other_depth)


def same_position(
    patch: tuple[int, int],
    prepared: PreparedImage,
    grid: tuple[int, int],
    other: PreparedImage,
    other_grid: tuple[int, int],
) -> tuple[tuple[int, int], bool]:
    """The patch (row, col) of the other model under the centre of `patch` of this one, both cut
    from the same original image (each model's resize and crop undone), and whether that point
    lies inside the other model's crop (False: the nearest patch)."""
    gh, gw = grid
    H, W = prepared.view.shape[:2]
    x, y = prepared.to_original((patch[1] + 0.5) * W / gw, (patch[0] + 0.5) * H / gh)
    xb = x * other.resized_size[0] / other.original_size[0] - other.crop_box[0]
    yb = y * other.resized_size[1] / other.original_size[1] - other.crop_box[1]
    ghb, gwb = other_grid
    Hb, Wb = other.view.shape[:2]
    row, col = math.floor(yb * ghb / Hb), math.floor(xb * gwb / Wb)
    inside = 0 <= row < ghb and 0 <= col < gwb
    return (min(max(row, 0), ghb - 1), min(max(col, 0), gwb - 1)), inside


# ---- the second model without its picker -------------------------------------------------------


def location() -> tuple[str, str, str] | None:
    """(source, device, precision) of the second model as the page loads it: the Compare picker's
    source (kept in the session and the URL) and the sidebar's device and precision; None when no
    second model is chosen."""
    ss = st.session_state
    source, device, dtype = ss.get("compare_source"), ss.get("device"), ss.get("dtype")
    if not source or device is None or dtype is None:
        return None
    return str(source), str(device), str(dtype)


def compared(ctx: Ctx) -> tuple[LoadedModel, ImageResult] | None:
    """The second model and its result for this image, without drawing the picker (for the
    Download tab); None when none is chosen, when it would have to be downloaded first (a link
    never downloads by itself), fails to load, or has not passed the memory check."""
    from viz_app import sidebar  # the sidebar imports this package: imported when called

    where = location()
    if where is None:
        return None
    source, device, dtype = where
    ss = st.session_state
    try:
        if sidebar.needs_download(source):
            return None
        upload = ss.get("uploads", {}).get(source.removeprefix("upload:")) if source.startswith("upload:") else None
        other = cache.get_model(source, device, dtype, upload)
    except (ViTLensError, ValueError, OSError):
        return None
    if (source, device, dtype) not in ss.get("memory_ok", set()):
        if pipeline.memory_shortfall(other.config, other.dtype, other.device) is not None:
            return None
    return other, cache.get_result(source, device, dtype, ctx.image_digest, ctx.original)


def second_ctx(ctx: Ctx, other: LoadedModel, other_result: ImageResult) -> Ctx:
    """The page's Ctx for the second model: the same image, the second model's own class maps
    (cached like the first model's when the page chose it; computed here otherwise)."""
    where = location()
    if where is None:
        return replace(
            ctx.with_model(other, other_result),
            gradient_map=lambda target: results.gradient_map(other, other_result.prepared, target),
            class_map=lambda target, method="gradient": results.class_map(other, other_result.prepared, target, method),
            second_model=lambda: None,
            scene_mask=None,
            demo_scores=None,
        )
    source, device, dtype = where

    def class_map(target: int, method: str = "gradient") -> np.ndarray:
        return cache.get_class_map(source, device, dtype, ctx.image_digest, target, ctx.original, method)

    def example_mad(key: str):
        from viz_app import page

        return page.example_mad(source, device, dtype, key)

    return replace(
        ctx.with_model(other, other_result),
        source=source,
        gradient_map=lambda target: class_map(target, "gradient"),
        class_map=class_map,
        example_mad=example_mad,
        second_model=lambda: None,
        scene_mask=None,
        demo_scores=None,
    )


# ---- both models' views with the current settings ------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One model's part of the comparison."""

    ctx: Ctx
    settings: report.Settings  # the Rollout and Heads tabs' settings as this model takes them
    layer: int  # of the per-head maps, 1-based
    head: int  # shown large, 1-based
    maps: np.ndarray  # (H, gh, gw) every head's map of `layer` for the query
    rollout: np.ndarray  # (gh, gw) with the settings
    class_map: tuple[int, np.ndarray] | None  # (class, (gh, gw) map) when the model has a classifier

    @property
    def name(self) -> str:
        return self.ctx.lm.name

    @property
    def query(self) -> int | None:
        """The query token (a patch), or None for the read-out token(s)."""
        c = self.ctx.lm.config
        if self.settings.query_patch is None:
            return None
        r, col = self.settings.query_patch
        return c.num_prefix_tokens + r * c.grid[1] + col

    @property
    def who(self) -> str:
        c = self.ctx.lm.config
        if self.settings.query_patch is None:
            return "the read-out token" if c.readout_tokens else "the mean of the patch tokens"
        return f"patch {tuple(self.settings.query_patch)}"

    def distances(self, convention: str) -> np.ndarray:
        """(L, H) mean attention distance in the convention, pixels."""
        r = self.ctx.result
        return r.mad if convention == "as_is" else r.mad_renorm


@dataclass(frozen=True)
class Views:
    """Both models' views with the page's current settings: what the tab draws, downloads() writes
    and report_arrays() returns."""

    a: Side
    b: Side
    scale: str  # a SCALES key
    convention: str  # a CONVENTIONS key
    method: str  # the class-specific map, a results.CLASS_MAPS key
    same_place: bool  # the second model's query patch lies under the first's (False: the nearest one)

    def tops(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        """The top of each model's colour scale (the bottom is 0) for the maps a and b."""
        ta, tb = render.finite_max(a), render.finite_max(b)
        return (max(ta, tb), max(ta, tb)) if self.scale == "shared" else (ta, tb)

    def head_tiles(self) -> tuple[np.ndarray, np.ndarray, float, str]:
        """Both per-head grids' tile values (each (H, gh, gw)), the colour scale's top and its name."""
        if self.scale == "shared":
            top = self.tops(self.a.maps, self.b.maps)[0]
            return self.a.maps, self.b.maps, top, "attention (both models)"
        return render.share_of_max(self.a.maps), render.share_of_max(self.b.maps), 1.0, "share of each map's max"

    def distance_top(self) -> float:
        """One y range for both scatters: 5 % above the largest finite distance of either model."""
        values = np.concatenate([s.distances(self.convention).ravel() for s in (self.a, self.b)])
        return render.finite_max(values, 1.0) * 1.05


def choice(key: str, options, default):
    value = state.read(key)
    return value if value in options else default


def class_of_second(a: Ctx, b: Ctx, class_a: int | None) -> int | None:
    """The second model's class: the first model's class when both classify into the same classes
    (same count and labels), else the second model's own top-1; None without a classifier."""
    cb = b.lm.config
    if not cb.num_classes or b.result.forward.logits is None:
        return None
    same = cb.num_classes == a.lm.config.num_classes and b.lm.labels == a.lm.labels
    return class_a if same and class_a is not None else int(b.result.top5[0][0])


def layer_maps(ctx: Ctx, layer: int, query: int | None, drop_prefix: bool) -> np.ndarray:
    """(H, gh, gw) every head's map of one layer for the query, as the Heads tab computes it."""
    c = ctx.lm.config
    attn = ctx.result.attentions[layer - 1]
    maps = A.attention_maps(attn, query=query, readout_tokens=c.readout_tokens, drop_prefix=drop_prefix, **ctx.kw)
    return maps.numpy()


def views(ctx: Ctx, other: LoadedModel, other_result: ImageResult, *, class_maps: bool = True) -> Views:
    """Both models' views with the page's current settings (class_maps=False skips the backward
    passes of the class-specific maps)."""
    b_ctx = second_ctx(ctx, other, other_result)
    ca, cb = ctx.lm.config, other.config
    sa = rollout_settings(ctx)
    first, last = sa.layer_range(ca.depth)
    patch_b, inside = None, True
    if sa.query_patch is not None:
        patch_b, inside = same_position(sa.query_patch, ctx.result.prepared, ca.grid, other_result.prepared, cb.grid)
    sb = replace(
        rollout_settings(b_ctx),
        rollout_first_layer=same_depth(first, ca.depth, cb.depth),
        rollout_last_layer=same_depth(last, ca.depth, cb.depth),
        query_patch=patch_b,
        drop_prefix=sa.drop_prefix,
    )
    layer_a = min(max(int(state.read("cmp_layer") or ca.depth), 1), ca.depth)
    layer_b = same_depth(layer_a, ca.depth, cb.depth)
    head_a = min(max(int(state.read("cmp_head") or 1), 1), ca.num_heads)
    head_b = min(max(int(state.read("cmp_head_b") or 1), 1), cb.num_heads)
    method = choice("ro_method", results.CLASS_MAPS, "gradient")
    class_a = target_class(ctx)
    class_b = class_of_second(ctx, b_ctx, class_a)
    map_a = map_b = None
    if class_maps and class_a is not None:
        map_a = (class_a, np.asarray(ctx.class_map(class_a, method)))
    if class_maps and class_b is not None:
        map_b = (class_b, np.asarray(b_ctx.class_map(class_b, method)))
    a = Side(ctx, sa, layer_a, head_a, np.zeros(0), rollout_map(ctx, sa), map_a)
    b = Side(b_ctx, sb, layer_b, head_b, np.zeros(0), rollout_map(b_ctx, sb), map_b)
    a = replace(a, maps=layer_maps(ctx, layer_a, a.query, sa.drop_prefix))
    b = replace(b, maps=layer_maps(b_ctx, layer_b, b.query, sb.drop_prefix))
    return Views(
        a=a,
        b=b,
        scale=choice("cmp_scale", SCALES, "per map"),
        convention=choice("cmp_conv", CONVENTIONS, "as_is"),
        method=method,
        same_place=inside,
    )


# ---- pictures at one size -------------------------------------------------------------------------


def display_size(a: Ctx, b: Ctx) -> tuple[int, int]:
    """(H, W) of every picture of both models: the taller model input's height (at least
    MIN_DISPLAY_SIDE) and the wider of the two inputs' widths at that height."""
    ha, wa = a.result.prepared.view.shape[:2]
    hb, wb = b.result.prepared.view.shape[:2]
    H = max(MIN_DISPLAY_SIDE, ha, hb)
    return H, max(round(wa * H / ha), round(wb * H / hb))


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The picture at height H (nearest neighbour: patches stay sharp), centred on white at width W."""
    H, W = size
    h, w = image.shape[:2]
    w2 = min(W, max(1, round(w * H / h)))
    if (h, w) != (H, w2):
        image = cv2.resize(image, (w2, H), interpolation=cv2.INTER_NEAREST)
    if w2 == W:
        return image
    out = np.full((H, W, 3), 255, np.uint8)
    x0 = (W - w2) // 2
    out[:, x0 : x0 + w2] = image
    return out


def overlay(ctx: Ctx, heat: np.ndarray, opts: dict, vmax: float, size: tuple[int, int]) -> np.ndarray:
    """The map over the model's view from 0 to vmax (the Rollout tab's upsampling, colour map and
    opacity), at the common size."""
    kw = dict(method=opts["method"], alpha=opts["alpha"], cmap=opts["cmap"], patch_size=ctx.lm.config.patch_size)
    return fit(render.overlay(ctx.result.prepared.view, heat, vmin=0.0, vmax=vmax, **kw), size)


def bar_of(opts: dict, vmax: float, label: str) -> dict:
    """The colour bar's settings of an overlay (the paper's look: the mask's own scale)."""
    if opts["method"] == "paper":
        return dict(cmap="inferno", vmin=0.0, vmax=1.0, label="mask (share of max)")
    return dict(cmap=opts["cmap"], vmin=0.0, vmax=vmax, label=label)


def picture(ctx: Ctx, heat: np.ndarray, opts: dict, vmax: float, size: tuple[int, int], label: str) -> np.ndarray:
    """An overlay at the common size with its colour bar (the same width for both models)."""
    img = overlay(ctx, heat, opts, vmax, size)
    return np.concatenate([img, render.colorbar(size[0], **bar_of(opts, vmax, label))], axis=1)


# ---- drawing ---------------------------------------------------------------------------------------


def draw(ctx: Ctx) -> None:
    with st.expander("Second model", expanded=True):
        picked = ctx.second_model()
    if picked is None:
        st.info("Choose a second model above to compare it with the current one.")
        return
    other, other_result = picked
    if other_result is not None and other_result.nonfinite:  # the page warned about the first model only
        st.warning(results.nonfinite_warning(other_result.nonfinite, other.name))
    st.markdown("#### Position embeddings")
    draw_position(ctx, other)
    if other_result is not None:
        draw_side_by_side(ctx, other, other_result)


def common_grids(ca, cb) -> list[tuple[int, int]]:
    return sorted({ca.grid, cb.grid}, key=lambda g: g[0] * g[1])[::-1]


def grid_name(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def position_comparison(ctx: Ctx, other: LoadedModel, method: str, grid: tuple[int, int]):
    """A.compare_position_embeddings of both models on the common grid."""
    ca, cb = ctx.lm.config, other.config
    pa = ctx.lm.model.pos_embed.detach().float().cpu()[0, ca.pos_embed_prefix :]
    pb = other.model.pos_embed.detach().float().cpu()[0, cb.pos_embed_prefix :]
    return A.compare_position_embeddings(pa, ca.grid, pb, cb.grid, grid=grid, method=method)


def draw_position(ctx: Ctx, other: LoadedModel) -> None:
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
    grids = common_grids(ca, cb)
    names = [grid_name(g) for g in grids]
    grid = grids[names.index(state.select("Common grid", names, names[0], key="cmp_grid", container=b))]
    cmp = position_comparison(ctx, other, method, grid)
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


def head_layout(a: int, b: int) -> tuple[int, int]:
    """(rows, columns) of both models' per-head grids: one layout for both, so that their tiles
    are drawn at one size; at most HEADS_PER_ROW a row."""
    columns = min(max(a, b), HEADS_PER_ROW)
    return math.ceil(max(a, b) / columns), columns


def laid_out(maps: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(H, gh, gw) -> (rows, columns, gh, gw), row-major, blank (NaN) after the last head."""
    H, gh, gw = maps.shape
    out = np.full((rows * columns, gh, gw), np.nan)
    out[:H] = maps
    return out.reshape(rows, columns, gh, gw)


def heads_figure(side: Side, tiles: np.ndarray, rows: int, columns: int, top: float, bar: str) -> go.Figure:
    """One model's per-head grid of its layer (clickable: a tile shows its head large)."""
    c = side.ctx.lm.config
    H = c.num_heads
    if rows == 1:
        row_labels, col_labels, col_name = [f"layer {side.layer}"], [str(j + 1) for j in range(columns)], "head"
    else:
        row_labels = [str(r * columns + 1) for r in range(rows)]
        col_labels, col_name = [f"+{j}" for j in range(columns)], "head = first of the row + column"
    fig = figures.tile_figure(
        laid_out(tiles, rows, columns),
        row_name="" if rows == 1 else "first head of the row",
        col_name=col_name,
        row_labels=row_labels,
        col_labels=col_labels,
        colorbar_title=bar,
        zmin=0.0,
        zmax=top,
        title=f"{side.name}: layer {side.layer} of {c.depth}, {H} head{'s' if H > 1 else ''}",
        selected=divmod(side.head - 1, columns),
    )
    fig.data[1].text = [f"head {k + 1}" if k < H else "no head" for k in range(rows * columns)]
    return fig


def on_heads_click(chart: str, key: str, heads: int, columns: int) -> None:
    """Callback of a per-head grid: the clicked head is shown large."""
    points = clicked_points(chart_key(chart))
    next_chart(chart)
    tile = clicked_tile(points, columns)
    if tile is not None and tile[0] * columns + tile[1] < heads:
        st.session_state[key] = tile[0] * columns + tile[1] + 1


def settings_caption(v: Views, opts: dict) -> str:
    a, b = v.a, v.b
    ca, cb = a.ctx.lm.config, b.ctx.lm.config
    fa, la = a.settings.layer_range(ca.depth)
    fb, lb = b.settings.layer_range(cb.depth)
    s = a.settings
    readout = (
        s.rollout_readout
        if s.rollout_readout == b.settings.rollout_readout
        else (f"{s.rollout_readout} / {b.settings.rollout_readout}")
    )
    return (
        f"Rollout tab: layers {fa}-{la} of {ca.depth} / {fb}-{lb} of {cb.depth} (the second model's at the same "
        f"relative depth), {s.rollout_fusion} fusion, discard {s.rollout_discard:.2f}, read-out {readout}; "
        f"{opts['method']} upsampling, {opts['cmap']}, opacity {opts['alpha']:.2f}. Heads tab: attention of "
        f"{a.who} / {b.who}{place_note(v)}, prefix tokens {'dropped' if s.drop_prefix else 'kept'}. Change them "
        f"on those tabs. Colour scale ({v.scale}): {SCALES[v.scale]}. Pictures of both models at one size."
    )


def place_note(v: Views) -> str:
    if v.a.settings.query_patch is None:
        return ""
    if v.same_place:
        return " (the same place in the image)"
    return " (the nearest patch: the first model's patch lies outside the second model's crop)"


def draw_side_by_side(ctx: Ctx, other: LoadedModel, other_result: ImageResult) -> None:
    st.markdown("#### Both models with the same settings")
    top, rollouts, heads, distances = st.container(), st.container(), st.container(), st.container()
    ca, cb = ctx.lm.config, other.config
    state.radio(
        "Colour scale of the maps",
        list(SCALES),
        state.DEFAULTS["cmp_scale"],
        key="cmp_scale",
        container=top,
        horizontal=True,
        help="; ".join(f"{k}: {v}" for k, v in SCALES.items())
        + ". Attention spreads over more patches on a finer grid, so shared raw values favour the coarser grid.",
    )
    with heads:
        st.markdown("**Per-head maps** (the Heads tab's query; click a tile to show its head large)")
        x, y, z = st.columns([2, 1, 1])
        with x:
            state.slider("Layer (first model)", 1, ca.depth, ca.depth, key="cmp_layer")
        state.select("Head (first model)", list(range(1, ca.num_heads + 1)), 1, key="cmp_head", container=y)
        state.select("Head (second model)", list(range(1, cb.num_heads + 1)), 1, key="cmp_head_b", container=z)
    with distances:
        st.markdown("**Mean attention distance** (paper Fig. 7, right), one y range for both")
        state.radio(
            "Convention",
            list(CONVENTIONS),
            state.DEFAULTS["cmp_conv"],
            key="cmp_conv",
            horizontal=True,
            format_func=lambda k: CONVENTIONS[k],
        )
    with st.spinner("Both models' maps..."):
        v = views(ctx, other, other_result)
    opts = display_settings()
    top.caption(settings_caption(v, opts))
    with rollouts:
        draw_rollouts(v, opts)
    with heads:
        draw_heads(v)
    with distances:
        draw_distances(v)


def draw_rollouts(v: Views, opts: dict) -> None:
    size = display_size(v.a.ctx, v.b.ctx)
    ta, tb = v.tops(v.a.rollout, v.b.rollout)
    st.markdown("**Attention rollout** (Abnar & Zuidema 2020)")
    for col, side, top in zip(st.columns(2), (v.a, v.b), (ta, tb)):
        c = side.ctx.lm.config
        first, last = side.settings.layer_range(c.depth)
        col.image(
            picture(side.ctx, side.rollout, opts, top, size, "rollout"),
            caption=f"{side.name}: layers {first}-{last} of {c.depth}, read-out {side.settings.rollout_readout}. "
            "0 is the darkest colour.",
            width="stretch",
            output_format="PNG",
        )
    if v.a.class_map is None and v.b.class_map is None:
        return
    st.markdown(f"**{results.CLASS_MAPS[v.method][0].upper()}{results.CLASS_MAPS[v.method][1:]}** (the Rollout tab's)")
    both = [s.class_map[1] if s.class_map else np.zeros((1, 1)) for s in (v.a, v.b)]
    tops = v.tops(*both)
    for col, side, top in zip(st.columns(2), (v.a, v.b), tops):
        if side.class_map is None:
            col.info(f"{side.name} has no classifier: no class-specific map.")
            continue
        cls, heat = side.class_map
        col.image(
            picture(side.ctx, heat, opts, top, size, "relevance"),
            caption=f"{side.name}: for '{side.ctx.label(cls)}' (class {cls}). 0 is the darkest colour.",
            width="stretch",
            output_format="PNG",
        )
    st.caption("The second model explains the first model's class when both have the same classes, else its own top-1.")


def draw_heads(v: Views) -> None:
    ca, cb = v.a.ctx.lm.config, v.b.ctx.lm.config
    rows, columns = head_layout(ca.num_heads, cb.num_heads)
    tiles_a, tiles_b, top, bar = v.head_tiles()
    for side, tiles, chart, key in (
        (v.a, tiles_a, "cmp_heads_a", "cmp_head"),
        (v.b, tiles_b, "cmp_heads_b", "cmp_head_b"),
    ):
        heads = side.ctx.lm.config.num_heads
        st.plotly_chart(
            heads_figure(side, tiles, rows, columns, top, bar),
            key=chart_key(chart),
            on_select=lambda chart=chart, key=key, heads=heads: on_heads_click(chart, key, heads, columns),
            selection_mode="points",
            config=NO_TOOLBAR,
        )
    st.caption(
        f"Layer {v.a.layer} of {ca.depth} and layer {v.b.layer} of {cb.depth}: the second model's layer is at the "
        f"same relative depth, round(layer x {cb.depth} / {ca.depth}). Attention of {v.a.who} / {v.b.who}"
        f"{place_note(v)}, prefix tokens {'dropped' if v.a.settings.drop_prefix else 'kept'}. Colour scale "
        f"({v.scale}): {SCALES[v.scale]}; 0 is the darkest colour; both grids laid out alike ({columns} tiles a row)."
    )
    big_a, big_b = v.a.maps[v.a.head - 1], v.b.maps[v.b.head - 1]
    tops = v.tops(v.a.maps, v.b.maps) if v.scale == "shared" else v.tops(big_a, big_b)
    for col, side, one, top, key in zip(st.columns(2), (v.a, v.b), (big_a, big_b), tops, ("cmp_big_a", "cmp_big_b")):
        col.plotly_chart(
            figures.patch_heatmap(
                one,
                num_prefix=side.ctx.lm.config.num_prefix_tokens,
                zmin=0.0,
                zmax=top,
                title=f"{side.name}: layer {side.layer}, head {side.head}",
                colorbar_title="attention",
                marked=side.settings.query_patch,
            ),
            key=key,
        )


def draw_distances(v: Views) -> None:
    top = v.distance_top()
    for col, side, key in zip(st.columns(2), (v.a, v.b), ("cmp_mad_a", "cmp_mad_b")):
        col.plotly_chart(
            figures.mad_scatter_figure(
                side.distances(v.convention),
                title=side.name,
                convention=v.convention,
                prefix_share=side.ctx.result.prefix_share,
                ymax=top,
            ),
            key=key,
        )


# ---- downloads and report arrays ------------------------------------------------------------------


def _stack(images: tuple[np.ndarray, ...], axis: int, gap: int) -> np.ndarray:
    """Pictures along `axis` (1: left to right, top-aligned; 0: top to bottom, left-aligned) on
    white, `gap` px apart."""
    across = 1 - axis  # the other side is padded to the largest
    size = max(i.shape[across] for i in images)
    parts = []
    for k, img in enumerate(images):
        if k:
            shape = [0, 0, 3]
            shape[axis], shape[across] = gap, size
            parts.append(np.full(shape, 255, np.uint8))
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[across] = (0, size - img.shape[across])
        parts.append(np.pad(img, pad, constant_values=255))
    return np.concatenate(parts, axis=axis)


def beside(*images: np.ndarray, gap: int = 24) -> np.ndarray:
    """Pictures left to right on white, top-aligned."""
    return _stack(images, 1, gap)


def above(*images: np.ndarray, gap: int = 24) -> np.ndarray:
    """Pictures top to bottom on white, left-aligned."""
    return _stack(images, 0, gap)


def head_sheet(maps: np.ndarray, columns: int, vmax: float, cmap: str) -> np.ndarray:
    """(H, gh, gw) maps as rows of `columns` tiles, each TILE_PX px on its long side (nearest
    neighbour; one size whatever the grid), each head's number above it, white after the last."""
    H, gh, gw = maps.shape
    th, tw = max(1, round(gh * TILE_PX / max(gh, gw))), max(1, round(gw * TILE_PX / max(gh, gw)))
    band, gap = 30, 8
    rows = math.ceil(H / columns)
    out = np.full((rows * (band + TILE_PX + gap), columns * (TILE_PX + gap) + gap, 3), 255, np.uint8)
    for k in range(H):
        r, c = divmod(k, columns)
        y, x = r * (band + TILE_PX + gap) + band, gap + c * (TILE_PX + gap)
        out[y : y + th, x : x + tw] = render.colorize(render.upsample(maps[k], (th, tw), "nearest"), cmap, 0.0, vmax)
        render.put_text(out, str(k + 1), (x + tw // 2 - 8, y - 8), 0.6)
    return out


def marked(image: np.ndarray, patch: tuple[int, int] | None, grid: tuple[int, int]) -> np.ndarray:
    """The model-input-sized picture with the query patch outlined in cyan."""
    if patch is None:
        return image
    H, W = image.shape[:2]
    r, c = patch
    y0, y1 = round(r * H / grid[0]), round((r + 1) * H / grid[0]) - 1
    x0, x1 = round(c * W / grid[1]), round((c + 1) * W / grid[1]) - 1
    out = image.copy()
    out[y0 : y1 + 1, [x0, x1]] = (0, 255, 255)
    out[[y0, y1], x0 : x1 + 1] = (0, 255, 255)
    return out


def publication_size(size: tuple[int, int], min_long_side: int = 1024) -> tuple[int, int]:
    """The common display size enlarged by the smallest whole factor that makes its long side at
    least min_long_side px."""
    k = max(1, math.ceil(min_long_side / max(size)))
    return size[0] * k, size[1] * k


def titled(image: np.ndarray, lines: list[str], bar: dict | None = None) -> np.ndarray:
    """A picture with lines of text above it (the first in bold; a line too long for the width is
    set smaller) and its colour bar (render.colorbar's keywords) beside it."""
    H, W = image.shape[:2]
    body = image
    if bar is not None:
        body = np.concatenate([image, np.full((H, 16, 3), 255, np.uint8), render.colorbar(H, **bar)], axis=1)
    width = body.shape[1]
    base = max(0.7, W / 1000)
    bands = []
    for i, text in enumerate(lines):
        scale, thick = (base, 2) if i == 0 else (base * 0.7, 1)
        height = int(34 * scale) + 8
        text_w = cv2.getTextSize(text, render.FONT, scale, thick)[0][0]
        if text_w > width - 16:
            scale *= (width - 16) / text_w
        band = np.full((height, width, 3), 255, np.uint8)
        render.put_text(band, text, (8, height - 10), scale, thick=thick)
        bands.append(band)
    return np.concatenate([*bands, body, np.full((8, width, 3), 255, np.uint8)])


def downloads(ctx: Ctx, other: LoadedModel, other_result: ImageResult) -> dict[str, tuple[str, bytes]]:
    """file name -> (button label, PNG bytes) of every compare view with the current settings:
    both models side by side (one above the other for the per-head grids), each model's picture
    at one size, at least 1024 px on the long side, titled, with its colour bar."""
    v = views(ctx, other, other_result)
    opts = display_settings()
    size = publication_size(display_size(v.a.ctx, v.b.ctx))
    sides = (v.a, v.b)
    out = {}

    def note(side: Side, first: str) -> str:
        h, w = side.ctx.result.prepared.view.shape[:2]
        return f"{first} to the {w}x{h} px input, shown at {size[1]}x{size[0]} px (nearest neighbour)"

    def overlays(heats: list[np.ndarray | None], label: str, lines: list[list[str]]) -> bytes:
        present = [h if h is not None else np.zeros((1, 1)) for h in heats]
        panels = []
        for side, heat, top, text in zip(sides, heats, v.tops(*present), lines):
            if heat is not None:
                img = overlay(side.ctx, heat, opts, top, size)
                panels.append(
                    titled(img, [*text, note(side, f"{opts['method']} upsampling")], bar_of(opts, top, label))
                )
        return render.to_png(beside(*panels))

    s = v.a.settings
    lines = []
    for side in sides:
        first, last = side.settings.layer_range(side.ctx.lm.config.depth)
        lines.append(
            [
                side.name,
                f"Attention rollout, layers {first}-{last} of {side.ctx.lm.config.depth}, {s.rollout_fusion} fusion, "
                f"discard {s.rollout_discard:.2f}, read-out {side.settings.rollout_readout}; colour scale {v.scale}",
            ]
        )
    out["compare_rollout.png"] = ("Compare: rollouts", overlays([v.a.rollout, v.b.rollout], "rollout", lines))
    if v.a.class_map is not None or v.b.class_map is not None:
        what = results.CLASS_MAPS[v.method]
        heats = [side.class_map[1] if side.class_map else None for side in sides]
        lines = [
            [side.name, f"{what} for '{side.ctx.label(side.class_map[0])}'; colour scale {v.scale}"]
            if side.class_map
            else []
            for side in sides
        ]
        label = f"Compare: {what.split(' (')[0]}"
        out[f"compare_{CLASS_MAP_KEYS[v.method]}.png"] = (label, overlays(heats, "relevance", lines))
    rows, columns = head_layout(v.a.ctx.lm.config.num_heads, v.b.ctx.lm.config.num_heads)
    tiles_a, tiles_b, top, bar = v.head_tiles()
    cmap = colormaps.DEFAULT_SEQUENTIAL
    sheets = [head_sheet(tiles, columns, top, cmap) for tiles in (tiles_a, tiles_b)]
    k = max(1, math.ceil(1024 / max(sheets[0].shape[:2])))
    panels = []
    for side, sheet in zip(sides, sheets):
        c = side.ctx.lm.config
        big = cv2.resize(sheet, (sheet.shape[1] * k, sheet.shape[0] * k), interpolation=cv2.INTER_NEAREST)
        text = [
            side.name,
            f"Layer {side.layer} of {c.depth}, every head: attention of {side.who}, prefix tokens "
            f"{'dropped' if side.settings.drop_prefix else 'kept'}; colour scale {v.scale} ({bar})",
        ]
        panels.append(titled(big, text, dict(cmap=cmap, vmin=0.0, vmax=top, label=bar)))
    out["compare_heads.png"] = ("Compare: per-head maps", render.to_png(above(*panels)))
    big_a, big_b = v.a.maps[v.a.head - 1], v.b.maps[v.b.head - 1]
    tops = v.tops(v.a.maps, v.b.maps) if v.scale == "shared" else v.tops(big_a, big_b)
    panels = []
    for side, one, vmax in zip(sides, (big_a, big_b), tops):
        c = side.ctx.lm.config
        H, W = side.ctx.result.prepared.view.shape[:2]
        img = marked(
            render.colorize(render.upsample(one, (H, W), "nearest"), cmap, 0.0, vmax), side.settings.query_patch, c.grid
        )
        text = [side.name, f"Layer {side.layer}, head {side.head}: attention of {side.who}; colour scale {v.scale}"]
        panels.append(
            titled(
                fit(img, size), [*text, note(side, "nearest")], dict(cmap=cmap, vmin=0.0, vmax=vmax, label="attention")
            )
        )
    out["compare_head.png"] = ("Compare: one head each", render.to_png(beside(*panels)))
    ymax = v.distance_top()
    conv = CONVENTIONS[v.convention]
    scatters = [
        render.mad_scatter_png(
            side.distances(v.convention), title=side.name, prefix_share=side.ctx.result.prefix_share, ymax=ymax
        )
        for side in sides
    ]
    body = beside(*scatters)
    band = np.full((44, body.shape[1], 3), 255, np.uint8)
    render.put_text(band, f"Mean attention distance, {conv}; one y range for both", (8, 32), 0.9, thick=2)
    out["compare_distance.png"] = ("Compare: attention distance", render.to_png(np.concatenate([band, body])))
    method, grid = chosen_resampling(ctx, other)
    cmp = position_comparison(ctx, other, method, grid)
    div = colormaps.DEFAULT_DIVERGING
    panels = []
    for sim, title, unit in (
        (cmp.sim_a, ctx.lm.name, "cosine"),
        (cmp.sim_b, other.name, "cosine"),
        (cmp.difference, "Difference (first - second)", "difference"),
    ):
        tiles = A.similarity_tiles(sim, grid).numpy()
        img = render.labelled_grid(
            tiles, row_name="patch row", col_name="patch column", cmap=div, vmin=-1, vmax=1, first=0, min_side=768
        )
        what = "similarity minus the second's" if unit == "difference" else "position-embedding similarity"
        text = [title, f"The first model's {what} on {grid_name(grid)} ({method}: {METHODS[method]})"]
        if unit == "cosine":
            text[1] = f"Position-embedding similarity on {grid_name(grid)} ({method}: {METHODS[method]})"
        panels.append(titled(img, text, dict(cmap=div, vmin=-1.0, vmax=1.0, label=unit)))
    out["compare_position_similarity.png"] = ("Compare: position embeddings", render.to_png(beside(*panels)))
    return out


def chosen_resampling(ctx: Ctx, other: LoadedModel) -> tuple[str, tuple[int, int]]:
    """The position-embedding comparison's resampling and common grid as the tab has them."""
    grids = common_grids(ctx.lm.config, other.config)
    names = [grid_name(g) for g in grids]
    name = choice("cmp_grid", names, names[0])
    return choice("cmp_method", METHODS, "bicubic"), grids[names.index(name)]


def report_arrays(ctx: Ctx, other: LoadedModel, other_result: ImageResult) -> dict[str, np.ndarray]:
    """The second model's arrays of the compare views with the current settings (the compare_* keys of report.SCHEMA);
    the first model's are the report's own (the same settings), the layers and heads shown are
    named for both."""
    v = views(ctx, other, other_result)
    b = v.b
    c = other.config
    attn = other_result.attentions
    kw = dict(readout_tokens=c.readout_tokens, drop_prefix=b.settings.drop_prefix, **b.ctx.kw)
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    out = {
        "compare_layers": i64([v.a.layer, b.layer]),
        "compare_heads": i64([v.a.head, b.head]),
        "compare_rollout_b": f32(b.rollout),
        "compare_rollout_layers_b": i64(b.settings.layer_range(c.depth)),
        "compare_readout_attention_b": f32(A.attention_maps(attn, **kw)),
        "compare_mean_attention_distance_b": f32(other_result.mad),
        "compare_mean_attention_distance_renormalized_b": f32(other_result.mad_renorm),
        "compare_prefix_mass_share_b": f32(other_result.prefix_share),
    }
    if b.query is not None:
        out["compare_query_patch_b"] = i64(b.settings.query_patch)
        out["compare_query_attention_b"] = f32(A.attention_maps(attn, query=b.query, **kw))
    if b.class_map is not None:
        out[f"compare_{CLASS_MAP_KEYS[v.method]}_b"] = f32(b.class_map[1])
        out["compare_grad_class_b"] = i64(b.class_map[0])
    return out
