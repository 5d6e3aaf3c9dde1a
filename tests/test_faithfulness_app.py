"""The Faithfulness tab and the Sanity tab's model randomization show what viz_app/probes.py
computes for the same image and settings: AUCs in the legend and the table, the CSV export, the
curves with heads removed on the Probes tab, and the randomization's Spearman curves."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest
from test_trust import download, ok, open_tab, start

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from model.resources import DEMO_DIR
from viz_app import probes, report
from viz_app.analysis.faithfulness import DIRECTIONS
from viz_app.pipeline import Forward, run_forward
from viz_app.sidebar import gallery

needs_demo = pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(), reason="demo model not installed")

SCENE = "scene: 3_star"


def make_model(folder: Path, num_classes: int) -> Path:
    """A random ViT with 3 layers x 2 heads on a 6x6 grid (fast, and not the demo)."""
    cfg = ViTConfig(
        image_size=96, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=num_classes
    )
    m = VisionTransformer(cfg)
    m.init_weights(seed=5)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, Path]:
    return {
        "classifier": make_model(tmp_path_factory.mktemp("small_cls"), 10),
        "features": make_model(tmp_path_factory.mktemp("small_feat"), 0),
    }


def decode(value) -> np.ndarray:
    """plotly arrays may arrive base64-typed: {'dtype': 'f8', 'bdata': ...}."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).astype(float)
    return np.asarray([np.nan if v is None else v for v in value], dtype=float)


def curve_charts(at: AppTest) -> dict[str, dict]:
    """direction -> the Faithfulness tab's plot spec."""
    out = {}
    for el in at.get("plotly_chart"):
        for d in DIRECTIONS:
            if el.proto.id.endswith(f"fa_plot_{d}"):
                out[d] = json.loads(el.proto.spec)
    assert set(out) == set(DIRECTIONS), [el.proto.id for el in at.get("plotly_chart")]
    return out


def legend_aucs(spec: dict) -> dict[str, float]:
    """'name (AUC 0.123)' -> {name: 0.123}."""
    found = {}
    for trace in spec["data"]:
        name, auc = trace["name"].rsplit(" (AUC ", 1)
        found[name] = float(auc.rstrip(")"))
    return found


def shown(at: AppTest) -> dict:
    """Everything the Faithfulness tab shows as numbers: legend AUCs, table, curves."""
    charts = curve_charts(at)
    table = at.table[0].value.astype(float).rename_axis("map").reset_index()
    return {
        "legend": {d: legend_aucs(charts[d]) for d in DIRECTIONS},
        "curves": {
            d: {t["name"].rsplit(" (AUC ", 1)[0]: decode(t["y"]) for t in charts[d]["data"]} for d in DIRECTIONS
        },
        "table": table,
    }


def pixels_of(lm, name: str) -> torch.Tensor:
    return prepare_image(load_image(gallery()[name]), lm.preprocessing).pixels[None]


def direct_curves(lm, x, *, mode: str, steps: int = 10, target: int | None, heads=(), fill: str = "zero"):
    """probes.faithfulness_curves on the maps the tab promises (paper rollout settings, the last
    layer's head 1), written here from the model's forward."""
    c = lm.config
    options = report.rollout_options(c, report.Settings())
    mask = probes.head_mask_for(c, list(heads))
    if target is None:
        fwd = run_forward(lm.model, x)
    elif mask is None:
        fwd = run_forward(lm.model, x, gradients=True, target=torch.tensor([target]))
    else:
        xg = x.clone().requires_grad_(True)
        out = lm.model(xg, output_attentions=True, output_token_norms=True, head_mask=mask, head_fill=fill)
        grads = torch.autograd.grad(out.logits[0, target], out.attentions)
        fwd = Forward(
            logits=out.logits.detach(),
            features=out.features.detach(),
            attentions=torch.stack([a.detach() for a in out.attentions], 1),
            token_norms=out.token_norms.detach(),
            grads=torch.stack(grads, 1),
        )
    maps = probes.attribution_maps(lm, fwd, options, head=(c.depth, 1))
    return probes.faithfulness_curves(
        lm.model,
        x,
        maps,
        mode=mode,
        steps=steps,
        target=None if target is None else [target],
        head_mask=mask,
        head_fill=fill,
    )


def assert_shows(seen: dict, curves: probes.Curves) -> None:
    """Legend, table and curves equal the directly computed curves (as shown: 3 decimals)."""
    classifier = curves.agree is not None
    table = seen["table"].set_index("map")
    for name in curves.maps:
        label = probes.label(name)
        for d in DIRECTIONS:
            auc = float(curves.auc((name, d))[0])
            assert seen["legend"][d][label] == pytest.approx(auc, abs=5e-4 + 1e-9), (label, d)
            assert table.loc[label, f"{d} AUC"] == pytest.approx(auc, abs=5e-4 + 1e-9), (label, d)
            np.testing.assert_allclose(seen["curves"][d][label], curves.scores[(name, d)][0], atol=1e-6)
            if classifier:
                agree = float(curves.auc_agree((name, d))[0])
                assert table.loc[label, f"{d} AUC, top-1"] == pytest.approx(agree, abs=5e-4 + 1e-9)


