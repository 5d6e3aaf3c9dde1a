"""The Probes tab: clicks remove heads and drop patches, and every number it shows is the model's
own (the forward with head_mask / keep, probes.head_effects) for the same heads and patches.

Clicks reach the page as the chart's selection (the widget state a browser sends), so the
callbacks run as they do in a browser; the callbacks alone are also driven with a dict session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import streamlit as st
import torch
from safetensors.torch import save_file
from streamlit.proto.WidgetStates_pb2 import WidgetState
from streamlit.testing.v1 import AppTest
from test_app import decode
from test_trust import ok, open_tab, start

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from viz_app import analysis as A
from viz_app import probes, report
from viz_app.sidebar import gallery
from viz_app.tabs import probes as tab
from viz_app.tabs.common import chart_key

pytestmark = pytest.mark.app

CFG = ViTConfig(image_size=96, patch_size=16, embed_dim=48, depth=4, num_heads=3, mlp_dim=96, num_classes=10)


# ---- helpers --------------------------------------------------------------------------------------


def click(at: AppTest, chart: str, point: dict) -> AppTest:
    """Send a click on the chart named `chart` (its key without the counter) as the browser does:
    the chart's selection in the widget states of the next run."""
    found = [el for el in at.get("plotly_chart") if f"-{chart}_" in el.proto.id]
    assert len(found) == 1, [el.proto.id for el in at.get("plotly_chart")]
    states = at._tree.get_widget_states()
    selection = {"points": [point], "point_indices": [point.get("point_index", 0)], "box": [], "lasso": []}
    states.widgets.append(WidgetState(id=found[0].proto.id, string_value=json.dumps({"selection": selection})))
    at._run(states)
    return ok(at)


def tile_point(index: int) -> dict:
    """A click on the marker of tile `index` (row-major) of a clickable layer x head grid."""
    return {"curve_number": 1, "point_number": index, "point_index": index, "customdata": {"0": 0, "1": 0}}


def patch_point(row: int, col: int, patch: int) -> dict:
    return {"curve_number": 1, "point_index": 0, "x": (col + 0.5) * patch, "y": (row + 0.5) * patch}


def table(at: AppTest, who: str):
    """The top-5 table whose first column is 'class (<who>)', as {class index: (probability, logit)}."""
    for df in at.dataframe:
        frame = df.value
        name = f"class ({who})"
        if name in frame.columns:
            out = {}
            for label, p, logit in zip(frame[name], frame["probability"], frame["logit"]):
                out[int(label.removesuffix(" (target)").removeprefix("class "))] = (p, logit)
            return out
    raise KeyError(who)


def effects(at: AppTest) -> dict[str, float]:
    for df in at.dataframe:
        frame = df.value
        if "logit drop" in frame.columns:
            return dict(zip(frame["removed"], frame["logit drop"]))
    raise KeyError("logit drop")


def chart_spec(at: AppTest, chart: str) -> dict:
    for el in at.get("plotly_chart"):
        if f"-{chart}_" in el.proto.id:
            return json.loads(el.proto.spec)
    raise KeyError(chart)


def model_input(at: AppTest, path: Path):
    lm = load_checkpoint(path)
    image = gallery()[at.selectbox(key="img").value]
    return lm, prepare_image(load_image(image), lm.preprocessing).pixels[None]


@torch.inference_mode()
def logits_of(lm, x, **kw) -> np.ndarray:
    return lm.model(x, output_attentions=False, **kw).logits[0].float().numpy()


def assert_table_is(shown: dict, logits: np.ndarray) -> None:
    probs = torch.from_numpy(logits).double().softmax(-1).numpy()
    top = [int(i) for i in np.argsort(-logits, kind="stable")[:5]]
    assert set(top) <= set(shown)
    for k, (p, logit) in shown.items():
        assert logit == pytest.approx(float(logits[k]), abs=1e-6), k
        assert p == pytest.approx(float(probs[k]), abs=1e-6), k


