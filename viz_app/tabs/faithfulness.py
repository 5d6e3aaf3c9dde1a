"""Faithfulness: which map to believe for this image. Patches are removed in the order of each map
(most relevant first: deletion; least relevant first: insertion-like) and the target class's
probability is followed; the area under each curve says how much of what the model uses the map
found (viz_app/probes.py; docs/DEFINITIONS.md, 'Faithfulness (perturbation) curves').

The maps: rollout with the Rollout tab's settings, gradient rollout for the Rollout tab's class,
the last layer's read-out attention (mean of heads), the Heads tab's head, and two baselines
(centre prior, random order). Heads removed on the Probes tab are removed here too: the maps and
every perturbed input then come from the ablated model.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from viz_app import probes, render, report
from viz_app.analysis.faithfulness import DIRECTIONS
from viz_app.pipeline import run_forward
from viz_app.tabs import state
from viz_app.tabs.common import Ctx, result_slot, rollout_settings, target_class

MODE_NAMES = {
    "drop": "Drop the patches' tokens (ViT-native)",
    "pixels": "Replace the patches' pixels by the mean",
}
MODE_HELP = (
    "Drop: the removed patches' tokens leave the sequence; the class, distillation and register "
    "tokens always stay (ViTs take any number of tokens). Pixels: the removed patches' pixels are "
    "set to the preprocessing mean (0 after normalization), the CNN-era protocol that published "
    "numbers use."
)
DIRECTION_TITLES = {
    "deletion": "Deletion: most relevant removed first",
    "insertion": "Insertion-like: least relevant removed first",
}
# explicit rgb strings (never hex: Streamlit's theme rewrites #000001-#000040)
COLOURS = {
    "rollout": "rgb(49, 104, 142)",
    "grad_rollout": "rgb(230, 97, 1)",
    "last_layer": "rgb(94, 60, 153)",
    probes.CENTRE: "rgb(27, 158, 119)",
    probes.RANDOM: "rgb(110, 110, 110)",
}
HEAD_COLOUR = "rgb(200, 40, 120)"
MODE_SHORT = {
    "drop": "the removed patches' tokens are dropped from the sequence",
    "pixels": "the removed patches' pixels are replaced by the preprocessing mean",
}


@dataclass(frozen=True)
class Setup:
    """Everything the curves depend on besides the model and the image."""

    mode: str
    steps: int
    target: int | None  # class followed; None without a classifier
    head: tuple[int, int]  # (layer, head), counted from 1
    ablate: tuple[tuple[int, int], ...]  # heads removed (Probes tab), counted from 1
    fill: str  # zero | mean
    rollout: tuple  # report.rollout_options as sorted items

    @property
    def rollout_kw(self) -> dict:
        return dict(self.rollout)


# ---- what the other tabs chose ------------------------------------------------------------------


def chosen_head(ctx: Ctx) -> tuple[int, int]:
    """The Heads tab's layer and head (default: the last layer, head 1), made to fit the model."""
    c = ctx.lm.config

    def fit(key: str, default: int, hi: int) -> int:
        v = state.read(key)
        try:
            return min(max(int(v), 1), hi)
        except (TypeError, ValueError):
            return default

    return fit("hd_layer", c.depth, c.depth), fit("hd_head", 1, c.num_heads)


def ablated_heads(ctx: Ctx) -> tuple[tuple[int, int], ...]:
    """Heads removed on the Probes tab (pr_ablate, flat (layer, head) pairs counted from 1) that
    exist in this model, sorted, each once."""
    c = ctx.lm.config
    flat = state.read("pr_ablate") or ()
    try:
        values = [int(v) for v in flat]
    except (TypeError, ValueError):
        return ()
    pairs = {(la, h) for la, h in zip(values[::2], values[1::2]) if 1 <= la <= c.depth and 1 <= h <= c.num_heads}
    return tuple(sorted(pairs))


def head_fill() -> str:
    fill = state.read("pr_fill")
    return fill if fill in ("zero", "mean") else "zero"


def setup_from_state(ctx: Ctx, mode: str, steps: int) -> Setup:
    options = report.rollout_options(ctx.lm.config, rollout_settings(ctx))
    return Setup(
        mode=mode,
        steps=int(steps),
        target=target_class(ctx),
        head=chosen_head(ctx),
        ablate=ablated_heads(ctx),
        fill=head_fill(),
        rollout=tuple(sorted(options.items())),
    )


