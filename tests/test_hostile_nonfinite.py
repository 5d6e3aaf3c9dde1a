"""Hostile inputs, non-finite values (issue 14, group 2): checkpoints with NaN or infinite weights
(all of them, only the head, one block, the position or patch embeddings) and pixels that are not
finite. Every tab runs without an exception or an error and with exactly one warning naming what
is not finite; analysis functions return NaN where a value is undefined instead of raising;
pictures draw such values in the stated no-value pattern; figures and downloads stay valid
(finite colour and axis ranges, strict JSON, decodable PNGs, CSV without 'nan')."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import plotly.io as pio
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from model import VisionTransformer, ViTConfig
from viz_app import analysis as A
from viz_app import figures, probes, render, results
from viz_app.analysis.faithfulness import minmax

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
NAN, INF = float("nan"), float("inf")
CONFIG = ViTConfig(image_size=48, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=3)

# variant -> (what is broken in the state dict, phrases the warning must hold, phrases it must not)
VARIANTS = {
    "all_nan": (
        lambda sd: [t.fill_(NAN) for t in sd.values()],
        ["position embeddings", "patch-embedding filters", "attention maps of all 3 layers", "logits"],
        [],
    ),
    "head_nan": (
        lambda sd: [sd[k].fill_(NAN) for k in sd if k.startswith("head.")],
        ["the logits"],
        ["attention", "position", "filters"],
    ),
    "block_qkv_inf": (
        lambda sd: sd["blocks.1.attn.qkv.weight"].fill_(INF),
        ["attention maps of layers 2 and 3 of 3", "logits"],
        ["position", "filters", "layers 1"],
    ),
    "last_mlp_nan": (lambda sd: sd["blocks.2.mlp.fc2.weight"].fill_(NAN), ["token norms", "logits"], ["attention"]),
    "pos_embed_nan": (lambda sd: sd["pos_embed"].fill_(NAN), ["position embeddings", "attention maps"], ["filters"]),
    "patch_embed_nan": (lambda sd: sd["patch_embed.proj.weight"].fill_(NAN), ["patch-embedding filters"], ["position"]),
}


def write_model(folder: Path, breakage=None) -> Path:
    m = VisionTransformer(CONFIG)
    m.init_weights(seed=0)
    sd = {k: v.detach().float().contiguous().clone() for k, v in m.state_dict().items()}
    if breakage is not None:
        breakage(sd)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": CONFIG.to_dict()}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    out = {name: write_model(root / name, breakage) for name, (breakage, _, _) in VARIANTS.items()}
    out["finite"] = write_model(root / "finite")
    return out


# ---- the app ------------------------------------------------------------------------------------


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def decoded(value) -> np.ndarray | None:
    """A plotly array (a list, or the {'dtype', 'bdata'} typed form) as numbers, else None."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).astype(np.float64)
    if isinstance(value, list) and value and all(isinstance(v, int | float) or v is None for v in value):
        return np.array([np.nan if v is None else v for v in value], np.float64)
    return None


def check_figures(at: AppTest) -> None:
    """Every plotly chart on the page: strict JSON, finite colour ranges and axis ranges, and no
    infinite value in an array (plotly.js draws NaN as a gap, but infinity breaks its scales)."""
    for el in at.get("plotly_chart"):
        spec = strict_json(el.proto.spec)
        for trace in spec["data"]:
            for key in ("zmin", "zmax"):
                if key in trace:
                    assert isinstance(trace[key], int | float) and math.isfinite(trace[key]), (key, trace[key])
            for key in ("x", "y", "z"):
                arr = decoded(trace.get(key))
                if arr is not None:
                    assert not np.isinf(arr).any(), key
        for name, axis in spec["layout"].items():
            if name.startswith(("xaxis", "yaxis")) and isinstance(axis, dict) and "range" in axis:
                assert all(isinstance(v, int | float) and math.isfinite(v) for v in axis["range"]), (name, axis)


def one_warning(at: AppTest, must: list[str], must_not: list[str]) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    texts = [w.value for w in at.warning]
    assert len(texts) == 1, texts
    assert "NaN or infinite values in" in texts[0], texts
    for phrase in must:
        assert phrase in texts[0], (phrase, texts[0])
    for phrase in must_not:
        assert phrase not in texts[0], (phrase, texts[0])
    check_figures(at)