def save_model(cfg: ViTConfig, folder: Path, seed: int) -> Path:
    m = VisionTransformer(cfg)
    m.init_weights(seed=seed)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random classifier with 4 layers x 3 heads on a 6x6 grid (CFG)."""
    return save_model(CFG, tmp_path_factory.mktemp("small"), seed=3)


@pytest.fixture(scope="module")
def pooling_model(tmp_path_factory) -> Path:
    """No class token, patches averaged, no classifier: forward(keep=...) needs a patch kept."""
    cfg = ViTConfig(
        image_size=64,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        num_classes=0,
        class_token=False,
        global_pool="avg",
    )
    return save_model(cfg, tmp_path_factory.mktemp("pool"), seed=5)


# ---- callbacks and figures (no page) --------------------------------------------------------------


def test_clicks_toggle_heads_and_patches(monkeypatch):
    ss: dict = {}
    monkeypatch.setattr(st, "session_state", ss)

    def on(chart: str, point: dict, callback) -> None:
        ss[chart_key(chart)] = {"selection": {"points": [point]}}
        callback()

    on("pr_heads", tile_point(1 * 3 + 2), lambda: tab.on_head_click("pr_heads", CFG))  # layer 2, head 3
    assert ss["pr_ablate"] == (2, 3)
    on("pr_rank_grid", tile_point(0), lambda: tab.on_head_click("pr_rank_grid", CFG))  # layer 1, head 1
    assert ss["pr_ablate"] == (1, 1, 2, 3)  # pairs sorted
    on("pr_heads", tile_point(1 * 3 + 2), lambda: tab.on_head_click("pr_heads", CFG))  # the same tile again
    assert ss["pr_ablate"] == (1, 1)
    on("pr_heads", {"curve_number": 0, "point_index": [0, 1]}, lambda: tab.on_head_click("pr_heads", CFG))
    assert ss["pr_ablate"] == (1, 1)  # the heat map under the markers: nothing
    on("pr_view", patch_point(2, 5, 16), lambda: tab.on_patch_click(CFG))
    assert ss["pr_drop"] == (2 * 6 + 5,)
    on("pr_view", patch_point(0, 1, 16), lambda: tab.on_patch_click(CFG))
    on("pr_view", patch_point(2, 5, 16), lambda: tab.on_patch_click(CFG))
    assert ss["pr_drop"] == (1,)
    on("pr_view", {"x": 500.0, "y": -3.0}, lambda: tab.on_patch_click(CFG))  # the margin
    assert ss["pr_drop"] == (1,)
    # kept values that do not fit (another model's heads, an odd tail, junk) are left out
    ss["pr_ablate"] = (4, 3, 9, 1, 2, 2, 0, 1, 3)
    assert tab.removed_heads(CFG) == [(2, 2), (4, 3)]
    ss["pr_ablate"] = ("x", 1)
    assert tab.removed_heads(CFG) == []
    ss["pr_drop"] = (-1, 3, 3, 36, 35)
    assert tab.dropped_patches(CFG.num_patches) == [3, 35]


def test_the_figures_are_valid_plotly():
    rng = np.random.default_rng(0)
    figs = [
        tab.heads_grid_figure(rng.random((4, 3, 6, 6)), [(2, 3), (4, 1)]),
        tab.rank_figure(rng.normal(size=(4, 3)), [(1, 1)]),
    ]
    for fig in figs:
        go.Figure(fig.to_dict())  # validates every property
    grid = figs[0].to_dict()
    assert len(grid["layout"]["shapes"]) == 2 * 2 * 3  # an outlined X, white under black, per removed head
    assert grid["data"][1]["mode"] == "markers" and len(decode(grid["data"][1]["x"])) == 12  # the clickable tiles
    rank = figs[1].to_dict()
    assert rank["data"][0]["zmin"] == -rank["data"][0]["zmax"]  # diverging, centred on 0
    assert rank["data"][0]["colorbar"]["title"]["text"] == "logit drop"


# ---- the page ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_clicked_heads_are_removed_and_the_shown_logits_are_the_models(small_model):
    at = open_tab(start(small_model), "Probes")
    lm, x = model_input(at, small_model)
    full = logits_of(lm, x)
    target = int(full.argmax())
    assert_table_is(table(at, "full model"), full)
    click(at, "pr_heads", tile_point(1 * 3 + 2))  # layer 2, head 3
    assert at.session_state["pr_ablate"] == (2, 3)
    click(at, "pr_heads", tile_point(3 * 3 + 0))  # layer 4, head 1
    assert at.session_state["pr_ablate"] == (2, 3, 4, 1)
    heads = [(2, 3), (4, 1)]
    for fill in ("zero", "mean"):
        at.radio(key="pr_fill").set_value(fill).run()
        ok(at)
        after = logits_of(lm, x, head_mask=probes.head_mask_for(lm.config, heads), head_fill=fill)
        assert np.abs(after - full).max() > 1e-4  # the removal shows
        assert_table_is(table(at, "ablated"), after)
        shown = effects(at)
        alone = probes.head_effects(lm.model, x, target, heads=heads, head_fill=fill)
        assert shown["layer 2, head 3"] == pytest.approx(alone[0], abs=1e-6)
        assert shown["layer 4, head 1"] == pytest.approx(alone[1], abs=1e-6)
        assert shown["all 2 together"] == pytest.approx(full[target] - after[target], abs=1e-5)
        assert any(m.value == f"{after[target]:.3f}" for m in at.metric)
    # the removed heads are crossed out on the grid, and the rollout is the ablated model's
    spec = chart_spec(at, "pr_heads")
    assert len(spec["layout"]["shapes"]) == 2 * 2 * 3
    click(at, "pr_heads", tile_point(1 * 3 + 2))  # the same tile again restores the head
    assert at.session_state["pr_ablate"] == (4, 1)
    at.button(key="pr_clear_heads").click().run()
    assert ok(at).session_state["pr_ablate"] == ()
    assert not any(df.value.columns[0] == "class (ablated)" for df in at.dataframe)


@pytest.mark.slow
def test_the_rank_heatmap_is_head_effects(small_model):
    at = open_tab(start(small_model), "Probes")
    lm, x = model_input(at, small_model)
    target = int(logits_of(lm, x).argmax())
    at.button(key="pr_rank").click().run()
    z = decode(chart_spec(ok(at), "pr_rank_grid")["data"][0]["z"]).reshape(4, 3)
    want = probes.head_effects(lm.model, x, target)
    np.testing.assert_allclose(z, want, rtol=0, atol=1e-6)
    # a click on a cell of the ranking removes that head; ranking again runs on top of it
    i = int(np.argmax(want))
    click(at, "pr_rank_grid", tile_point(i))
    layer, head = divmod(i, 3)
    assert at.session_state["pr_ablate"] == (layer + 1, head + 1)
    assert any("press Rank heads to update" in w.value for w in at.warning)
    at.radio(key="pr_fill").set_value("mean").run()
    at.button(key="pr_rank").click().run()
    z = decode(chart_spec(ok(at), "pr_rank_grid")["data"][0]["z"]).reshape(4, 3)
    base = probes.head_mask_for(lm.config, [(layer + 1, head + 1)])
    want = probes.head_effects(lm.model, x, target, base_mask=base, head_fill="mean")
    np.testing.assert_allclose(z, want, rtol=0, atol=1e-6)
    assert z[layer, head] == 0  # already removed
    assert not any("press Rank heads to update" in w.value for w in at.warning)
    # the target is the Rollout tab's class when one is chosen
    other = int(np.argsort(logits_of(lm, x))[0])
    at.session_state["ro_class"] = other
    at.button(key="pr_rank").click().run()
    z = decode(chart_spec(ok(at), "pr_rank_grid")["data"][0]["z"]).reshape(4, 3)
    want = probes.head_effects(lm.model, x, other, base_mask=base, head_fill="mean")
    np.testing.assert_allclose(z, want, rtol=0, atol=1e-6)
    assert any(m.label == f"Logit of 'class {other}', heads removed" for m in at.metric)


@pytest.mark.slow
def test_token_dropping_by_click_and_by_the_top_share(small_model):
    at = open_tab(start(small_model), "Probes")
    lm, x = model_input(at, small_model)
    c = lm.config
    click(at, "pr_view", patch_point(2, 4, 16))
    assert at.session_state["pr_drop"] == (2 * 6 + 4,)
    kept = np.array([i for i in range(36) if i != 16])
    remaining = logits_of(lm, x, keep=torch.from_numpy(kept))
    assert np.abs(remaining - logits_of(lm, x)).max() > 1e-4  # the drop shows
    assert_table_is(table(at, "kept tokens"), remaining)
    assert_table_is(table(at, "full image"), logits_of(lm, x))
    assert any(m.value.startswith("**Kept 35 of 36 patches**") for m in at.markdown)
    # the top 30% of the rollout, less the clicked patch
    at.slider(key="pr_keep_top").set_value(0.3).run()
    with torch.inference_mode():
        attn = torch.stack(lm.model(x).attentions, 1)
    options = report.rollout_options(c, report.Settings())
    top = probes.top_share_keep(A.attention_rollout(attn, **options)[0].numpy(), 0.3)
    kept = np.array(sorted(set(top.tolist()) - {16}))
    assert_table_is(table(ok(at), "kept tokens"), logits_of(lm, x, keep=torch.from_numpy(kept)))
    # ... of the last layer's map
    at.radio(key="pr_keep_map").set_value("last layer").run()
    last = A.attention_maps(attn[0, -1], num_prefix=1, grid=c.grid).mean(0).numpy()
    kept = np.array(sorted(set(probes.top_share_keep(last, 0.3).tolist()) - {16}))
    assert_table_is(table(ok(at), "kept tokens"), logits_of(lm, x, keep=torch.from_numpy(kept)))
    at.radio(key="pr_drop_map").set_value("last layer").run()
    ok(at)
    at.button(key="pr_clear_drop").click().run()
    assert ok(at).session_state["pr_drop"] == ()


def test_no_classifier_and_every_patch_dropped(pooling_model):
    """A model without a classifier that pools its patches: the maps only, and dropping every
    patch is refused with a message (no traceback); kept values that do not fit are ignored."""
    at = open_tab(start(pooling_model), "Probes")
    assert any("no classifier" in i.value for i in at.info)
    at.session_state["pr_ablate"] = (1, 2, 7, 7, 2)
    at.session_state["pr_drop"] = tuple(range(16)) + (99, -3)
    ok(at.run())
    assert at.session_state["pr_ablate"] == (1, 2)
    assert any("needs at least 1 patch" in w.value for w in at.warning)
    assert not at.dataframe or all("class (" not in df.value.columns[0] for df in at.dataframe)
    click(at, "pr_view", patch_point(1, 1, 16))  # one patch back: the maps of that one token
    assert at.session_state["pr_drop"] == tuple(i for i in range(16) if i != 5)
    assert not at.warning


def test_a_link_with_values_that_do_not_fit_opens_the_tab():
    """Kept values arrive from a copied link before any widget exists: out of range, unknown or
    another model's values are fixed or left out, without a traceback."""
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=300)
    at.query_params.update(
        tab="Probes",
        pr_fill="bogus",
        pr_keep_top="7.5",
        pr_ablate=["2", "3", "99", "1", "4"],
        pr_drop=["-4", "5000", "7"],
    )
    ok(at.run())
    assert at.session_state["pr_ablate"] == (2, 3)
    assert at.session_state["pr_drop"] == (7,)
    assert at.radio(key="pr_fill").value == "zero" and at.slider(key="pr_keep_top").value == 1.0
    assert any(m.value.startswith("**Kept 143 of 144 patches**") for m in at.markdown)
