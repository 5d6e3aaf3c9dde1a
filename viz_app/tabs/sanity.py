"""Sanity checks. For any model: cascading (and independent) model randomization (Adebayo et al.
2018): the model's parts are re-initialized from the top down and every map is recomputed; a map
that barely changes explains the image rather than the model (viz_app/probes.py; docs/DEFINITIONS.md,
'Model randomization'). For the demo model: on a generated scene whose target mask is known, where
each map points, by the loose and the strict pointing rule, and the model's scores on fresh scenes."""

from __future__ import annotations

import math

import cv2
import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from viz_app import analysis as A
from viz_app import colormaps, probes, report
from viz_app.analysis.faithfulness import minmax
from viz_app.demo.evaluate import POINTING_RULES, energy, patch_masks, pointing, pointing_strict
from viz_app.tabs import faithfulness, state
from viz_app.tabs.common import Ctx, result_slot, rollout_settings, target_class

KINDS = {
    "cascade": "Cascade from the top (head, then blocks L..1, then the embedding)",
    "independent": "Each part alone",
}
BARELY = 0.8  # Spearman above this after every block is re-initialized: the map barely changed


def scores_text(scores: dict) -> str:
    strict = scores.get("pointing_strict", {})
    parts = [
        f"**Scores on {scores['scenes']} fresh scenes** (seed {scores['seed']}, never used in training): "
        f"top-1 accuracy {scores['top1_accuracy']:.1%}.",
        "Pointing game, loose rule: " + ", ".join(f"{k} {v:.1%}" for k, v in scores["pointing"].items()) + ".",
    ]
    if strict:
        parts.append("Strict rule: " + ", ".join(f"{k} {v:.1%}" for k, v in strict.items()) + ".")
    parts.append(
        f"Rollout energy {scores['energy']['rollout']:.2f}; position-embedding neighbour contrast "
        f"{scores['pos_embed_neighbour_contrast']:.2f}."
    )
    mk = scores.get("mask_iou")
    if mk:
        parts.append(
            f"Mask IoU with the target (smallest set of patches holding {mk['tau']:.0%} of the map's mass, as in "
            f"DINO): rollout {mk['maps']['rollout']:.2f}, last layer's head-averaged map {mk['maps']['last_layer_cls']:.2f}, "
            f"centre prior {mk['maps']['centre_prior']:.2f}."
        )
    return " ".join(parts)


def draw(ctx: Ctx) -> None:
    randomization_section(ctx)
    st.divider()
    pointing_section(ctx)