def start(path: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.radio(key="main_kind").set_value("Path or hub id").run()
    at.text_input(key="main_path").set_value(str(path)).run()
    at.button(key="main_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def download(at: AppTest, media: dict[str, bytes], button) -> bytes:
    return media[button.proto.url.rsplit("/", 1)[-1].split(".")[0]]


def check_downloads(at: AppTest, media: dict[str, bytes]) -> int:
    """Every download button's file is valid: PNGs decode, JSON is strict, CSV has no 'nan'."""
    count = 0
    for b in at.get("download_button"):
        data = download(at, media, b)
        name = b.proto.label
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            Image.open(io.BytesIO(data)).load()
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            im = Image.open(io.BytesIO(data))
            for k in range(im.n_frames):  # every frame decodes
                im.seek(k)
                im.load()
        elif data[4:8] == b"ftyp":  # MP4: every frame decodes
            with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
                f.write(data)
                f.flush()
                cap = cv2.VideoCapture(f.name)
                frames = 0
                while cap.read()[0]:
                    frames += 1
                assert frames > 0, name
        elif data[:2] == b"PK":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                strict_json(str(z["report_json"]))
        elif b"map,direction" in data[:40]:
            rows = list(csv.reader(io.StringIO(data.decode())))
            assert all(len(r) == len(rows[0]) for r in rows), name
            assert not any(cell.lower() in ("nan", "inf", "-inf") for r in rows for cell in r), name
        else:
            strict_json(data.decode())
        count += 1
    return count


@pytest.mark.app
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_tab_survives_a_nonfinite_checkpoint_with_one_warning(variant, models, media):
    _, must, must_not = VARIANTS[variant]
    at = start(models[variant])
    one_warning(at, must, must_not)  # Overview
    steps = {
        "Heads": [
            lambda: at.radio(key="hd_query").set_value("patch"),
            lambda: at.radio(key="hd_scale").set_value("shared"),
        ],
        "Rollout": [lambda m=m: at.selectbox(key="ro_up").set_value(m) for m in ("bilinear", "paper", "nearest")]
        + [lambda: at.radio(key="mo_what").set_value("head")],
        "Classes": [lambda: at.slider(key="cl_k").set_value(2)],
        "Tokens": [],
        "Embeddings": [],
        "Distance": [],
        "Compare": [],
        "Download": [],
        "Sanity": [lambda: at.button(key="sn_run").click()],
        "Faithfulness": [lambda: at.radio(key="fa_mode").set_value("pixels")],
        "Probes": [lambda: at.button(key="pr_rank").click(), lambda: at.slider(key="pr_keep_top").set_value(0.5)],
    }
    for tab, actions in steps.items():
        at.session_state["tab"] = tab
        at.run()
        one_warning(at, must, must_not)
        for act in actions:
            act().run()
            one_warning(at, must, must_not)
        if tab == "Download":
            assert check_downloads(at, media) >= 8
        if tab == "Faithfulness":
            assert check_downloads(at, media) == 1  # the curves' CSV
            if "logits" in must:  # no finite score: no map can be favoured
                assert any("favours no map" in m.value for m in at.markdown)


@pytest.mark.app
def test_compare_tab_warns_about_a_broken_second_model(models):
    at = start(models["finite"])
    assert not at.warning
    at.session_state["tab"] = "Compare"
    at.run()
    at.radio(key="cmp_kind").set_value("Path or hub id").run()
    at.text_input(key="cmp_path").set_value(str(models["all_nan"])).run()
    at.button(key="cmp_load").click().run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    texts = [w.value for w in at.warning]
    assert len(texts) == 1 and texts[0].startswith("all_nan:") and "position embeddings" in texts[0], texts
    check_figures(at)


@pytest.mark.app
def test_pixels_that_are_not_finite_are_named(tmp_path, monkeypatch):
    """Pixels that overflow (e.g. a cast to float16 of a large normalized value) reach the model as
    infinities: the warning names the model input, and every tab still draws."""
    from viz_app import cache

    real = cache.prepare_image

    def overflowing(image, preprocessing):
        prepared = real(image, preprocessing)
        pixels = prepared.pixels.clone()
        pixels[:, :8, :8] = INF
        return dataclasses.replace(prepared, pixels=pixels)

    monkeypatch.setattr(cache, "prepare_image", overflowing)
    at = start(write_model(tmp_path / "finite_weights"))  # a path of its own: results are cached by source
    for tab in ("Overview", "Heads", "Rollout", "Embeddings", "Distance", "Download"):
        at.session_state["tab"] = tab
        at.run()
        one_warning(at, ["the preprocessed image (the model input)"], ["position", "filters"])


# ---- the helper the page and the CLI share ------------------------------------------------------


def test_nonfinite_outputs_names_each_part_and_the_layers():
    ok = np.ones((2, 3))
    assert results.nonfinite_outputs(pixels=ok, logits=ok, attentions=np.ones((4, 2, 5, 5))) is None
    att = torch.rand(6, 2, 5, 5)
    att[1, 0, 0, 0] = NAN
    att[2, 1, 3, 3] = INF
    att[3, 0, 1, 1] = -INF
    att[5, 1, 0, 0] = NAN
    text = results.nonfinite_outputs(attentions=att, logits=np.array([1.0, NAN]), pos_embed=torch.ones(3))
    assert text == "NaN or infinite values in the attention maps of layers 2-4 and 6 of 6 and the logits."
    assert "all 2 layers" in results.nonfinite_outputs(attentions=np.full((2, 3), NAN))
    assert (
        results.nonfinite_outputs(filters=torch.tensor([INF]))
        == "NaN or infinite values in the patch-embedding filters."
    )


# ---- analysis functions on NaN and infinite input -----------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_analysis_functions_return_nan_instead_of_raising(bad):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 3, 4, 4, generator=g)
    w[3, 1, 2, 2] = bad
    pca = A.filter_pca(w, k=5)  # the SVD raised LinAlgError on such filters
    assert pca.components.shape == (5, 3, 4, 4) and torch.isnan(pca.components).all()
    assert torch.isnan(pca.explained_variance_ratio).all()

    attn = torch.rand(1, 2, 2, 37, 37, generator=g).softmax(-1)
    attn[0, 1, 0, 5, 7] = bad  # row 5: the query below
    kw = dict(num_prefix=1, grid=(6, 6))
    A.attention_rollout(attn, discard_ratio=0.5, **kw)
    A.rollout_per_layer(attn, **kw)
    A.gradient_rollout(attn, attn, **kw)
    A.mean_attention_distance(attn, patch_size=8, **kw)
    A.prefix_mass_share(attn, 1)
    A.attention_entropy(attn, num_prefix=1)
    maps = A.attention_maps(attn, query=5, **kw)
    mask = A.mass_threshold_mask(maps)  # -inf raised "needs non-negative maps"
    assert not mask[0, 1, 0].any() and mask[0, 0, 0].any()  # the broken map has no mask, the others do

    pe = torch.randn(36, 16, generator=g)
    pe[7, 3] = bad
    sim = A.position_similarity(pe)
    A.similarity_decay(sim, (6, 6))
    A.similarity_by_offset(sim, (6, 6))
    A.neighbour_contrast(sim, (6, 6))
    A.compare_position_embeddings(pe, (6, 6), torch.randn(16, 16, generator=g), (4, 4))

    heat = np.random.default_rng(0).random((6, 6))
    broken = heat.copy()
    broken[2, 3] = bad
    assert np.isnan(A.spearman(broken, heat)) and np.isnan(A.spearman(heat, broken))  # no defined order
    assert np.isnan(A.ssim(broken, heat))  # was 1-ish: a broken map read as a flat one
    assert np.isnan(minmax(broken)[2, 3]) and np.nanmax(minmax(broken)) == 1.0
    assert A.mean_ci(np.array([1.0, 2.0, 3.0, bad]))[0] == pytest.approx(2.0)
    A.removal_order(broken)


def test_the_favoured_map_needs_a_finite_area():
    fr = np.linspace(0, 1, 3)
    scores = {(k, "deletion"): np.array([[NAN, NAN, NAN]]) for k in ("rollout", "last_layer", "random")}
    curves = probes.Curves("drop", 2, fr, np.array([0, 1, 2]), np.array([0]), scores, None, "p", maps=("rollout",))
    f = probes.favoured(curves)
    assert f["map"] is None and f["margin_vs_random"] is None
    scores[("last_layer", "deletion")] = np.array([[1.0, 0.5, 0.0]])
    assert probes.favoured(curves)["map"] == "last_layer"


# ---- pictures and figures ----------------------------------------------------------------------


def png_ok(image: np.ndarray) -> None:
    data = render.to_png(image)
    decoded_image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded_image.shape == image.shape


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_pictures_draw_no_value_and_stay_valid(bad):
    heat = np.random.default_rng(1).random((4, 4))
    heat[1, 2] = bad
    view = np.full((32, 32, 3), 120, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an invalid cast to uint8 drew arbitrary colours
        for method in render.UPSAMPLING:
            img = render.overlay(view, heat, method=method, patch_size=8, vmax=bad)
            patch = img[8:16, 16:24].reshape(-1, 3)
            assert {tuple(p) for p in patch} <= {render.NO_VALUE, render.NO_VALUE_HATCH}, method
            assert tuple(img[0, 0]) not in (render.NO_VALUE, render.NO_VALUE_HATCH)
        fig, _ = render.publication_figure(img, title="t", cmap="inferno", vmin=bad, vmax=bad, label="x")
        png_ok(fig)
        png_ok(render.colorbar(300, cmap="inferno", vmin=0.0, vmax=bad))
        grid = render.labelled_grid(
            np.stack([[heat, heat]]), row_name="r", col_name="c", cmap="inferno", vmin=0, vmax=bad
        )
        png_ok(grid)
        comps = np.random.default_rng(2).standard_normal((5, 3, 4, 4))
        comps[1, 0, 2, 2] = bad
        png_ok(render.filter_tiles(comps))
        png_ok(render.filter_tiles(np.full((3, 3, 4, 4), NAN)))
        mad = np.random.default_rng(3).random((4, 3)) * 40
        mad[2, 1] = bad
        png_ok(render.mad_scatter_png(mad, prefix_share=mad / 80, ymax=bad))
        png_ok(render.mad_scatter_png(np.full((3, 2), bad)))
        shares = render.share_of_max(np.stack([heat, heat * 2]))
        assert np.isnan(shares[:, 1, 2]).all() and np.nanmax(shares) == pytest.approx(1.0)
    assert render.finite_max(np.array([bad, 3.0])) == 3.0 and render.finite_max(np.array([NAN])) == 1.0
    assert render.finite_max(np.zeros(3)) == 1e-12


def figure_spec(fig) -> dict:
    return strict_json(pio.to_json(fig, validate=False))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_figures_keep_finite_ranges(bad):
    heat = np.random.default_rng(4).random((5, 5))
    heat[0, 0] = bad
    specs = [
        figure_spec(figures.patch_heatmap(heat, num_prefix=1, zmin=bad, zmax=bad)),
        figure_spec(figures.layer_head_matrix(heat, title="t", unit="u", zmax=bad)),
        figure_spec(
            figures.tile_figure(
                np.stack([[heat, heat]]), row_name="r", col_name="c", colorbar_title="x", zmin=bad, zmax=bad
            )
        ),
        figure_spec(figures.token_norm_map(heat, heat > 0.5, num_prefix=1, prefix_names=("cls",))),
        figure_spec(figures.mad_scatter_figure(heat * 30, prefix_share=heat)),
        figure_spec(figures.mad_scatter_figure(np.full((3, 2), bad), ymax=bad)),
        figure_spec(figures.curves({"a": (np.arange(5), heat[0])}, title="t", x_title="x", y_title="y")),
        figure_spec(figures.top_classes(["a", "b"], [bad, 0.5])),
    ]
    for spec in specs:
        for trace in spec["data"]:
            for key in ("zmin", "zmax"):
                if key in trace:
                    assert isinstance(trace[key], float | int) and math.isfinite(trace[key]), (key, trace)
            for key in ("x", "y", "z"):
                arr = decoded(trace.get(key))
                if arr is not None:
                    assert not np.isinf(arr).any(), key
        yrange = spec["layout"].get("yaxis", {}).get("range")
        if yrange is not None:
            assert all(isinstance(v, int | float) and math.isfinite(v) for v in yrange), yrange
    assert "no value" in json.dumps(specs[-1]["data"][0]["text"])
    assert "no value" in specs[5]["layout"]["title"]["text"]
    # a heat map with no finite value keeps its cells' extent (plotly.js would collapse the axes)
    empty = figure_spec(figures.patch_heatmap(np.full((3, 4), bad), num_prefix=1, marked=(1, 1)))
    assert empty["layout"]["xaxis"]["range"] == [-0.5, 3.5] and empty["layout"]["yaxis"]["range"] == [2.5, -0.5]
    assert "no value" in empty["layout"]["annotations"][0]["text"]
