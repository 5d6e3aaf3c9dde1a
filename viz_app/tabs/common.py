"""What every tab gets (Ctx: values and callables, no cache keys) and the few drawing helpers they
share: overlays with their colour bar, the settings the Rollout tab controls, display options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import streamlit as st

from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import colormaps, render, report
from viz_app.results import ImageResult
from viz_app.tabs import state

NO_TOOLBAR = {"displayModeBar": False}  # plotly's toolbar would cover a clickable picture


def clicked_points(chart_key: str) -> list:
    """The points selected on a plotly chart (by its key), or []."""
    value = st.session_state.get(chart_key)
    if value is None:
        return []
    selection = value.get("selection") if isinstance(value, dict) else getattr(value, "selection", None)
    if selection is None:
        return []
    return selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])


def clicked_tile(points: list, cols: int) -> tuple[int, int] | None:
    """(row, col) of the tile clicked on a figures.tile_figure grid of `cols` columns, or None.

    The tile markers are the figure's second trace, in row-major order, so a point's index is
    row * cols + col. (Its customdata arrives as a typed array turned into a dict, not a list.)"""
    for p in points:
        if p.get("curve_number", 1) != 1:
            continue  # the heat map under the markers
        index = p.get("point_index", p.get("point_number"))
        if isinstance(index, int | float) and not isinstance(index, bool) and index >= 0:
            return divmod(int(index), cols)
    return None


def next_chart(name: str) -> None:
    """A new key for a clickable chart: its selection starts empty, so clicking the same tile or
    patch again is a new selection (a chart that keeps its selection ignores a repeated click)."""
    st.session_state[f"{name}_n"] = st.session_state.get(f"{name}_n", 0) + 1


def chart_key(name: str) -> str:
    return f"{name}_{st.session_state.get(f'{name}_n', 0)}"


@dataclass(frozen=True)
class Ctx:
    """The model, this image's result, and how to get what is computed on demand."""

    lm: LoadedModel
    result: ImageResult
    original: np.ndarray  # the uploaded image, RGB
    image_name: str  # "photo: chelsea", "scene: 3_star", or an upload's file name
    image_digest: str
    source: str  # what loads the model again: demo, a curated key, a path, a hub id, upload:<digest>
    gradient_map: Callable[[int], np.ndarray]  # class -> gradient rollout (gh, gw)
    example_mad: Callable[[str], tuple[np.ndarray, int]]  # as_is | renormalized | prefix -> (gallery mean, n)
    # draws the second-model picker where it is called; -> (model, its result for this image) or None
    second_model: Callable[[], tuple[LoadedModel, ImageResult | None] | None] = lambda: None
    # (class, method) -> the class-specific map of results.CLASS_MAPS[method], (gh, gw), cached
    class_map: Callable[[int, str], np.ndarray] = lambda target, method="gradient": None  # noqa: E731
    scene_mask: np.ndarray | None = None  # the target mask of a demo scene, else None
    demo_scores: dict | None = None  # the demo model's scores on fresh scenes (assets/demo/scores.json)

    def with_model(self, lm: LoadedModel, result: ImageResult) -> Ctx:
        """The same image through another model (for side-by-side views)."""
        return replace(self, lm=lm, result=result)

    @property
    def pixels(self):
        """(1, 3, H, W) this image's model input on the model's device and dtype."""
        return self.result.prepared.pixels[None].to(self.lm.device, self.lm.dtype)

    @property
    def kw(self) -> dict:
        c = self.lm.config
        return dict(num_prefix=c.num_prefix_tokens, grid=c.grid)

    def label(self, i: int) -> str:
        return self.lm.labels[i] if self.lm.labels else f"class {i}"

    def patch_name(self, token: int) -> str:
        """'patch (row, col)' for a patch token, else the prefix token's name."""
        c = self.lm.config
        if token < c.num_prefix_tokens:
            return f"the {c.prefix_names[token]} token"
        r, col = divmod(token - c.num_prefix_tokens, c.grid[1])
        return f"patch ({r}, {col})"


def rollout_settings(ctx: Ctx) -> report.Settings:
    """The report settings as the tabs have them now (defaults where never set): the Rollout and
    Heads tabs' rollout, query and masks, the class-specific maps' method, the Tokens tab's
    high-norm factor and queries."""
    c = ctx.lm.config
    layers = state.read("ro_layers") or (1, c.depth)
    first, last = sorted(max(1, min(int(v), c.depth)) for v in layers)
    readout = state.read("ro_readout")
    fusion = state.read("ro_fusion")
    discard = state.clamped("ro_discard", 0.0, 0.95)
    query = None
    if state.read("hd_query") == "patch":
        gh, gw = c.grid
        query = (min(max(int(state.read("hd_row")), 0), gh - 1), min(max(int(state.read("hd_col")), 0), gw - 1))
    gclass = state.read("ro_class")
    method = state.read("ro_method")
    from viz_app.tabs import tokens  # the Tokens tab's settings, clamped as that tab does (it imports this module)

    factor, queries = tokens.settings()
    return report.Settings(
        mask_tau=state.clamped("mk_tau", 0.05, 1.0),
        class_method=method if method in report.CLASS_METHODS else "gradient",
        high_norm_factor=factor,
        budget_queries=queries,
        rollout_fusion=fusion if fusion in report.FUSIONS else "mean",
        rollout_discard=min(max(discard, 0.0), 0.95),
        rollout_readout=readout if readout in readout_choices(ctx) else readout_choices(ctx)[0],
        rollout_first_layer=first,
        rollout_last_layer=last,
        query_patch=query,
        drop_prefix=bool(state.read("hd_drop")),
        grad_rollout=c.num_classes > 0,
        grad_class=None if gclass is None or not 0 <= int(gclass) < c.num_classes else int(gclass),
    )


