"""The page's tabs. Each view takes plain values (model, result, settings) and draws."""

from __future__ import annotations

import io
import json
import platform
from dataclasses import dataclass

import numpy as np
import streamlit as st
import torch

from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import figures, render
from viz_app.results import ImageResult

CMAPS = list(render.COLORMAPS)


@dataclass(frozen=True)
class Ctx:
    """What every view needs: the model, this image's result, and how to fetch more."""

    lm: LoadedModel
    result: ImageResult
    original: np.ndarray  # the uploaded image, RGB
    source: str
    device: str
    dtype: str
    digest: str

    @property
    def kw(self) -> dict:
        c = self.lm.config
        return dict(num_prefix=c.num_prefix_tokens, grid=c.grid)

    def label(self, i: int) -> str:
        return self.lm.labels[i] if self.lm.labels else f"class {i}"


def tile_scale(grid: tuple[int, int], width_px: int) -> int:
    """Pixels per value so that a grid of grid-sized tiles is about width_px wide."""
    return max(1, width_px // (grid[1] * (grid[1] + 1)))


def display_options(prefix: str) -> dict:
    """Upsampling, colormap and opacity, side by side."""
    a, b, c = st.columns(3)
    method = a.selectbox(
        "Upsampling",
        render.UPSAMPLING,
        key=f"{prefix}_up",
        help="nearest: one flat block per patch (honest); bilinear: smooth; paper: the authors' blurred alpha mask",
    )
    cmap = b.selectbox("Colormap", CMAPS, key=f"{prefix}_cmap")
    alpha = c.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key=f"{prefix}_alpha")
    return dict(method=method, cmap=cmap, alpha=alpha)


def _overlay(ctx: Ctx, heat: np.ndarray, opts: dict, *, on_original: bool = False) -> np.ndarray:
    kw = dict(method=opts["method"], alpha=opts["alpha"], cmap=opts["cmap"], patch_size=ctx.lm.config.patch_size)
    if on_original:
        return render.overlay_on_original(ctx.original, ctx.result.prepared, heat, **kw)
    return render.overlay(ctx.result.prepared.view, heat, **kw)


# ---- Overview ----------------------------------------------------------------------------------