# ---- computation --------------------------------------------------------------------------------


def maps_for(ctx: Ctx, setup: Setup) -> dict[str, np.ndarray]:
    """The maps compared, (1, gh, gw) each: from the cached forward pass and gradient map when no
    head is removed, else from one forward (and backward) pass of the ablated model."""
    lm = ctx.lm
    if not setup.ablate:
        maps = probes.attribution_maps(lm, ctx.result.forward, setup.rollout_kw, head=setup.head)
        if setup.target is not None:
            maps = {
                "rollout": maps["rollout"],
                "grad_rollout": np.asarray(ctx.gradient_map(setup.target), np.float64)[None],
                **{k: v for k, v in maps.items() if k != "rollout"},
            }
        return maps
    mask = probes.head_mask_for(lm.config, setup.ablate)
    target = None if setup.target is None else torch.tensor([setup.target])
    fwd = run_forward(
        lm.model, ctx.pixels, gradients=target is not None, target=target, head_mask=mask, head_fill=setup.fill
    )
    return probes.attribution_maps(lm, fwd, setup.rollout_kw, head=setup.head)


def compute(ctx: Ctx, setup: Setup, progress=None) -> tuple[probes.Curves, dict[str, np.ndarray]]:
    """The curves of every map for this image (both directions, baselines added) and the maps."""
    maps = maps_for(ctx, setup)
    lm = ctx.lm
    mask = probes.head_mask_for(lm.config, setup.ablate)
    curves = probes.faithfulness_curves(
        lm.model,
        ctx.pixels,
        maps,
        mode=setup.mode,
        steps=setup.steps,
        target=None if setup.target is None else [setup.target],
        head_mask=None if mask is None else mask.to(lm.device),
        head_fill=setup.fill,
        progress=progress,
    )
    return curves, maps


def cache_key(ctx: Ctx, setup: Setup) -> tuple:
    return ("faithfulness", ctx.source, str(ctx.lm.device), str(ctx.lm.dtype), ctx.image_digest, setup)


def cached_curves(ctx: Ctx, setup: Setup) -> tuple[probes.Curves, dict[str, np.ndarray]]:
    box = result_slot(cache_key(ctx, setup))
    if "curves" not in box:
        bar = st.progress(0.0, text="Faithfulness curves: removing patches...")
        found = compute(ctx, setup, progress=lambda f: bar.progress(min(1.0, float(f)), text="Removing patches..."))
        bar.empty()
        box["curves"] = found
    return box["curves"]


# ---- what is shown -------------------------------------------------------------------------------


def colour(key: str) -> str:
    return COLOURS.get(key, HEAD_COLOUR)


def y_title(curves: probes.Curves, class_name: str | None) -> str:
    if curves.agree is None:
        return "cosine similarity of pooled features"
    return f"probability of '{class_name}'" if class_name else "target-class probability"


def curve_figure(curves: probes.Curves, direction: str, *, class_name: str | None = None) -> go.Figure:
    """Every map's curve for one direction: x the share of patches removed, y the score; the legend
    gives each map's AUC; baselines dashed."""
    data = []
    for name in curves.maps:
        key = (name, direction)
        if key not in curves.scores:
            continue
        auc = float(curves.auc(key)[0])
        auc_text = f"{auc:.3f}" if np.isfinite(auc) else "no value"
        base = name in probes.BASELINES
        data.append(
            dict(
                type="scatter",
                x=curves.fractions.tolist(),
                y=[float(v) if np.isfinite(v) else None for v in curves.scores[key][0]],  # None: a gap
                mode="lines+markers",
                name=f"{probes.label(name)} (AUC {auc_text})",
                line=dict(color=colour(name), dash="dash" if base else "solid", width=2),
                marker=dict(size=5),
                hovertemplate=f"{probes.label(name)}<br>removed %{{x:.0%}}<br>score %{{y:.3f}}<extra></extra>",
            )
        )
    yaxis = dict(title=dict(text=y_title(curves, class_name)), zeroline=False)
    if curves.agree is not None:
        yaxis["range"] = [-0.02, 1.02]
    layout = dict(
        title=dict(text=DIRECTION_TITLES[direction], font=dict(size=13)),
        xaxis=dict(title=dict(text="share of patches removed"), range=[-0.02, 1.02], tickformat=".0%"),
        yaxis=yaxis,
        height=470,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0, font=dict(size=12)),
    )
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def auc_table(curves: probes.Curves) -> dict[str, dict[str, float]]:
    """Columns 'deletion AUC' (of the score) and 'deletion AUC, top-1' (of the top-1 agreement),
    both directions, each {map name: value} (3 decimals, as shown; NaN where the curve has no
    area): st.table shows the map names as the rows."""
    cols: dict[str, dict[str, float]] = {}
    for name in curves.maps:
        for d in DIRECTIONS:
            if (name, d) not in curves.scores:
                continue
            cols.setdefault(f"{d} AUC", {})[probes.label(name)] = round(float(curves.auc((name, d))[0]), 3)
            if curves.agree is not None:
                agree = round(float(curves.auc_agree((name, d))[0]), 3)
                cols.setdefault(f"{d} AUC, top-1", {})[probes.label(name)] = agree
    return cols


