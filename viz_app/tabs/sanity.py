"""Sanity check (demo model): on a generated scene whose target mask is known, where each map
points, by the loose and the strict pointing rule, and the model's scores on fresh scenes."""

from __future__ import annotations

import cv2
import numpy as np
import streamlit as st

from viz_app import analysis as A
from viz_app.demo.evaluate import POINTING_RULES, energy, patch_masks, pointing, pointing_strict
from viz_app.tabs.common import Ctx


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
    return " ".join(parts)


def draw(ctx: Ctx) -> None:
    c = ctx.lm.config
    mask, scores = ctx.scene_mask, ctx.demo_scores
    if ctx.source != "demo":
        st.info(
            "The sanity check needs ground truth: it runs with the embedded demo model on its generated scenes, "
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