def overview(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    left, mid, right = st.columns([1, 1.2, 1.2])
    with left:
        st.markdown("**Top-5 predictions**")
        if r.probs is None:
            st.info("This model has no classifier: it returns features, so there are no class predictions.")
        else:
            names = [ctx.label(i) for i, _ in r.top5]
            st.plotly_chart(figures.top_classes(names, [p for _, p in r.top5]), key="ov_top5")
    with mid:
        st.image(
            render.draw_patch_grid(r.prepared.view, c.patch_size),
            caption=f"What the model sees: {c.image_size[1]}x{c.image_size[0]} px, "
            f"{c.grid[0]}x{c.grid[1]} patches of {c.patch_size} px",
        )
    with right:
        opts = {"method": "nearest", "alpha": 0.55, "cmap": "inferno"}
        on_original = st.toggle("Show on the original image", key="ov_original")
        st.image(
            _overlay(ctx, r.rollout, opts, on_original=on_original),
            caption="Attention rollout (mean of heads, all layers)",
        )


# ---- Heads -------------------------------------------------------------------------------------


def _apply_patch_click(patch_size: int, grid: tuple[int, int]) -> None:
    """A click on the patch picker (state of the 'hd_click' chart) selects that patch. Runs
    before the row/column widgets exist, so it may set their values."""
    ss = st.session_state
    state = ss.get("hd_click")
    points = []
    if state is not None:
        selection = state.get("selection") if isinstance(state, dict) else getattr(state, "selection", None)
        if selection is not None:
            points = selection.get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    if not points:
        return
    x, y = float(points[0]["x"]), float(points[0]["y"])
    if ss.get("hd_click_applied") == (x, y):
        return  # already applied; later edits of row/column win
    ss["hd_click_applied"] = (x, y)
    try:
        row, col, _ = render.patch_at(x, y, patch_size=patch_size, grid=grid, num_prefix=0)
    except ValueError:
        return  # a click on the margin
    ss["hd_row"], ss["hd_col"], ss["hd_mode"] = row, col, "patch"


def query_selector(ctx: Ctx) -> int | None:
    """Read-out token (default) or a patch, chosen by clicking the image or by row/column."""
    c = ctx.lm.config
    gh, gw = c.grid
    _apply_patch_click(c.patch_size, c.grid)
    mode = st.radio(
        "Query", ["read-out token", "patch"], horizontal=True, key="hd_mode", help="Whose attention to show"
    )
    a, b = st.columns(2)
    row = a.number_input("Patch row", 0, gh - 1, key="hd_row")
    col = b.number_input("Patch column", 0, gw - 1, key="hd_col")
    st.plotly_chart(
        figures.clickable_view(
            ctx.result.prepared.view,
            c.patch_size,
            num_prefix=c.num_prefix_tokens,
            selected=(row, col) if mode == "patch" else None,
        ),
        key="hd_click",
        on_select="rerun",
        selection_mode="points",
    )
    st.caption("Click a patch to make it the query.")
    if mode == "read-out token":
        return None
    return c.num_prefix_tokens + row * gw + col


def heads(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    left, right = st.columns([1, 1.4])
    with left:
        query = query_selector(ctx)
        drop = st.toggle("Drop prefix tokens and renormalize", key="hd_drop")
    who = "the read-out token" if query is None else f"token {query}"
    if query is None and not c.readout_tokens:
        who = "the mean of the patch tokens (no class token)"
    maps = A.attention_maps(r.attentions, query=query, readout_tokens=c.readout_tokens, drop_prefix=drop, **ctx.kw)
    maps = maps.numpy()  # (L, H, gh, gw)
    with right:
        layer = st.slider("Layer", 1, c.depth, c.depth, key="hd_layer")
        head = st.selectbox("Head", list(range(c.num_heads)), key="hd_head")
        st.plotly_chart(
            figures.patch_heatmap(
                maps[layer - 1, head],
                num_prefix=c.num_prefix_tokens,
                zmin=0,
                title=f"Layer {layer}, head {head}: attention of {who}",
                colorbar_title="attention",
            ),
            key="hd_big",
        )
    st.markdown(
        f"**All layers x heads** (rows: layers 1-{c.depth}, columns: heads 0-{c.num_heads - 1}; each map on its own scale)"
    )
    tiles = maps / np.maximum(maps.max(axis=(2, 3), keepdims=True), 1e-12)
    st.image(render.tile_grid(tiles, vmin=0, vmax=1, cmap="inferno", scale=max(1, 48 // max(c.grid))))
    a, b = st.columns(2)
    with a:
        if query is not None and query >= c.num_prefix_tokens:
            patch = query - c.num_prefix_tokens
            rev = A.attention_to_patch(r.attentions[layer - 1, head], patch=patch, **ctx.kw).numpy()
            st.plotly_chart(
                figures.patch_heatmap(
                    rev,
                    num_prefix=c.num_prefix_tokens,
                    zmin=0,
                    title=f"Who attends to patch {divmod(patch, c.grid[1])} (layer {layer}, head {head})",
                ),
                key="hd_rev",
            )
        else:
            st.info("Pick a patch as the query to see the reverse view: which patches attend to it.")
    with b:
        st.plotly_chart(figures.layer_head_matrix(r.mad, title="Mean attention distance", unit="px"), key="hd_mad")
        st.plotly_chart(
            figures.layer_head_matrix(r.entropy, title="Attention entropy (mean over queries)", unit="nats"),
            key="hd_ent",
        )


# ---- Rollout -----------------------------------------------------------------------------------


def readout_choices(ctx: Ctx) -> list[str]:
    c = ctx.lm.config
    if not c.class_token:
        return ["patches"]
    return ["auto", "cls", "dist", "mean", "patches"] if c.distill_token else ["auto", "cls", "patches"]


def rollout(ctx: Ctx) -> None:
    c = ctx.lm.config
    r = ctx.result
    a, b, d = st.columns(3)
    fusion = a.selectbox("Head fusion", ["mean", "max", "min"], key="ro_fusion", help="mean is the paper's choice")
    discard = b.slider(
        "Discard ratio", 0.0, 0.95, 0.0, 0.05, key="ro_discard", help="zero the lowest entries per layer"
    )
    readout = d.selectbox("Read-out token", readout_choices(ctx), key="ro_readout")
    start, end = st.slider("Layers", 1, c.depth, (1, c.depth), key="ro_layers")
    opts = display_options("ro")
    attn = r.attentions[None]
    kw = dict(readout_tokens=c.readout_tokens, readout=readout, head_fusion=fusion, discard_ratio=discard, **ctx.kw)
    heat = A.attention_rollout(attn, start=start - 1, end=end - 1, **kw)[0].numpy()
    left, right = st.columns(2)
    left.image(
        _overlay(ctx, heat, opts), caption=f"Rollout, layers {start}-{end}, {fusion} fusion, discard {discard:.2f}"
    )
    with right:
        if c.num_classes:
            top = int(np.argmax(r.probs))
            options = list(range(c.num_classes))
            target = st.selectbox(
                "Class for the gradient-weighted rollout (Chefer et al. 2021)",
                options,
                index=top,
                format_func=lambda i: f"{ctx.label(i)} ({r.probs[i]:.1%})",
                key="ro_class",
            )
            from viz_app.cache import get_gradient_map

            with st.spinner("One backward pass for the class..."):
                gmap = get_gradient_map(ctx.source, ctx.device, ctx.dtype, ctx.digest, int(target), ctx.original)
            st.image(_overlay(ctx, gmap, opts), caption=f"Gradient rollout for '{ctx.label(int(target))}'")
        else:
            st.info("Class-specific maps need a classifier head; this model has none.")
    strip = A.rollout_per_layer(attn, **kw)[0].numpy()  # (L, gh, gw)
    st.markdown("**Rollout after each layer** (from layer 1; each on its own scale)")
    tiles = strip / np.maximum(strip.max(axis=(1, 2), keepdims=True), 1e-12)
    st.image(render.tile_grid(tiles[None], vmin=0, vmax=1, cmap="inferno", scale=max(1, 64 // max(c.grid))))


# ---- Embeddings --------------------------------------------------------------------------------


def embeddings(ctx: Ctx) -> None:
    c = ctx.lm.config
    gh, gw = c.grid
    pos = ctx.lm.model.pos_embed.detach().float().cpu()[0, c.pos_embed_prefix :]
    sim = A.position_similarity(pos).numpy()
    st.markdown(
        "**Position-embedding similarity** (paper Fig. 7, centre): tile (r, c) shows the cosine similarity "
        "of patch (r, c)'s position embedding to every other patch; one scale from -1 to 1."
    )
    left, right = st.columns([1.4, 1])
    tiles = A.similarity_tiles(torch.from_numpy(sim), c.grid).numpy()
    left.image(render.tile_grid(tiles, vmin=-1, vmax=1, cmap="viridis", scale=tile_scale(c.grid, 600)))
    with right:
        a, b = st.columns(2)
        pr = a.number_input("Patch row", 0, gh - 1, gh // 2, key="pe_row")
        pc = b.number_input("Patch column", 0, gw - 1, gw // 2, key="pe_col")
        st.plotly_chart(
            figures.patch_heatmap(
                tiles[pr, pc],
                num_prefix=c.num_prefix_tokens,
                zmin=-1,
                zmax=1,
                colorscale="Viridis",
                title=f"Similarity to patch ({pr}, {pc})",
                colorbar_title="cos",
            ),
            key="pe_big",
        )
        st.caption(
            f"Neighbour contrast (4-neighbours minus 4+ apart): {A.neighbour_contrast(torch.from_numpy(sim), c.grid):.3f}"
        )
    if c.linear_patch_embed:
        patch_filters(ctx)
    else:
        st.markdown("**Patch-embedding filters** (paper Fig. 7, left)")
        st.info(
            f"Not available for this model: it embeds patches with a convolutional stem ({len(c.conv_stem)} "
            "stride-2 conv layers before the projection), so there is no linear filter per patch whose principal "
            "components could be shown in pixel space."
        )
    st.markdown("**Token norms per layer**, with high-norm outlier patch tokens (over 2x the layer's median) marked")
    norms = ctx.result.token_norms
    outl = A.token_norm_outliers(torch.from_numpy(norms), num_prefix=c.num_prefix_tokens).numpy()
    st.plotly_chart(
        figures.token_norm_map(norms, outl, num_prefix=c.num_prefix_tokens, prefix_names=c.prefix_names), key="pe_norms"
    )


def patch_filters(ctx: Ctx) -> None:
    c = ctx.lm.config
    st.markdown(
        "**Patch-embedding filters** (paper Fig. 7, left): principal components of the linear patch "
        "embedding, centred first, each with its own symmetric contrast (grey = 0), sign fixed."
    )
    pca = A.filter_pca(ctx.lm.model.patch_embed.proj.weight.detach().float().cpu())
    st.image(render.filter_tiles(pca.components.numpy(), cols=7, scale=max(2, 48 // c.patch_size)))
    ev = pca.explained_variance_ratio.numpy()
    pre = ctx.lm.preprocessing
    st.caption(
        f"Explained variance of the first {len(ev)}: {ev.sum():.1%} (first three: "
        + ", ".join(f"{v:.1%}" for v in ev[:3])
        + f"). The filters act on normalized pixels: mean {pre.mean}, std {pre.std}."
    )


# ---- Attention distance ------------------------------------------------------------------------


def distance(ctx: Ctx, example_mad) -> None:
    conv = st.radio(
        "Prefix tokens",
        ["as_is", "renormalized"],
        format_func=lambda v: (
            "attention on prefix tokens counts as distance 0 (paper formula)"
            if v == "as_is"
            else "renormalize each query's attention over patches"
        ),
        key="md_conv",
    )
    mad = ctx.result.mad if conv == "as_is" else ctx.result.mad_renorm
    st.plotly_chart(figures.mad_scatter_figure(mad, title="This image", convention=conv), key="md_this")
    if st.button("Average over the example gallery", key="md_examples"):
        st.session_state["md_show_examples"] = True
    if st.session_state.get("md_show_examples"):
        with st.spinner("Running the model on every example image..."):
            avg, n = example_mad(conv)
        st.plotly_chart(
            figures.mad_scatter_figure(avg, title=f"Mean over {n} example images", convention=conv), key="md_avg"
        )


# ---- Download ----------------------------------------------------------------------------------


def analysis_npz(ctx: Ctx, settings: dict) -> bytes:
    r = ctx.result
    arrays = {
        "rollout": r.rollout,
        "mean_attention_distance": r.mad,
        "attention_entropy": r.entropy,
        "token_norms": r.token_norms,
        "attentions": r.attentions.numpy().astype(np.float32),
        "model_view": r.prepared.view,
    }
    if r.probs is not None:
        arrays["probabilities"] = r.probs
    else:
        arrays["features"] = r.features
    meta = {
        "settings": settings,
        "model": {
            "name": ctx.lm.name,
            "source": ctx.source,
            "family": ctx.lm.family,
            "config": ctx.lm.config.to_dict(),
        },
        "preprocessing": ctx.lm.preprocessing.to_dict(),
        "device": ctx.device,
        "dtype": ctx.dtype,
        "image_sha256_prefix": ctx.digest,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "streamlit": st.__version__,
        },
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, settings_json=np.array(json.dumps(meta, indent=2)), **arrays)
    return buf.getvalue()


def download(ctx: Ctx, settings: dict) -> None:
    st.markdown(
        "Download what this page shows. The NPZ holds every array plus `settings_json` (model, "
        "preprocessing, settings and library versions)."
    )
    opts = {"method": "nearest", "alpha": 0.55, "cmap": "inferno"}
    png = render.to_png(_overlay(ctx, ctx.result.rollout, opts))
    st.download_button("Rollout overlay (PNG)", png, file_name="rollout.png", mime="image/png", key="dl_png")
    png_o = render.to_png(_overlay(ctx, ctx.result.rollout, opts, on_original=True))
    st.download_button(
        "Rollout on the original image (PNG)",
        png_o,
        file_name="rollout_original.png",
        mime="image/png",
        key="dl_png_orig",
    )
    st.download_button(
        "Analysis (NPZ)",
        analysis_npz(ctx, settings),
        file_name="analysis.npz",
        mime="application/octet-stream",
        key="dl_npz",
    )


# ---- Compare -----------------------------------------------------------------------------------


def compare(ctx: Ctx, other: LoadedModel | None, other_result: ImageResult | None, other_name: str) -> None:
    if other is None:
        st.info("Choose a second model above to compare it with the current one.")
        return
    ca, cb = ctx.lm.config, other.config
    a, b = st.columns(2)
    method = a.selectbox(
        "Resampling to the common grid",
        ["bicubic", "bilinear", "bicubic_dino", "bicubic_plain", "nearest"],
        key="cmp_method",
        help="bicubic: timm (antialiased); bilinear: the original JAX code; bicubic_dino: DINO (+0.1 offset)",
    )
    grids = sorted({ca.grid, cb.grid}, key=lambda g: g[0] * g[1])
    grid = b.selectbox("Common grid", grids[::-1], format_func=lambda g: f"{g[0]}x{g[1]}", key="cmp_grid")
    pa = ctx.lm.model.pos_embed.detach().float().cpu()[0, ca.pos_embed_prefix :]
    pb = other.model.pos_embed.detach().float().cpu()[0, cb.pos_embed_prefix :]
    cmp = A.compare_position_embeddings(pa, ca.grid, pb, cb.grid, grid=grid, method=method)
    cols = st.columns(3)
    for col, sim, title in ((cols[0], cmp.sim_a, ctx.lm.name), (cols[1], cmp.sim_b, other_name)):
        col.markdown(f"**{title}**")
        col.image(render.tile_grid(A.similarity_tiles(sim, grid).numpy(), vmin=-1, vmax=1, scale=tile_scale(grid, 400)))
    cols[2].markdown("**Difference (first - second)**")
    cols[2].image(
        render.tile_grid(
            A.similarity_tiles(cmp.difference, grid).numpy(),
            vmin=-1,
            vmax=1,
            cmap="coolwarm",
            scale=tile_scale(grid, 400),
        )
    )
    st.caption(f"Both resampled to {grid[0]}x{grid[1]} with '{method}'. Difference colour scale: -1 (blue) to 1.")
    left, right = st.columns(2)
    left.plotly_chart(
        figures.curves(
            {
                ctx.lm.name: (cmp.decay_a[0].numpy(), cmp.decay_a[1].numpy()),
                other_name: (cmp.decay_b[0].numpy(), cmp.decay_b[1].numpy()),
            },
            title="Similarity decay",
            x_title="grid distance (patches)",
            y_title="mean cosine similarity",
        ),
        key="cmp_decay",
    )
    right.markdown(
        f"**Row vs column anisotropy** (mean similarity along rows minus along columns):\n\n"
        f"- {ctx.lm.name}: {cmp.anisotropy_a:+.3f}\n- {other_name}: {cmp.anisotropy_b:+.3f}"
    )
    if other_result is not None:
        x, y = st.columns(2)
        opts = {"method": "nearest", "alpha": 0.55, "cmap": "inferno"}
        x.image(_overlay(ctx, ctx.result.rollout, opts), caption=f"Rollout: {ctx.lm.name}")
        y.image(
            render.overlay(other_result.prepared.view, other_result.rollout, patch_size=cb.patch_size),
            caption=f"Rollout: {other_name}",
        )


# ---- Sanity check (demo model) -----------------------------------------------------------------


def sanity(ctx: Ctx, mask: np.ndarray | None, scores: dict | None) -> None:
    """Where the maps point on a scene whose target mask we know, and the model's test scores."""
    import cv2

    from viz_app.demo.evaluate import energy, patch_masks, pointing

    c = ctx.lm.config
    if scores:
        st.markdown(
            f"**Scores on {scores['scenes']} fresh scenes** (seed {scores['seed']}, never used in training): "
            f"top-1 accuracy {scores['top1_accuracy']:.1%}; pointing game (argmax patch on the target): "
            + ", ".join(f"{k} {v:.1%}" for k, v in scores["pointing"].items())
            + f"; rollout energy {scores['energy']['rollout']:.2f}; position-embedding neighbour contrast "
            f"{scores['pos_embed_neighbour_contrast']:.2f}."
        )
    if mask is None:
        st.info("Pick one of the demo scenes in the gallery ('scene: ...') to see where each map points on it.")
        return
    view = ctx.result.prepared.view
    m = cv2.resize(mask.astype(np.uint8), (view.shape[1], view.shape[0]), interpolation=cv2.INTER_NEAREST)
    pm = patch_masks(m[None].astype(bool), c.patch_size)
    maps = {"rollout": ctx.result.rollout}
    maps["last-layer class token"] = A.attention_maps(ctx.result.attentions[-1], **ctx.kw).mean(0).numpy()
    if c.num_classes:
        from viz_app.cache import get_gradient_map

        top = int(np.argmax(ctx.result.probs))
        maps[f"gradient rollout ({ctx.label(top)})"] = get_gradient_map(
            ctx.source, ctx.device, ctx.dtype, ctx.digest, top, ctx.original
        )
    scale = 4
    canvas = cv2.resize(view, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(
        cv2.resize(m, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(canvas, contours, -1, (0, 255, 0), 2)
    colours = [(255, 0, 0), (0, 128, 255), (255, 0, 255)]
    rows = []
    for (name, heat), colour in zip(maps.items(), colours):
        r, cc = np.unravel_index(int(np.argmax(heat)), heat.shape)
        ps = c.patch_size * scale
        cv2.rectangle(canvas, (cc * ps, r * ps), ((cc + 1) * ps - 1, (r + 1) * ps - 1), colour, 2)
        hit = bool(pointing(heat[None], pm)[0])
        rows.append(
            {
                "map": name,
                "argmax patch": f"({r}, {cc})",
                "on the target": "yes" if hit else "no",
                "energy": round(float(energy(heat[None], pm)[0]), 2),
            }
        )
    left, right = st.columns([1, 1])
    left.image(
        canvas,
        caption="Green: the target's outline. Boxes: each map's argmax patch "
        "(red rollout, blue last-layer class token, magenta gradient rollout).",
    )
    right.table(rows)
    right.caption("Energy: the map's mass inside the target divided by the target's share of the image (1 = chance).")
