"""Views a researcher can trust: the colours a figure is given are the colours it shows, settings
survive tab and model changes, downloads are what the page shows, and the app and the CLI write
the same report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from viz_app import analysis as A
from viz_app import colormaps, figures, render, report
from viz_app.cli import main as cli_main
from viz_app.sidebar import gallery
from viz_app.tabs import TABS, heads

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
# Streamlit's theme swaps these hex colours in a figure's text (its colour placeholders)
PLACEHOLDER = re.compile(r"#0000(?:[0-3][0-9]|40)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """A random classifier with 4 layers x 3 heads on a 6x6 grid (fast, and not the demo)."""
    cfg = ViTConfig(image_size=96, patch_size=16, embed_dim=48, depth=4, num_heads=3, mlp_dim=96, num_classes=10)
    m = VisionTransformer(cfg)
    m.init_weights(seed=3)
    folder = tmp_path_factory.mktemp("small")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


def download(at: AppTest, media: dict[str, bytes], label: str, *, partial: bool = False) -> bytes:
    """The bytes of the download button labelled `label` (partial: whose label contains it)."""
    for b in at.get("download_button"):
        if (label in b.proto.label) if partial else (b.proto.label == label):
            file_id = b.proto.url.rsplit("/", 1)[-1].split(".")[0]
            return media[file_id]
    raise KeyError(label)


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def start(model: Path | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300).run()
    if model is not None:
        at.radio(key="main_kind").set_value("Path or hub id").run()
        at.text_input(key="main_path").set_value(str(model)).run()
        at.button(key="main_load").click().run()
    return ok(at)


def open_tab(at: AppTest, label: str) -> AppTest:
    at.session_state["tab"] = label
    return ok(at.run())


def specs(at: AppTest) -> list[tuple[str, str]]:
    return [(el.proto.id, el.proto.spec) for el in at.get("plotly_chart")]


def title_of(spec: dict) -> str:
    t = spec.get("layout", {}).get("title", "")
    return t.get("text", "") if isinstance(t, dict) else str(t)


# ---- colours ------------------------------------------------------------------------------------


def test_no_figure_on_any_tab_carries_a_theme_placeholder_colour(small_model):
    at = start(small_model)
    seen = 0
    for label in TABS:
        open_tab(at, label)
        for key, text in specs(at):
            seen += 1
            spec = json.loads(text)
            # Streamlit's own template (layout.template) holds the placeholders by design; what the
            # figure itself says (its traces and the rest of its layout) must not
            spec.get("layout", {}).pop("template", None)
            found = PLACEHOLDER.search(json.dumps(spec))
            assert not found, (label, key, found and found.group())
    assert seen >= 8


def test_the_heads_map_draws_zero_with_the_first_colour_of_its_scale(small_model):
    at = open_tab(start(small_model), "Heads")
    big = next(json.loads(s) for _, s in specs(at) if title_of(json.loads(s)).startswith("Layer "))
    trace = big["data"][0]
    assert trace["zmin"] == 0
    first = trace["colorscale"][0]
    lut0 = colormaps.get("inferno").lut[0]
    assert first[0] == 0 and first[1] == f"rgb({lut0[0]}, {lut0[1]}, {lut0[2]})"
    assert trace["colorscale"][-1][0] == 1
    lut = colormaps.get("inferno").lut
    for at_, colour in trace["colorscale"]:  # every stop is the table's entry at that position
        assert colour == "rgb({}, {}, {})".format(*lut[round(at_ * 255)].tolist())


def test_sequential_maps_run_dark_to_light_and_the_diverging_map_is_white_at_zero():
    def luminance(rgb):
        r, g, b = (np.asarray(rgb, float) / 255).T
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    for name in colormaps.SEQUENTIAL:
        lum = luminance(colormaps.get(name).lut)
        assert lum[0] < 0.2 and lum[-1] > 0.6 and np.all(np.diff(lum) > -0.02), name  # never darker on the way up
    lut = colormaps.get(colormaps.DEFAULT_DIVERGING).lut.astype(int)
    assert lut[0, 2] > lut[0, 0] and lut[-1, 0] > lut[-1, 2]  # blue below, red above
    assert np.all(lut[127:129] > 235)  # white in the middle
    assert np.abs(lut[0] - lut[-1]).sum() > 150  # -1 and +1 look nothing alike
    # colorize and the plotly scale are the same table
    assert (render.colorize(np.array([[0.0, 1.0]]), "viridis", 0, 1)[0] == colormaps.get("viridis").lut[[0, 255]]).all()


def test_colour_bar_runs_from_the_stated_minimum_at_the_bottom_to_the_maximum_at_the_top():
    bar = render.colorbar(300, cmap="inferno", vmin=0.0, vmax=0.5, label="attention")
    lut = colormaps.get("inferno").lut
    column = bar[:, 4 + 3]  # inside the bar
    painted = column[(column != 255).any(axis=1)]
    np.testing.assert_allclose(painted[1], lut[-1], atol=12)  # top: the maximum
    np.testing.assert_allclose(painted[-2], lut[0], atol=12)  # bottom: the minimum


def test_maps_shown_side_by_side_have_the_same_size():
    opts = {"method": "nearest", "cmap": "inferno", "alpha": 0.5}
    from viz_app.tabs.common import with_colorbar

    img = np.zeros((224, 224, 3), np.uint8)
    a = with_colorbar(img, np.array([[0.0, 0.0414]]), opts, "rollout")
    b = with_colorbar(img, np.array([[0.0, 0.00529]]), opts, "relevance")
    assert a.shape == b.shape


# ---- kept settings -----------------------------------------------------------------------------


def test_settings_survive_every_tab_and_a_model_change(small_model, tmp_path):
    at = open_tab(start(small_model), "Heads")
    at.radio(key="hd_query").set_value("patch").run()
    at.number_input(key="hd_row").set_value(4).run()
    at.number_input(key="hd_col").set_value(2).run()
    at.slider(key="hd_layer").set_value(2).run()
    at.selectbox(key="hd_head").set_value(3).run()
    open_tab(at, "Rollout")
    at.slider(key="ro_discard").set_value(0.9).run()
    at.selectbox(key="ro_fusion").set_value("max").run()
    at.selectbox(key="ro_cmap").set_value("viridis").run()
    for label in TABS:
        open_tab(at, label)
    open_tab(at, "Heads")
    assert at.radio(key="hd_query").value == "patch"
    assert (at.number_input(key="hd_row").value, at.number_input(key="hd_col").value) == (4, 2)
    assert (at.slider(key="hd_layer").value, at.selectbox(key="hd_head").value) == (2, 3)
    assert any(title_of(json.loads(s)) == "Layer 2, head 3: attention of patch (4, 2)" for _, s in specs(at))
    open_tab(at, "Rollout")
    assert at.slider(key="ro_discard").value == pytest.approx(0.9)
    assert at.selectbox(key="ro_fusion").value == "max" and at.selectbox(key="ro_cmap").value == "viridis"
    # another model: the open tab stays, values that still fit stay, the rest are clamped
    cfg = ViTConfig(image_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4)
    other = VisionTransformer(cfg)
    other.init_weights(seed=9)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    at.radio(key="main_kind").set_value("Path or hub id").run()
    at.text_input(key="main_path").set_value(str(tmp_path)).run()
    at.button(key="main_load").click().run()
    ok(at)
    assert at.session_state["tab"] == "Rollout"
    assert at.slider(key="ro_discard").value == pytest.approx(0.9)
    open_tab(at, "Heads")
    assert at.slider(key="hd_layer").value == 2 and at.selectbox(key="hd_head").value == 2  # 3 heads -> 2
    assert (at.number_input(key="hd_row").value, at.number_input(key="hd_col").value) == (3, 2)  # 4x4 grid


def test_the_second_model_of_compare_stays_loaded(small_model, tmp_path):
    at = open_tab(start(), "Compare")
    at.radio(key="cmp_kind").set_value("Path or hub id").run()
    at.text_input(key="cmp_path").set_value(str(small_model)).run()
    at.button(key="cmp_load").click().run()
    ok(at)
    assert any("Similarity decay" in title_of(json.loads(s)) for _, s in specs(at))
    for label in ("Overview", "Heads", "Compare"):
        open_tab(at, label)
    assert any("Similarity decay" in title_of(json.loads(s)) for _, s in specs(at))
    assert at.query_params.get("compare") == str(small_model)


def test_a_copied_url_reopens_the_same_view(small_model):
    at = open_tab(start(small_model), "Rollout")
    at.slider(key="ro_discard").set_value(0.5).run()
    open_tab(at, "Heads")
    at.radio(key="hd_query").set_value("patch").run()
    at.number_input(key="hd_row").set_value(1).run()
    at.slider(key="hd_layer").set_value(3).run()
    at.selectbox(key="img").set_value("photo: coffee").run()
    url = dict(at.query_params)  # what the page wrote into the address bar
    assert url["model"] == str(small_model) and url["hd_layer"] == "3" and url["ro_discard"] == "0.5", url
    # AppTest does not mirror the open tab (Streamlit's own binding; the browser test checks it)
    url.setdefault("tab", "Heads")
    fresh = AppTest.from_file(APP, default_timeout=300)
    fresh.query_params.update(url)
    ok(fresh.run())
    assert fresh.session_state["model_source"] == str(small_model)
    assert fresh.selectbox(key="img").value == "photo: coffee"
    assert fresh.radio(key="hd_query").value == "patch" and fresh.number_input(key="hd_row").value == 1
    title = next(title_of(json.loads(t)) for _, t in specs(fresh) if title_of(json.loads(t)).startswith("Layer"))
    assert title == "Layer 3, head 1: attention of patch (1, 0)"
    fresh.query_params.pop("tab")  # a browser rewrites the address when the tab changes; AppTest does not
    open_tab(fresh, "Rollout")
    assert fresh.slider(key="ro_discard").value == pytest.approx(0.5)


def test_clicking_the_same_patch_again_selects_it_again(monkeypatch):
    """The patch picker's callback: after a click the chart gets a new key (empty selection), so a
    second click on the same patch, after typing another row, is seen."""
    ss: dict = {}
    monkeypatch.setattr(st, "session_state", ss)

    def click(x, y):
        ss[heads.chart_key("hd_click")] = {"selection": {"points": [{"x": x, "y": y}]}}
        heads.on_patch_click(16, (6, 6))

    click(40.0, 72.0)  # column 2, row 4
    assert (ss["hd_row"], ss["hd_col"], ss["hd_query"]) == (4, 2, "patch")
    ss["hd_row"] = 0  # the user types another row
    click(40.0, 72.0)
    assert ss["hd_row"] == 4
    ss["hd_query"] = "read-out token"  # and back to the read-out token
    click(40.0, 72.0)
    assert ss["hd_query"] == "patch"


# ---- downloads and the report ---------------------------------------------------------------------


def test_downloads_are_what_the_page_shows(small_model, media):
    at = open_tab(start(small_model), "Rollout")
    at.slider(key="ro_discard").set_value(0.9).run()
    at.selectbox(key="ro_fusion").set_value("max").run()
    at.slider(key="ro_layers").set_value((2, 4)).run()
    at.selectbox(key="ro_cmap").set_value("viridis").run()
    open_tab(at, "Download")
    arrays, meta = report.read_report(download(at, media, "Report (NPZ)"))
    s = meta["settings"]
    assert (s["rollout_discard"], s["rollout_fusion"], s["rollout_first_layer"], s["rollout_last_layer"]) == (
        pytest.approx(0.9),
        "max",
        2,
        4,
    )
    assert meta["display"]["cmap"] == "viridis"
    assert set(s) == {f.name for f in report.Settings.__dataclass_fields__.values()}  # no widget internals
    lm = load_checkpoint(small_model)
    path = gallery()[at.selectbox(key="img").value]
    x = prepare_image(load_image(path), lm.preprocessing).pixels[None]
    with torch.no_grad():
        attn = torch.stack(lm.model(x).attentions, 1)
    want = A.attention_rollout(attn, num_prefix=1, grid=(6, 6), head_fusion="max", discard_ratio=0.9, start=1, end=3)
    np.testing.assert_allclose(arrays["rollout"], want[0].numpy(), atol=1e-6)
    png = download(at, media, "Rollout overlay")
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert max(img.size) >= 1024
    # the overlay is coloured with viridis (the Rollout tab's choice), not the default inferno
    rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)[::37].astype(int)  # a sample of the pixels
    vir, inf = colormaps.get("viridis").lut, colormaps.get("inferno").lut
    assert (np.abs(rgb[:, None] - vir[None, ::8]).sum(-1).min(1) < 6).sum() > (
        np.abs(rgb[:, None] - inf[None, ::8]).sum(-1).min(1) < 6
    ).sum()
    assert "report.Settings" not in str(meta) and "viridis" in json.dumps(meta)
    assert "mean_attention_distance_renormalized" in arrays and "prefix_mass_share" in arrays


def test_app_and_cli_write_the_same_report(small_model, media, tmp_path):
    at = open_tab(start(small_model), "Rollout")
    at.slider(key="ro_discard").set_value(0.5).run()
    at.selectbox(key="ro_readout").set_value("cls").run()
    open_tab(at, "Heads")
    at.radio(key="hd_query").set_value("patch").run()
    at.number_input(key="hd_row").set_value(3).run()
    open_tab(at, "Download")
    app_arrays, meta = report.read_report(download(at, media, "Report (NPZ)"))
    (tmp_path / "settings.json").write_text(json.dumps(meta))
    path = gallery()[at.selectbox(key="img").value]
    out = tmp_path / "out"
    rc = cli_main(
        [
            "analyze",
            "--model",
            str(small_model),
            "--settings",
            str(tmp_path / "settings.json"),
            "--out",
            str(out),
            str(path),
        ]
    )
    assert rc == 0
    cli_arrays, cli_meta = report.read_report((out / f"{path.stem}.npz").read_bytes())
    assert cli_meta["settings"] == meta["settings"]
    assert set(cli_arrays) == set(app_arrays)
    for key in app_arrays:
        np.testing.assert_allclose(cli_arrays[key], app_arrays[key], atol=2e-5, err_msg=key)


def test_the_schema_is_documented_where_users_read_it(small_model):
    at = open_tab(start(small_model), "Download")
    text = " ".join(m.value for m in at.markdown)
    readme = (ROOT / "README.md").read_text()
    for f in report.SCHEMA:
        assert f"`{f.key}`" in text, f.key
        assert f"`{f.key}`" in readme, f.key


# ---- smaller defects -------------------------------------------------------------------------------


def test_distance_axes_start_at_zero_and_both_conventions_are_shown(small_model):
    at = open_tab(start(small_model), "Distance")
    scatters = [json.loads(s) for _, s in specs(at) if "Mean attention distance" in title_of(json.loads(s))]
    scatters += [json.loads(s) for _, s in specs(at) if title_of(json.loads(s)).startswith("This image")]
    assert len(scatters) == 2
    assert {"prefix mass counts as distance 0" in title_of(s) for s in scatters} == {True, False}
    for s in scatters:
        assert s["layout"]["yaxis"]["range"][0] == 0
    fig = figures.mad_scatter_figure(np.full((4, 3), 115.5) + np.random.default_rng(0).random((4, 3)))
    assert fig.layout.yaxis.range[0] == 0 and fig.layout.yaxis.range[1] > 115


def test_demo_opens_on_a_scene_and_warns_on_a_photo():
    at = start()
    assert at.selectbox(key="img").value.startswith("scene: ")
    assert not at.warning
    at.selectbox(key="img").set_value("photo: astronaut").run()
    assert any("shape scenes" in w.value for w in at.warning)


def test_sanity_check_shows_both_pointing_rules():
    at = open_tab(start(), "Sanity")
    table = at.get("table")[0]
    text = str(table.proto)
    assert "loose rule" in text and "strict rule" in text
    assert any("centre pixel" in c.value for c in at.caption)


def test_titles_name_patches_and_count_heads_from_one(small_model):
    at = open_tab(start(small_model), "Heads")
    at.radio(key="hd_query").set_value("patch").run()
    at.number_input(key="hd_row").set_value(4).run()
    at.number_input(key="hd_col").set_value(3).run()
    titles = [title_of(json.loads(s)) for _, s in specs(at)]
    assert any(t.endswith("attention of patch (4, 3)") for t in titles), titles
    assert not any("token 2" in t for t in titles)
    assert at.selectbox(key="hd_head").options[0] == "1"
    grid = next(json.loads(s) for key, s in specs(at) if "hd_grid" in key)
    assert grid["layout"]["xaxis"]["ticktext"][0] == "1" and grid["data"][0]["colorbar"]["title"]["text"]
    for el in at.get("plotly_chart"):
        if "hd_click" in el.proto.id or "hd_grid" in el.proto.id:
            assert json.loads(el.proto.config or "{}").get("displayModeBar") is False


def test_tile_clicks_select_the_tile(monkeypatch):
    """The grids' callbacks read the clicked marker's index (its customdata reaches Python as a
    dict made from a typed array, which broke an earlier version)."""
    from viz_app.tabs import embeddings, rollout

    ss: dict = {}
    monkeypatch.setattr(st, "session_state", ss)

    def click(name: str, index: int, callback) -> None:
        point = {"curve_number": 1, "point_number": index, "point_index": index, "customdata": {"0": 9, "1": 9}}
        ss[heads.chart_key(name)] = {"selection": {"points": [point]}}
        callback()

    click("hd_grid", 1 * 12 + 4, lambda: heads.on_tile_click(12))  # layer 2, head 5 of a 12 x 12 grid
    assert (ss["hd_layer"], ss["hd_head"]) == (2, 5)
    click("pe_tiles", 3 * 14 + 11, lambda: embeddings.on_tile_click(14))
    assert (ss["pe_row"], ss["pe_col"]) == (3, 11)
    ss["ro_layers"] = (2, 12)
    click("ro_strip", 6, lambda: rollout.on_strip_click(12))
    assert ss["ro_layers"] == (2, 7)
    ss[heads.chart_key("hd_grid")] = {"selection": {"points": [{"curve_number": 0, "point_index": [1, 2]}]}}
    heads.on_tile_click(12)  # a click that reached the heat map under the markers changes nothing
    assert (ss["hd_layer"], ss["hd_head"]) == (2, 5)