def demo_tab(name: str = SCENE) -> AppTest:
    at = start()
    at.selectbox(key="img").set_value(name).run()
    return open_tab(ok(at), "Faithfulness")


@pytest.fixture(scope="module")
def demo():
    lm = load_checkpoint("demo")
    x = pixels_of(lm, SCENE)
    with torch.inference_mode():
        top = int(lm.model(x).logits.argmax(-1)[0])
    return lm, x, top


# ---- Faithfulness tab ---------------------------------------------------------------------------


@needs_demo
@pytest.mark.app
@pytest.mark.slow
def test_shown_aucs_and_curves_equal_faithfulness_curves_in_both_modes(demo):
    lm, x, top = demo
    at = demo_tab()
    text = " ".join(m.value for m in at.markdown)
    assert f"Target class: **{lm.labels[top]}**" in text and "layer 6, head 1" in text
    assert "Deletion favours " in text and "random order, a margin of " in text
    drop = shown(at)
    assert_shows(drop, direct_curves(lm, x, mode="drop", target=top))
    assert set(drop["legend"]["deletion"]) >= {"rollout", "gradient rollout", "centre prior", "random order"}
    at.radio(key="fa_mode").set_value("pixels").run()
    ok(at)
    pixels = shown(at)
    assert_shows(pixels, direct_curves(lm, x, mode="pixels", target=top))
    assert pixels["legend"] != drop["legend"], "the removal mode changes the numbers"
    assert any("replaced by the preprocessing mean" in c.value for c in at.caption)


@needs_demo
@pytest.mark.app
@pytest.mark.slow
def test_csv_export_equals_the_shown_curves(media):
    at = demo_tab()
    at.slider(key="fa_steps").set_value(8).run()
    seen = shown(ok(at))
    rows = list(csv.DictReader(io.StringIO(download(at, media, "Curves (CSV)").decode())))
    assert rows and set(rows[0]) == {
        "map",
        "direction",
        "fraction_removed",
        "patches_removed",
        "probability",
        "top1_agreement",
    }
    got: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        got.setdefault((probes.label(r["map"]), r["direction"]), []).append(r)
    assert {k for k in got} == {(m, d) for d in DIRECTIONS for m in seen["curves"][d]}
    for (label, d), rs in got.items():
        assert [float(r["fraction_removed"]) for r in rs] == pytest.approx(np.arange(9) / 8)
        np.testing.assert_allclose([float(r["probability"]) for r in rs], seen["curves"][d][label], atol=1e-9)
        assert all(float(r["top1_agreement"]) in (0.0, 1.0) or label == "random order" for r in rs)


@needs_demo
@pytest.mark.app
@pytest.mark.slow
def test_heads_removed_on_the_probes_tab_change_the_curves_and_say_so(demo):
    lm, x, top = demo
    at = demo_tab()
    before = shown(at)["legend"]
    assert not any("Heads removed" in c.value for c in at.caption)
    heads = [(6, 1), (6, 2), (5, 3)]
    at.session_state["pr_ablate"] = tuple(v for pair in heads for v in pair)
    at.run()
    ok(at)
    assert any("Heads removed on the Probes tab (L5H3, L6H1, L6H2" in c.value for c in at.caption)
    seen = shown(at)
    assert seen["legend"] != before
    assert_shows(seen, direct_curves(lm, x, mode="drop", target=top, heads=heads))


@pytest.mark.app
@pytest.mark.slow
def test_a_random_classifier_and_a_model_without_classifier(small_models):
    for kind, folder in small_models.items():
        at = open_tab(start(folder), "Faithfulness")
        lm = load_checkpoint(str(folder))
        x = pixels_of(lm, at.selectbox(key="img").value)
        with torch.inference_mode():
            out = lm.model(x)
        target = None if out.logits is None else int(out.logits.argmax(-1)[0])
        assert_shows(shown(at), direct_curves(lm, x, mode="drop", target=target))
        text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
        assert ("cosine similarity of the pooled features" in text) == (kind == "features"), kind
        # model randomization runs for any model, with or without a classifier, both kinds
        open_tab(at, "Sanity")
        assert any("pointing game needs ground truth" in i.value for i in at.info)
        for how in ("independent", "cascade"):
            at.radio(key="sn_kind").set_value(how).run()
            at.button(key="sn_run").click().run()
            ok(at)
            spec = next(
                json.loads(el.proto.spec) for el in at.get("plotly_chart") if el.proto.id.endswith("sn_spearman")
            )
            names = [t["name"] for t in spec["data"]]
            assert ("gradient rollout" in names) == (kind == "classifier"), (kind, names)
            assert spec["data"][0]["text"][-1] == "embedding" and len(spec["data"][0]["text"]) == lm.config.depth + 3