def pointing_section(ctx: Ctx) -> None:
    c = ctx.lm.config
    mask, scores = ctx.scene_mask, ctx.demo_scores
    st.markdown("#### Pointing game (demo model)")
    if ctx.source != "demo":
        st.info(
            "The pointing game needs ground truth: it runs with the embedded demo model on its generated scenes, "
            "whose target masks are known. Choose 'Embedded demo' in the sidebar."
        )
        return
    if scores:
        st.markdown(scores_text(scores))
    st.caption(f"Rules: {POINTING_RULES['pointing']}; {POINTING_RULES['pointing_strict']}.")
    if mask is None:
        st.info("Pick one of the demo scenes in the gallery ('scene: ...') to see where each map points on it.")
        return
    view = ctx.result.prepared.view
    m = cv2.resize(mask.astype(np.uint8), (view.shape[1], view.shape[0]), interpolation=cv2.INTER_NEAREST)
    pm = patch_masks(m[None].astype(bool), c.patch_size)
    maps = {"rollout": ctx.result.rollout}
    maps["last-layer read-out token"] = A.attention_maps(ctx.result.attentions[-1], **ctx.kw).mean(0).numpy()
    if c.num_classes:
        top = ctx.result.top5[0][0]
        maps[f"gradient rollout ({ctx.label(top)})"] = ctx.gradient_map(top)
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
        centre = (int((cc + 0.5) * ps), int((r + 0.5) * ps))
        cv2.drawMarker(canvas, centre, colour, cv2.MARKER_CROSS, max(8, ps // 3), 2)
        rows.append(
            {
                "map": name,
                "argmax patch (row, col)": f"({r}, {cc})",
                "loose rule": "hit" if bool(pointing(heat[None], pm)[0]) else "miss",
                "strict rule": "hit"
                if bool(pointing_strict(heat[None], m[None].astype(bool), c.patch_size)[0])
                else "miss",
                "energy": f"{float(energy(heat[None], pm)[0]):.2f}",
            }
        )
    left, right = st.columns([1, 1])
    left.image(
        canvas,
        caption="Green: the target's outline. Boxes: each map's argmax patch, crosses its centre "
        "(red rollout, blue last-layer read-out token, magenta gradient rollout).",
    )
    right.table(rows)
    right.caption(
        "Loose: the argmax patch overlaps the target by at least one pixel. Strict: the argmax patch's centre "
        "pixel lies inside the target. Energy: the map's mass inside the target divided by the target's share "
        "of the image (1 = chance)."
    )


# ---- model randomization (any model) -------------------------------------------------------------


def run_key(ctx: Ctx, kind: str) -> tuple:
    c = ctx.lm.config
    options = report.rollout_options(c, rollout_settings(ctx))
    return (
        "randomization",
        ctx.source,
        str(ctx.lm.device),
        str(ctx.lm.dtype),
        ctx.image_digest,
        kind,
        tuple(sorted(options.items())),
        faithfulness.chosen_head(ctx),
        target_class(ctx),
    )


def run_randomization(ctx: Ctx, kind: str, progress=None) -> probes.Randomization:
    """probes.randomization on this image with the Rollout tab's settings, the Rollout tab's class
    and the Heads tab's head (the maps of the Faithfulness tab)."""
    lm = ctx.lm
    options = report.rollout_options(lm.config, rollout_settings(ctx))
    head = faithfulness.chosen_head(ctx)
    cls = target_class(ctx)
    pixels = ctx.pixels
    return probes.randomization(
        lm.model,
        pixels,
        lambda fwd: probes.attribution_maps(lm, fwd, options, head=head),
        kind=kind,
        target=None if cls is None else torch.tensor([cls]),
        gradients=cls is not None,
        progress=progress,
    )


def _finite(values: np.ndarray) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def short_label(step: str) -> str:
    """A step's tick label: 'orig.', 'head', the block's number, 'emb.' (the axis title says what
    they are)."""
    if step.startswith("block "):
        return step[len("block ") :]
    return {"original": "orig.", "embedding": "emb."}.get(step, step)


def steps_title(kind: str) -> str:
    if kind == "independent":
        return "re-initialized alone: the head, block n, the embedding"
    return "re-initialized from the top down to: the head, block n, the embedding"


def similarity_figure(rnd: probes.Randomization, which: str) -> go.Figure:
    """Spearman or SSIM of each map with the original model's, per step."""
    values = rnd.spearman if which == "spearman" else rnd.ssim
    data = [
        dict(
            type="scatter",
            x=[short_label(lab) for lab in rnd.labels],
            y=_finite(v[:, 0]),
            text=list(rnd.labels),
            mode="lines+markers",
            name=probes.label(name),
            line=dict(color=faithfulness.colour(name), width=2),
            marker=dict(size=6),
            hovertemplate=f"{probes.label(name)}<br>%{{text}}<br>%{{y:.3f}}<extra></extra>",
        )
        for name, v in values.items()
    ]
    title = "Spearman with the original map" if which == "spearman" else "SSIM with the original map"
    layout = dict(
        title=dict(text=title, font=dict(size=13)),
        xaxis=dict(
            title=dict(text="re-initialized alone" if rnd.kind == "independent" else "re-initialized down to"),
            type="category",
        ),
        yaxis=dict(
            title=dict(text="Spearman rank correlation" if which == "spearman" else "SSIM"), range=[-1.05, 1.05]
        ),
        height=420,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0),
    )
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def strip_figure(rnd: probes.Randomization) -> go.Figure:
    """Maps as rows, steps as columns, each tile from its own minimum (darkest) to its maximum."""
    names = list(rnd.maps)
    tiles = np.stack([minmax(rnd.maps[k][:, 0]) for k in names])  # (R, S, gh, gw)
    R, S, h, w = tiles.shape
    gap = max(1, round(max(h, w) / 8))
    cells = np.full((R, h + gap, S, w + gap), np.nan)
    cells[:, :h, :, :w] = tiles.transpose(0, 2, 1, 3)
    big = cells.reshape(R * (h + gap), S * (w + gap))[:-gap, :-gap]
    who = np.full(big.shape, "", dtype=object)  # hover: which map, which step
    for r, name in enumerate(names):
        for s_, lab in enumerate(rnd.labels):
            who[r * (h + gap) : r * (h + gap) + h, s_ * (w + gap) : s_ * (w + gap) + w] = f"{probes.label(name)}, {lab}"
    cmap = colormaps.get(colormaps.DEFAULT_SEQUENTIAL)
    heat = dict(
        type="heatmap",
        z=big,
        text=who,
        zmin=0.0,
        zmax=1.0,
        colorscale=cmap.plotly_scale(),
        colorbar=dict(title=dict(text="share of the map's range", side="right"), thickness=12),
        hovertemplate="%{text}<br>%{z:.2f} of the range<extra></extra>",
    )
    axis = dict(showgrid=False, zeroline=False, constrain="domain", ticks="")
    layout = dict(
        height=int(90 + R * 80),
        margin=dict(l=10, r=10, t=50, b=10),
        dragmode=False,
        xaxis=dict(
            tickvals=np.arange(S) * (w + gap) + (w - 1) / 2,
            ticktext=[short_label(lab) for lab in rnd.labels],
            title=dict(text=steps_title(rnd.kind), font=dict(size=11)),
            side="top",
            **axis,
        ),
        yaxis=dict(
            tickvals=np.arange(R) * (h + gap) + (h - 1) / 2,
            ticktext=[probes.label(k) for k in names],
            autorange="reversed",
            scaleanchor="x",
            **axis,
        ),
    )
    return go.Figure(dict(data=[heat], layout=layout), _validate=False)


def randomization_sentence(rnd: probes.Randomization) -> str:
    """Which maps barely change when the weights are destroyed."""
    names = list(rnd.spearman)
    if rnd.kind == "cascade":
        # the step after which the head and every block are re-initialized
        step = rnd.labels.index("block 1") if "block 1" in rnd.labels else len(rnd.labels) - 1
        found = {k: float(rnd.spearman[k][step, 0]) for k in names}
        where = "once the head and every block are re-initialized"
    else:
        blocks = [i for i, lab in enumerate(rnd.labels) if lab.startswith("block ")]
        found = {
            k: float(np.nanmin(v)) if np.isfinite(v := rnd.spearman[k][blocks, 0]).any() else float("nan")
            for k in names
        }
        where = "for the block whose re-initialization changes it most"
    listed = ", ".join(f"{probes.label(k)} {v:.2f}" for k, v in found.items())
    barely = [probes.label(k) for k, v in found.items() if v > BARELY]
    undefined = [probes.label(k) for k, v in found.items() if v != v]
    text = f"Spearman with the original map {where}: {listed}."
    if undefined:
        text += (
            f" Undefined (nan) for {', '.join(undefined)}: a constant map, or one with NaN or infinite values, "
            "has no order to compare, so no conclusion can be drawn for it."
        )
        if len(undefined) == len(found):
            return text
    if barely:
        text += (
            f" {', '.join(barely)} barely change{'s' if len(barely) == 1 else ''} (Spearman above {BARELY}): "
            "such a map explains the image rather than the model."
        )
    else:
        text += (
            f" No {'other ' if undefined else ''}map keeps a Spearman above {BARELY}: "
            f"{'they depend' if undefined else 'every map depends'} on the weights, as {'they' if undefined else 'it'} should."
        )
    return text


def randomization_section(ctx: Ctx) -> None:
    c = ctx.lm.config
    st.markdown("#### Model randomization (Adebayo et al. 2018)")
    kind = state.radio(
        "Re-initialize",
        list(KINDS),
        state.DEFAULTS["sn_kind"],
        key="sn_kind",
        horizontal=True,
        format_func=lambda k: KINDS[k],
        help="cascade: each step keeps the parts re-initialized before it; each part alone: one part at a time",
    )
    layer, head = faithfulness.chosen_head(ctx)
    cls = target_class(ctx)
    st.caption(
        "The model's parts are re-initialized by its own init rules, and the maps of the Faithfulness tab (rollout "
        f"with the Rollout tab's settings{', gradient rollout for ' + repr(ctx.label(cls)) if cls is not None else ''}"
        f", the last layer's mean of heads, layer {layer} head {head}) are recomputed and compared with the "
        "original model's by Spearman rank correlation and SSIM. A map that barely changes when the weights "
        "are destroyed explains the image, not the model. The cached model is never changed: each step runs a "
        "new model that shares the untouched weights. Data randomization (retraining on shuffled labels) is out "
        "of scope: it needs training."
    )
    if state.read("pr_ablate"):
        st.caption(
            "The heads removed on the Probes tab are not removed here: randomization starts from the full model."
        )
    box = result_slot(run_key(ctx, kind))
    if "run" not in box:
        steps = c.depth + 3
        if not st.button(
            "Run randomization",
            key="sn_run",
            help=f"{steps} forward{' and backward' if cls is not None else ''} passes of this image",
        ):
            st.info(f"Press 'Run randomization' ({steps} passes of this model through the image).")
            return
        bar = st.progress(0.0, text="Re-initializing and recomputing the maps...")
        try:
            found = run_randomization(ctx, kind, progress=lambda f: bar.progress(min(1.0, float(f))))
        except (ValueError, RuntimeError) as e:
            bar.empty()
            st.error(f"The randomization could not run: {e}")
            return
        bar.empty()
        box["run"] = found
    rnd: probes.Randomization = box["run"]
    st.markdown(randomization_sentence(rnd))
    st.plotly_chart(strip_figure(rnd), key="sn_strip", config={"displayModeBar": False})
    st.caption(
        f"Rows: the maps; columns: the steps (orig.: the trained model; head; {c.depth}, {c.depth - 1}, ...: "
        "blocks, counted from 1; "
        "emb.: the patch and position embeddings). Each tile from its minimum (darkest) to its maximum."
    )
    left, right = st.columns(2)
    with left:
        st.plotly_chart(similarity_figure(rnd, "spearman"), key="sn_spearman")
    with right:
        st.plotly_chart(similarity_figure(rnd, "ssim"), key="sn_ssim")
    st.caption(
        "Spearman: rank correlation of the patches' values (1 = the same order); SSIM of the maps scaled to [0, 1] "
        "(7 x 7 window). Full definitions: docs/DEFINITIONS.md, 'Model randomization'."
    )
    if ctx.source == "demo":
        st.caption(
            "The demo scores' 're-initialized rollout' baseline (reinit_rollout, below) is one case of this: the "
            "whole model re-initialized, the cascade's last step with the same seed, over 2000 scenes."
        )