def target_class(ctx: Ctx) -> int | None:
    """The class the class-specific views follow: the Rollout tab's class (ro_class) when it fits
    the model, else the image's top-1; None for a model without a classifier."""
    c = ctx.lm.config
    if not c.num_classes or ctx.result.forward.logits is None:
        return None
    chosen = state.read("ro_class")
    try:
        if chosen is not None and 0 <= int(chosen) < c.num_classes:
            return int(chosen)
    except (TypeError, ValueError):
        pass
    return int(ctx.result.top5[0][0])


@st.cache_resource(max_entries=64, show_spinner=False)
def result_slot(key: tuple) -> dict:
    """One shared cache entry per key (a tab's name, the model, device, precision, image and
    settings), least recently used first out: filled once by the run that computes it (outside
    a cached function, so that its progress bar is shown, not replayed), then only read. It
    holds numpy results, never a model."""
    return {}


def rollout_map(ctx: Ctx, s: report.Settings) -> np.ndarray:
    """The rollout (gh, gw) with the settings' fusion, discard ratio, read-out and layers (the
    cached one when they are the paper's)."""
    c = ctx.lm.config
    options = report.rollout_options(c, s)
    if options == report.rollout_options(c, report.Settings()):
        return ctx.result.rollout
    return A.attention_rollout(ctx.result.forward.attentions, **options)[0].numpy()


def readout_choices(ctx: Ctx) -> list[str]:
    c = ctx.lm.config
    if not c.class_token:
        return ["patches"]
    return ["auto", "cls", "dist", "mean", "patches"] if c.distill_token else ["auto", "cls", "patches"]


def display_settings() -> dict:
    """Upsampling, colour map and opacity of the rollout overlays (set on the Rollout tab)."""
    cmap = state.read("ro_cmap")
    method = state.read("ro_up")
    return {
        "method": method if method in render.UPSAMPLING else "nearest",
        "cmap": cmap if cmap in colormaps.SEQUENTIAL else colormaps.DEFAULT_SEQUENTIAL,
        "alpha": state.clamped("ro_alpha", 0.0, 1.0),
    }


def display_options() -> dict:
    """The display widgets (Rollout tab), side by side."""
    a, b, c = st.columns(3)
    method = state.select(
        "Upsampling",
        render.UPSAMPLING,
        state.DEFAULTS["ro_up"],
        key="ro_up",
        container=a,
        help="nearest: one flat block per patch (honest); bilinear: smooth; paper: the map as a blurred alpha mask",
    )
    cmap = state.select(
        "Colour map",
        colormaps.SEQUENTIAL,
        state.DEFAULTS["ro_cmap"],
        key="ro_cmap",
        container=b,
        help="sequential maps: 0 is the darkest colour",
    )
    with c:
        alpha = state.slider("Opacity", 0.0, 1.0, state.DEFAULTS["ro_alpha"], key="ro_alpha", step=0.05)
    return dict(method=method, cmap=cmap, alpha=alpha)