# ---- Sanity tab: model randomization ------------------------------------------------------------


@needs_demo
@pytest.mark.app
@pytest.mark.slow
def test_randomization_shows_the_spearman_of_probes_randomization(demo):
    lm, x, top = demo
    at = start()
    at.selectbox(key="img").set_value(SCENE).run()
    open_tab(at, "Sanity")
    assert not [el for el in at.get("plotly_chart") if "sn_spearman" in el.proto.id], "runs on a button press"
    at.button(key="sn_run").click().run()
    ok(at)
    spec = next(json.loads(el.proto.spec) for el in at.get("plotly_chart") if el.proto.id.endswith("sn_spearman"))
    options = report.rollout_options(lm.config, report.Settings())
    rnd = probes.randomization(
        lm.model,
        x,
        lambda fwd: probes.attribution_maps(lm, fwd, options, head=(lm.config.depth, 1)),
        kind="cascade",
        target=torch.tensor([top]),
    )
    assert [t["name"] for t in spec["data"]] == [probes.label(k) for k in rnd.spearman]
    for trace, (name, values) in zip(spec["data"], rnd.spearman.items()):
        assert trace["text"] == list(rnd.labels)
        np.testing.assert_allclose(decode(trace["y"]), values[:, 0], atol=1e-9, err_msg=name)
    assert spec["layout"]["yaxis"]["range"][0] <= -1 and spec["layout"]["yaxis"]["range"][1] >= 1
    text = " ".join(m.value for m in at.markdown)
    assert "once the head and every block are re-initialized" in text
    captions = " ".join(c.value for c in at.caption)
    assert "Data randomization" in captions and "out of scope" in captions
    assert "reinit_rollout" in captions
    assert at.get("table"), "the demo's pointing game is still there"
    # another kind is another run; the first stays cached
    at.radio(key="sn_kind").set_value("independent").run()
    assert not [el for el in at.get("plotly_chart") if "sn_spearman" in el.proto.id]
    at.radio(key="sn_kind").set_value("cascade").run()
    assert [el for el in at.get("plotly_chart") if "sn_spearman" in el.proto.id]
    ok(at)


# ---- the words and the export, from hand-made curves (fast) -------------------------------------


def hand_curves(deletion: dict[str, list[float]]) -> probes.Curves:
    fractions = np.linspace(0, 1, 5)
    scores = {(k, "deletion"): np.array([v]) for k, v in deletion.items()}
    scores |= {(k, "insertion"): np.array([v[::-1]]) for k, v in deletion.items()}
    agree = {k: (v > 0.5).astype(float) for k, v in scores.items()}
    return probes.Curves(
        mode="drop",
        steps=4,
        fractions=fractions,
        removed=np.array([0, 1, 2, 3, 4]),
        target=np.array([3]),
        scores=scores,
        agree=agree,
        score_name="target-class probability",
        maps=tuple(deletion),
    )


def test_the_sentence_names_the_favoured_map_and_a_negative_margin_honestly():
    from viz_app.tabs import faithfulness

    good = hand_curves({"rollout": [1, 0.2, 0.1, 0, 0], "random": [1, 0.9, 0.7, 0.4, 0]})
    text = faithfulness.favoured_sentence(good, "deletion", "star")
    auc_r, auc_rnd = float(good.auc(("rollout", "deletion"))[0]), float(good.auc(("random", "deletion"))[0])
    assert text.startswith("Deletion favours rollout: removing its top patches first drops the probability of 'star'")
    assert f"AUC {auc_r:.3f} against {auc_rnd:.3f} for random order, a margin of {auc_rnd - auc_r:.3f}" in text
    assert "negative" not in text
    bad = hand_curves({"rollout": [1, 0.95, 0.9, 0.8, 0], "random": [1, 0.5, 0.3, 0.1, 0]})
    text = faithfulness.favoured_sentence(bad, "deletion", "star")
    assert "a margin of -" in text and "does worse than removing patches in a random order" in text
    flat = hand_curves({"rollout": [1, 1, 1, 1, 0], "last_layer": [1, 1, 1, 1, 0], "random": [1, 1, 1, 0.5, 0]})
    text = faithfulness.favoured_sentence(flat, "deletion", "star")
    assert text.startswith("Deletion does not tell the maps apart on this image: every map's AUC is 0.875")
    rows = list(csv.DictReader(io.StringIO(faithfulness.curves_csv(good).decode())))
    assert len(rows) == 2 * 2 * 5
    first = [r for r in rows if r["map"] == "rollout" and r["direction"] == "deletion"]
    assert [float(r["probability"]) for r in first] == [1, 0.2, 0.1, 0, 0]
    assert [float(r["top1_agreement"]) for r in first] == [1, 0, 0, 0, 0]
    table = faithfulness.auc_table(good)
    assert table["deletion AUC"]["rollout"] == round(auc_r, 3)