def curves_csv(curves: probes.Curves) -> bytes:
    """The curves as CSV: map, direction, fraction removed, score (probability or cosine), top-1
    agreement (empty without a classifier). A NaN or infinite score is an empty cell (no value),
    as spreadsheets and pandas read one."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    score = "probability" if curves.agree is not None else "cosine_similarity"
    w.writerow(["map", "direction", "fraction_removed", "patches_removed", score, "top1_agreement"])
    for name in curves.maps:
        for d in DIRECTIONS:
            key = (name, d)
            if key not in curves.scores:
                continue
            for i, f in enumerate(curves.fractions):
                agree = "" if curves.agree is None else _cell(curves.agree[key][0, i])
                w.writerow([name, d, repr(float(f)), int(curves.removed[i]), _cell(curves.scores[key][0, i]), agree])
    return buf.getvalue().encode()


def _cell(v: float) -> str:
    return repr(float(v)) if np.isfinite(v) else ""


def favoured_sentence(curves: probes.Curves, direction: str, class_name: str | None) -> str:
    """Which map the curves favour for this image, and its margin against random order (AUCs with
    3 decimals, as in the table)."""
    f = probes.favoured(curves, direction)
    if f["map"] is None:
        return (
            f"{direction.capitalize()} favours no map on this image: every curve has NaN or infinite scores "
            "(the model's outputs are not finite), so no area can be compared."
        )
    best, auc, margin = probes.label(f["map"]), f["auc"], f["margin_vs_random"]
    what = f"the probability of '{class_name}'" if class_name else "the similarity to the unperturbed features"
    rnd = None if margin is None else float(curves.auc((probes.RANDOM, direction))[0])
    against = "" if rnd is None else f" (random order {rnd:.3f})"
    ties = [probes.label(k) for k, v in f["aucs"].items() if k != f["map"] and abs(v - auc) < 5e-4]
    if ties and len(ties) == len(f["aucs"]) - 1:
        return (
            f"{direction.capitalize()} does not tell the maps apart on this image: every map's AUC is "
            f"{auc:.3f}{against}."
        )
    if direction == "deletion":
        head = f"Deletion favours {best}: removing its top patches first drops {what} fastest"
    else:
        head = f"Insertion favours {best}: removing its least relevant patches first keeps {what} highest"
    if ties:
        head += " (tied with " + " and ".join(f"'{t}'" for t in ties) + ")"
    if rnd is None:
        return f"{head} (AUC {auc:.3f})."
    text = f"{head} (AUC {auc:.3f} against {rnd:.3f} for random order, a margin of {margin:.3f})."
    if margin < 0:
        text += (
            " The margin is negative: even the best map does worse than removing patches in a random "
            "order here, so none of these maps tells what the model uses on this image."
        )
    elif margin < 0.02:
        text += " That is hardly better than a random order."
    centre = f["margin_vs_centre"]
    if centre is not None and centre < 0:
        c_auc = float(curves.auc((probes.CENTRE, direction))[0])
        text += (
            f" The centre prior, which knows nothing of the image, does better still (AUC {c_auc:.3f}): "
            "on this image the maps do not beat a guess that the object is in the middle."
        )
    return text


def thumbnails(maps: dict[str, np.ndarray], grid: tuple[int, int]) -> None:
    """The maps compared, small, each from its minimum (darkest) to its maximum."""
    from viz_app.analysis.faithfulness import centre_prior

    shown = {**{k: v[0] for k, v in maps.items()}, probes.CENTRE: centre_prior(grid)}
    cols = st.columns(len(shown))
    scale = max(1, int(np.ceil(96 / max(grid))))
    for col, (name, heat) in zip(cols, shown.items()):
        img = render.colorize(np.kron(heat, np.ones((scale, scale))))
        col.image(img, caption=probes.label(name), width="stretch")


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    a, b = st.columns([2, 1])
    mode = state.radio(
        "Removal mode",
        list(probes.REMOVAL_MODES),
        state.DEFAULTS["fa_mode"],
        key="fa_mode",
        container=a,
        horizontal=True,
        format_func=lambda m: MODE_NAMES[m],
        help=MODE_HELP,
    )
    with b:
        steps = state.slider(
            "Steps",
            5,
            20,
            state.DEFAULTS["fa_steps"],
            key="fa_steps",
            help="each step removes 1/steps of the patches; every curve has steps + 1 points",
        )
    setup = setup_from_state(ctx, mode, steps)
    class_name = None if setup.target is None else ctx.label(setup.target)
    layer, head = setup.head
    who = (
        f"Target class: **{class_name}** (class {setup.target}; change it on the Rollout tab). "
        if class_name
        else "This model has no classifier: the curves follow the cosine similarity of the pooled features "
        "to the unperturbed image's. "
    )
    st.markdown(
        who + f"Single head: **layer {layer}, head {head}** (change it on the Heads tab). "
        "Rollout: the Rollout tab's settings."
    )
    if setup.ablate:
        names = ", ".join(f"L{la}H{h}" for la, h in setup.ablate)
        st.caption(
            f"Heads removed on the Probes tab ({names}; {setup.fill} fill) are removed here too: the maps "
            "and every perturbed input come from the ablated model."
        )
    try:
        curves, maps = cached_curves(ctx, setup)
    except (ValueError, RuntimeError) as e:
        st.error(f"The faithfulness curves could not be computed: {e}")
        return
    cols = st.columns(2)
    for col, d in zip(cols, DIRECTIONS):
        with col:
            st.plotly_chart(curve_figure(curves, d, class_name=class_name), key=f"fa_plot_{d}")
    st.caption(
        "Deletion: a lower AUC is more faithful (the score falls as soon as the map's top patches are gone). "
        "Insertion-like: a higher AUC is more faithful (the patches the map ranks lowest can go). Dashed: baselines."
    )
    if curves.agree is None:
        st.caption(f"No classifier: each curve follows the {curves.score_name} to the unperturbed image's.")
    for d in DIRECTIONS:
        st.markdown(favoured_sentence(curves, d, class_name))
    st.caption(
        f"Removal mode: {MODE_SHORT[setup.mode]}. {curves.steps} steps of "
        f"{c.num_patches / curves.steps:.1f} patches ({curves.forwards} inputs through the model). Random order: "
        "the mean curve of 3 seeded random orders."
    )
    st.markdown("**Area under each curve** (deletion: lower is more faithful; insertion-like: higher is)")
    # a static table: its headers wrap, so every column stays in view at 1024 px
    st.table(
        {
            col: {k: f"{v:.3f}" if np.isfinite(v) else "no value" for k, v in rows.items()}
            for col, rows in auc_table(curves).items()
        }
    )
    st.caption(
        "Protocol: RISE deletion/insertion AUC (Petsiuk et al. 2018), the trapezoid rule over the removed share "
        "in [0, 1], so a probability curve gives an AUC in [0, 1]; deletion is Chefer et al.'s (CVPR 2021) "
        "positive perturbation, insertion-like their negative perturbation (least relevant removed first). "
        "'AUC': of the score curve; 'AUC, top-1': of the top-1 agreement (1 while the top-1 class is still the "
        "unperturbed one). "
        "Full definition: docs/DEFINITIONS.md, 'Faithfulness (perturbation) curves'."
    )
    st.download_button(
        "Curves (CSV)",
        curves_csv(curves),
        file_name=f"faithfulness_{setup.mode}.csv",
        mime="text/csv",
        key="fa_csv",
    )
    with st.expander("The maps compared", expanded=False):
        thumbnails(maps, c.grid)