def overlay(
    ctx: Ctx,
    heat: np.ndarray,
    opts: dict,
    *,
    on_original: bool = False,
    vmax: float | None = None,
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """The map over the model's view (or the original upload), 0 to vmax (default: the map's
    maximum); `outline`, a patch mask (gh, gw), drawn around its patches on the model's view."""
    kw = dict(method=opts["method"], alpha=opts["alpha"], cmap=opts["cmap"], patch_size=ctx.lm.config.patch_size)
    kw |= dict(vmin=0.0, vmax=render.finite_max(heat) if vmax is None else vmax)
    if on_original:
        return render.overlay_on_original(*render.reduced_original(ctx.original, ctx.result.prepared), heat, **kw)
    img = render.overlay(ctx.result.prepared.view, heat, **kw)
    return img if outline is None else render.outline_patches(img, outline)


def target_mask(ctx: Ctx) -> np.ndarray | None:
    """The demo scene's ground-truth target mask on the model's input grid (H, W) bool (the same
    resize and crop as the image), or None when the image has none."""
    if ctx.scene_mask is None:
        return None
    from PIL import Image

    from model.preprocess import prepare_image

    mask = Image.fromarray(np.asarray(ctx.scene_mask, dtype=np.uint8) * 255).convert("RGB")
    return prepare_image(mask, ctx.lm.preprocessing).view[..., 0] > 127


def mask_controls(container=None) -> tuple[bool, float]:
    """The mass-threshold mask's controls (shared by the Heads and Rollout tabs): show it, and
    the share of the mass it keeps."""
    a, b = (container or st).columns([1, 2])
    with a:
        show = state.toggle("Mass mask", state.DEFAULTS["mk_show"], key="mk_show", help=MASK_HELP)
    with b:
        tau = state.slider(
            "Share of the mass the mask keeps", 0.05, 1.0, state.DEFAULTS["mk_tau"], key="mk_tau", step=0.05
        )
    return show, float(tau)


def method_select(label: str, container, help_extra: str = "") -> str:
    """The class-specific maps' method (kept as ro_method: the Rollout, Classes and Compare tabs
    and the report follow it)."""
    from viz_app.results import CLASS_MAPS

    return state.select(
        label,
        list(CLASS_MAPS),
        state.DEFAULTS["ro_method"],
        key="ro_method",
        container=container,
        format_func=lambda m: CLASS_MAPS[m],
        help="gradient rollout: attention x its gradient, rolled out; LRP: relevance propagated through every "
        "layer, times the attention gradient, rolled out (docs/DEFINITIONS.md)" + help_extra,
    )


MASK_HELP = (
    "DINO's mask: the smallest set of patches holding this share of the map's patch mass (0.6 in the DINO "
    "paper), outlined in " + render.MASK_COLOR_NAME
)


def with_colorbar(image: np.ndarray, heat: np.ndarray, opts: dict, label: str) -> np.ndarray:
    """An overlay and its colour bar side by side, as one picture (same height)."""
    if opts["method"] == "paper":  # an alpha mask over black: the bar shows the mask's scale
        bar = render.colorbar(image.shape[0], cmap="inferno", vmin=0.0, vmax=1.0, label="mask (share of max)")
    else:
        vmax = render.finite_max(heat)
        bar = render.colorbar(image.shape[0], cmap=opts["cmap"], vmin=0.0, vmax=vmax, label=label)
    return np.concatenate([image, bar], axis=1)


def show_map(
    ctx: Ctx,
    heat: np.ndarray,
    opts: dict,
    *,
    label: str,
    caption: str,
    on_original: bool = False,
    outline: np.ndarray | None = None,
):
    """Draw an overlay at a common display size with its colour bar and a caption saying what
    it is, how it was upsampled and what 0 looks like."""
    img = overlay(ctx, heat, opts, on_original=on_original, outline=outline)
    img, _ = render.enlarge(img, 224)  # small inputs enlarged: the colour bar beside them stays legible
    st.image(with_colorbar(img, heat, opts, label), caption=caption, width="stretch")


# Layers in motion (Rollout tab, Download tab): what can play through the layers
MOTION = {"rollout": "the rollout after each layer", "head": "the Heads tab's head through the layers"}
MOTION_SIDE = 320  # px: frames of small inputs are enlarged (nearest) to at least this


def motion_maps(ctx: Ctx, what: str, s: report.Settings) -> tuple[np.ndarray, list[str], str]:
    """The maps one animation plays, (L, gh, gw), each frame's label, and the quantity's name.

    rollout: the rollout from layer 1 to each layer (the settings' fusion, discard, read-out);
    head: the Heads tab's head (hd_head) in every layer, for its query and drop-prefix setting."""
    c = ctx.lm.config
    attn = ctx.result.forward.attentions
    if what == "rollout":
        maps = A.rollout_per_layer(attn, **report.per_layer_options(c, s))[0].numpy()
        labels = [f"Rollout, layer{f's 1-{i + 1}' if i else ' 1'} of {c.depth}" for i in range(c.depth)]
        return maps, labels, "rollout"
    head = min(max(int(state.read("hd_head") or 1), 1), c.num_heads)
    query = None
    if s.query_patch is not None:
        query = c.num_prefix_tokens + s.query_patch[0] * c.grid[1] + s.query_patch[1]
    maps = A.attention_maps(
        attn[0, :, head - 1], query=query, readout_tokens=c.readout_tokens, drop_prefix=s.drop_prefix, **ctx.kw
    ).numpy()
    who = "read-out" if query is None else f"patch {s.query_patch[0]},{s.query_patch[1]}"
    labels = [f"Layer {i + 1}/{c.depth}, head {head}, {who}" for i in range(c.depth)]
    return maps, labels, "attention"


def motion_frames(ctx: Ctx, maps: np.ndarray, labels: list[str], opts: dict, quantity: str) -> list[np.ndarray]:
    """One picture per map: its label above, the overlay (each frame from 0 to its own maximum)
    and its colour bar; all the same size. The page plays these and the exports write them."""
    frames = []
    for heat, label in zip(maps, labels):
        img, _ = render.enlarge(overlay(ctx, heat, opts), MOTION_SIDE)
        body = with_colorbar(img, heat, opts, quantity)
        band = np.full((34, body.shape[1], 3), 255, np.uint8)
        render.put_text(band, label, (6, 23), 0.55)
        frames.append(np.concatenate([band, body]))
    return frames
