"""Class-specific maps side by side and the contrastive map: analysis.contrastive_map and
relevance_share against definitions written here (plain loops), the Classes tab's helpers, its
report arrays and downloads, and the tab itself through AppTest (the pictures and the chart show
the values of the maps computed here from the model)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_trust import ok, open_tab, start

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from viz_app import analysis as A
from viz_app import colormaps, render, results
from viz_app.sidebar import gallery
from viz_app.tabs import classes as T
from viz_app.tabs.common import Ctx

OPTS = {"method": "nearest", "cmap": colormaps.DEFAULT_SEQUENTIAL, "alpha": 0.55}  # the Rollout tab's defaults


# ---- definitions written here ---------------------------------------------------------------------


def share_loop(m: np.ndarray) -> np.ndarray:
    """(gh, gw) -> each value over the map's total, in float64; NaN everywhere when the total is not
    positive and finite."""
    total = 0.0
    for v in np.asarray(m, np.float64).flat:
        total += float(v)
    out = np.full(m.shape, np.nan)
    if math.isfinite(total) and total > 0:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                out[i, j] = float(m[i, j]) / total
    return out


def contrast_loop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, sb = share_loop(a), share_loop(b)
    out = np.empty(a.shape)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = sa[i, j] - sb[i, j]
    return out


def gradient_rollout_loop(model: VisionTransformer, x: torch.Tensor, target: int) -> np.ndarray:
    """Chefer et al. (ICCV 2021) for one image, written here: the attentions' gradients of the class
    logit from autograd, then R = I, R <- R + mean_h(relu(grad * attn)) @ R layer by layer (numpy,
    float64), and the row of the tokens the classifier reads (their mean; the patch rows' mean for a
    model that pools patches) over the patches."""
    c = model.config
    out = model(x.clone().requires_grad_(True), output_attentions=True)
    grads = torch.autograd.grad(out.logits[0, target], out.attentions)
    T_ = c.num_tokens
    R = np.eye(T_)
    for a, g in zip(out.attentions, grads):
        prod = np.maximum(g[0].detach().double().numpy() * a[0].detach().double().numpy(), 0.0)
        bar = np.zeros((T_, T_))
        for h in range(prod.shape[0]):
            bar += prod[h] / prod.shape[0]
        R = R + bar @ R
    rows = list(c.readout_tokens) or list(range(c.num_prefix_tokens, T_))
    row = sum(R[r] for r in rows) / len(rows)
    return row[c.num_prefix_tokens :].reshape(c.grid)


# ---- contrastive_map and relevance_share ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_contrastive_map_is_the_difference_of_shares_numpy_and_torch(dtype):
    rng = np.random.default_rng(0)
    a = rng.random((4, 3, 5)).astype(dtype) ** 3  # non-square grid, a batch
    b = rng.random((4, 3, 5)).astype(dtype)
    got = A.contrastive_map(a, b)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (4, 3, 5)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for i in range(4):
        np.testing.assert_allclose(got[i], contrast_loop(a[i], b[i]), atol=tol)
        np.testing.assert_allclose(A.relevance_share(a)[i], share_loop(a[i]), atol=tol)
    tg = A.contrastive_map(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(tg, torch.Tensor) and tg.dtype == torch.from_numpy(a).dtype
    np.testing.assert_allclose(tg.numpy(), got, atol=tol)


def test_contrastive_map_sums_to_zero_stays_in_range_and_is_zero_for_one_class():
    rng = np.random.default_rng(1)
    a, b = rng.random((6, 7, 4)) * 1e-3, rng.random((6, 7, 4)) * 50.0  # very different scales
    c = A.contrastive_map(a, b)
    np.testing.assert_allclose(c.sum(axis=(-2, -1)), 0.0, atol=1e-12)
    assert np.all(np.abs(c) <= 1.0)
    # scale does not matter: a map and 1000 x the map have the same shares
    np.testing.assert_allclose(A.contrastive_map(a, 1000 * a), 0.0, atol=1e-15)
    assert np.all(A.contrastive_map(a, a) == 0)
    # the extremes: all of A's relevance on one patch, all of B's on another
    one_a, one_b = np.zeros((2, 3)), np.zeros((2, 3))
    one_a[0, 1], one_b[1, 2] = 5.0, 0.25
    want = np.zeros((2, 3))
    want[0, 1], want[1, 2] = 1.0, -1.0
    np.testing.assert_array_equal(A.contrastive_map(one_a, one_b), want)


def test_inputs_are_not_modified_and_a_batch_is_each_image_alone():
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 4, 4)).astype(np.float32), rng.random((3, 4, 4)).astype(np.float32)
    a0, b0 = a.copy(), b.copy()
    batch = A.contrastive_map(a, b)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], A.contrastive_map(a[i], b[i]))
    # one image's map against a batch (broadcast) is that map against each
    against = A.contrastive_map(a[0], b)
    for i in range(3):
        np.testing.assert_array_equal(against[i], A.contrastive_map(a[0], b[i]))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    A.contrastive_map(ta, tb)
    A.relevance_share(ta)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    assert torch.equal(ta, torch.from_numpy(a0)) and torch.equal(tb, torch.from_numpy(b0))


@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "negative"])
def test_a_map_without_shares_gives_no_value_only_for_its_image(bad):
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 3, 4)), rng.random((2, 3, 4))
    if bad == "zero":
        a[1] = 0.0
    elif bad == "nan":
        a[1, 2, 3] = np.nan
    elif bad == "inf":
        a[1, 0, 0] = np.inf
    else:
        a[1] = -a[1]
    for kind in (np.asarray, torch.from_numpy):
        got = np.asarray(A.contrastive_map(kind(a), kind(b)))
        assert np.isnan(got[1]).all() and np.isnan(np.asarray(A.relevance_share(kind(a)))[1]).all()
        assert np.isnan(share_loop(a[1])).all()  # the definition here agrees
        np.testing.assert_allclose(got[0], contrast_loop(a[0], b[0]), atol=1e-12)
        # the other way round as well: B without shares
        assert np.isnan(np.asarray(A.contrastive_map(kind(b), kind(a)))[1]).all()


def test_mixed_kinds_follow_map_a_and_bad_shapes_raise():
    a = torch.rand(3, 4, dtype=torch.float64)
    b = np.random.default_rng(4).random((3, 4))
    got = A.contrastive_map(a, b)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), contrast_loop(a.numpy(), b), atol=1e-12)
    assert isinstance(A.contrastive_map(b, a), np.ndarray)
    # integer maps count as float32 (at least)
    ints = np.arange(12).reshape(3, 4)
    assert A.contrastive_map(ints, ints[::-1]).dtype == np.float32
    with pytest.raises(ValueError, match="gh, gw"):
        A.contrastive_map(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="grids"):
        A.contrastive_map(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="gh, gw"):
        A.relevance_share(np.ones(5))


# ---- the tab's helpers, without Streamlit ----------------------------------------------------------


def test_overlay_on_one_scale():
    """render.overlay with a vmax above the map's maximum: colours from 0 to vmax, and with the
    paper's alpha mask, a mask that reaches 1 only where the map reaches vmax."""
    rng = np.random.default_rng(5)
    view = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    heat = rng.random((4, 6)).astype(np.float32)
    top = float(heat.max())

    def on(h, method, vmax):
        return render.overlay(view, h, vmin=0.0, vmax=vmax, patch_size=16, **{**OPTS, "method": method})

    own = on(heat, "paper", top)
    np.testing.assert_array_equal(own, render.overlay(view, heat, method="paper", patch_size=16))
    # on a scale twice the map's maximum the alpha mask is half as strong (rounding: one unit)
    half = on(heat, "paper", 2 * top).astype(int)
    want = view.astype(np.float64) * render.upsample(heat, (64, 96), "paper", patch_size=16)[..., None] / 2
    assert np.abs(half - want).max() <= 1.0
    # with a colour map, the colour of a patch of value v is the map's colour at v / vmax
    lut = colormaps.get("inferno").lut.astype(float)
    got = on(heat, "nearest", 2 * top).astype(float)
    want = view[8, 8] * 0.45 + lut[int(heat[0, 0] / (2 * top) * 255 + 0.5)] * 0.55
    assert np.abs(got[8, 8] - want).max() <= 1.0
    # a patch without value is drawn as no value with every method
    bad = heat.copy()
    bad[1, 2] = np.nan
    for method in ("nearest", "bilinear", "paper"):
        out = on(bad, method, top)
        block = out[16:32, 32:48].reshape(-1, 3)
        assert {tuple(p) for p in block} <= {render.NO_VALUE, render.NO_VALUE_HATCH}, method


def test_grey_view_and_the_contrastive_figure():
    view = np.zeros((32, 48, 3), np.uint8)
    view[..., 0] = 200  # red
    g = T.grey(view)
    assert g.shape == view.shape and (g[..., 0] == g[..., 1]).all() and (g[..., 0] == round(0.299 * 200)).all()
    heat = np.array([[0.25, -0.5, 0.0], [0.1, 0.1, 0.05]], np.float32)
    sa, sb = np.full((2, 3), 0.2), np.full((2, 3), 0.1)
    fig = json.loads(
        T.contrast_figure(g, heat, sa, sb, patch_size=16, alpha=0.4, smooth=False, names=("a<b>", "c")).to_json()
    )
    cells = fig["data"][1]
    np.testing.assert_allclose(decode(cells["z"]), heat)
    assert (cells["zmin"], cells["zmax"]) == (-0.5, 0.5)  # symmetric: 0 is white
    assert cells["colorscale"] == colormaps.get(colormaps.DEFAULT_DIVERGING).plotly_scale()
    assert (cells["x0"], cells["dx"], cells["opacity"]) == (8, 16, 0.4)
    lut = colormaps.get(colormaps.DEFAULT_DIVERGING).lut.astype(int)
    assert lut[-1, 0] > lut[-1, 2] and lut[0, 2] > lut[0, 0]  # the top (A more) red, the bottom (B more) blue
    assert "<b>" not in fig["layout"]["title"]["text"]  # class names are text, not markup


def decode(value) -> np.ndarray:
    """A plotly array: a list, or base64-typed {'dtype', 'bdata', 'shape'}."""
    import base64

    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return arr.reshape([int(s) for s in str(shape).split(",")]) if shape else arr
    return np.asarray([[np.nan if v is None else v for v in row] for row in value], dtype=float)


# ---- chosen, report arrays and downloads on models of every kind ---------------------------------------


VARIANTS = {
    "class token": dict(),
    "registers": dict(num_registers=2),
    "distilled": dict(distill_token=True, distilled_head=True),
    "no class token": dict(class_token=False, global_pool="avg", fc_norm=True),
    "non-square": dict(image_size=(48, 80)),
}


def bare_ctx(cfg: ViTConfig, seed: int = 0) -> tuple[Ctx, VisionTransformer, torch.Tensor]:
    """A Ctx around a random model and random pixels, with results.class_map as the page's class_map."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    model.init_weights(seed=seed)
    x = torch.randn(1, 3, *cfg.image_size)
    lm = SimpleNamespace(model=model, config=cfg, device=torch.device("cpu"), dtype=torch.float32, labels=None)
    prepared = SimpleNamespace(pixels=x[0], view=np.full((*cfg.image_size, 3), 128, np.uint8))
    with torch.no_grad():
        logits = model(x).logits
    probs = None if logits is None else logits.softmax(-1)[0].numpy()
    result = SimpleNamespace(probs=probs, prepared=prepared)
    ctx = Ctx(
        lm=lm,
        result=result,
        original=prepared.view,
        image_name="random",
        image_digest="0",
        source="test",
        gradient_map=lambda t: results.class_map(lm, prepared, t),
        example_mad=lambda key: None,
        class_map=lambda t, method="gradient": results.class_map(lm, prepared, t, method),
    )
    return ctx, model, x


def small_cfg(**kw) -> ViTConfig:
    base = dict(image_size=48, patch_size=16, embed_dim=24, depth=2, num_heads=2, mlp_dim=48, num_classes=6)
    return ViTConfig(**{**base, **kw})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_report_arrays_are_the_class_maps_of_the_model(variant):
    ctx, model, x = bare_ctx(small_cfg(**VARIANTS[variant]))
    method, classes, (a, b) = T.chosen(ctx)  # outside a page: the defaults
    order = np.argsort(-ctx.result.probs, kind="stable")
    assert method == "gradient" and classes == order[:3].tolist() and (a, b) == tuple(order[:2].tolist())
    arrays = T.report_arrays(ctx)
    assert set(arrays) == {"class_maps", "class_map_classes", "contrastive_map", "contrastive_classes"}
    assert arrays["class_maps"].dtype == np.float32 and arrays["contrastive_map"].dtype == np.float32
    assert arrays["class_map_classes"].dtype == np.int64 and arrays["contrastive_classes"].tolist() == [a, b]
    want = np.stack([gradient_rollout_loop(model, x, c) for c in classes])
    assert arrays["class_maps"].shape == (3, *ctx.lm.config.grid)
    np.testing.assert_allclose(arrays["class_maps"], want, rtol=1e-4, atol=1e-7 * np.abs(want).max())
    np.testing.assert_allclose(arrays["contrastive_map"], contrast_loop(want[0], want[1]), atol=1e-6)
    assert np.isfinite(arrays["contrastive_map"]).all()


def test_chosen_fits_kept_values_to_the_model(monkeypatch):
    ctx, _, _ = bare_ctx(small_cfg())
    order = np.argsort(-ctx.result.probs, kind="stable").tolist()
    kept = {}
    monkeypatch.setattr(T.state, "read", lambda key, default=None: kept.get(key, T.state.DEFAULTS.get(key)))
    for k, want in ((50, 6), (0, 1), (4, 4), ("x", 3)):  # at most C (6) classes, at least 1
        kept["cl_k"] = k
        assert T.chosen(ctx)[1] == order[:want], k
    kept.update(cl_a=5, cl_b=99, ro_method="lrp")
    assert T.chosen(ctx)[0] == "lrp" and T.chosen(ctx)[2] == (5, order[1])  # 99 is no class: top-2
    kept.update(cl_a=None, cl_b=-1, ro_method="nonsense")
    assert T.chosen(ctx)[0] == "gradient" and T.chosen(ctx)[2] == (order[0], order[1])
    one, _, _ = bare_ctx(small_cfg(num_classes=1))
    assert T.chosen(one)[1:] == ([0], (0, 0))  # one class: A = B = class 0
    none, _, _ = bare_ctx(small_cfg(num_classes=0))
    assert T.chosen(none)[1:] == ([], (-1, -1))
    assert T.report_arrays(none) == {} and T.downloads(none) == {}


def test_downloads_are_pictures_of_the_report_arrays():
    ctx, _, _ = bare_ctx(small_cfg(image_size=(48, 80)))
    files = T.downloads(ctx)
    assert set(files) == {"class_maps.png", "contrastive_map.png"}
    assert files["class_maps.png"][0] == "Top 3 class maps" and files["contrastive_map.png"][0] == "Contrastive map"
    for _, data in files.values():
        img = np.asarray(Image.open(io.BytesIO(data)))
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[1] >= 1024
    # the contrastive picture's colours are the report's contrastive map on the diverging scale
    heat = T.report_arrays(ctx)["contrastive_map"]
    big = np.asarray(Image.open(io.BytesIO(files["contrastive_map.png"][1])).convert("RGB"))
    drawn = T.contrast_overlay(ctx, heat, OPTS)
    factor = int(np.ceil(1024 / max(drawn.shape[:2])))
    # the picture sits under the title at the left edge: find it by its first row
    first = np.repeat(drawn[0], factor, axis=0)
    top = next(y for y in range(big.shape[0]) if np.array_equal(big[y, : first.shape[0]], first))
    np.testing.assert_array_equal(big[top : top + drawn.shape[0] * factor : factor, : first.shape[0] : factor], drawn)


# ---- the page ------------------------------------------------------------------------------------------


def save_model(folder: Path, cfg: ViTConfig, seed: int, broken: bool = False) -> Path:
    m = VisionTransformer(cfg)
    m.init_weights(seed=seed)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if broken:
        sd["head.weight"] = torch.full_like(sd["head.weight"], float("nan"))
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    cfg = ViTConfig(image_size=96, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=12)
    return {
        "classifier": save_model(tmp_path_factory.mktemp("cl"), cfg, 5),
        "features": save_model(tmp_path_factory.mktemp("feat"), ViTConfig(**{**cfg.to_dict(), "num_classes": 0}), 5),
        "broken": save_model(tmp_path_factory.mktemp("nan"), cfg, 5, broken=True),
    }


def shown_tiles(at, media) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The tab's map pictures (captions, RGB arrays) and its colour bar."""
    caps, pics, bar = [], [], None
    for el in at.get("image"):
        img = el.proto.imgs[0]
        rgb = np.asarray(Image.open(io.BytesIO(media[img.url.rsplit("/", 1)[-1].split(".")[0]])).convert("RGB"))
        if re.match(r"\d+\. ", img.caption):
            caps.append(img.caption)
            pics.append(rgb)
        elif not img.caption and pics and bar is None:
            bar = rgb
    return caps, pics, bar


def contrast_chart(at) -> dict:
    for el in at.get("plotly_chart"):
        if el.proto.id.endswith("cl_contrast"):
            return json.loads(el.proto.spec)
    raise KeyError("cl_contrast")


def reference(path: Path, at, method: str = "gradient"):
    """The model, its view and pixels of the image shown, and a function class -> its map, computed
    here (the loop above, or the LRP module for method lrp)."""
    lm = load_checkpoint(path)
    prepared = prepare_image(load_image(gallery()[at.selectbox(key="img").value]), lm.preprocessing)
    x = prepared.pixels[None]
    with torch.no_grad():
        probs = lm.model(x).logits.softmax(-1)[0].numpy()

    def class_map(c: int) -> np.ndarray:
        if method == "lrp":
            return A.transformer_attribution(lm.model, x, torch.tensor([c]))[0].numpy()
        return gradient_rollout_loop(lm.model, x, c)

    return lm, prepared.view, probs, class_map


def check_page(at, media, view, probs, class_map, *, k: int, a: int, b: int, opts: dict = OPTS) -> None:
    """The tiles are the overlays of the maps computed here on their one scale, in probability order,
    with name and probability; the chart's cells are the contrastive map computed here."""
    order = np.argsort(-probs, kind="stable")[:k]
    maps = np.stack([class_map(int(c)) for c in order]).astype(np.float32)
    caps, pics, bar = shown_tiles(at, media)
    assert caps == [f"{i + 1}. class {c} ({probs[c]:.1%})" for i, c in enumerate(order)]
    vmax = float(maps.max())
    for pic, m in zip(pics, maps):
        want = T.enlarged(render.overlay(view, m, vmin=0.0, vmax=vmax, patch_size=16, **opts))
        assert pic.shape == want.shape
        assert np.abs(pic.astype(int) - want).max() <= 1  # maps equal to float rounding
    assert bar is not None and bar.shape[0] == pics[0].shape[0]
    spec = contrast_chart(at)
    cells = spec["data"][1]
    want = contrast_loop(class_map(a), class_map(b))
    np.testing.assert_allclose(decode(cells["z"]), want, atol=1e-6)
    m = np.abs(want).max()
    assert cells["zmax"] == pytest.approx(m, rel=1e-5) and cells["zmin"] == -cells["zmax"]
    custom = decode(cells["customdata"])
    np.testing.assert_allclose(custom[..., 2], 100 * share_loop(class_map(a)), atol=1e-4)
    np.testing.assert_allclose(custom[..., 3], 100 * share_loop(class_map(b)), atol=1e-4)
    assert spec["layout"]["title"]["text"] == f"Share of 'class {a}' minus share of 'class {b}'"
    assert any(T.CONTRAST_CAPTION in c.value for c in at.caption)


@pytest.mark.app
def test_the_tab_shows_the_models_class_maps_and_their_contrast(models, media):
    at = open_tab(start(models["classifier"]), "Classes")
    lm, view, probs, class_map = reference(models["classifier"], at)
    order = np.argsort(-probs, kind="stable")
    check_page(at, media, view, probs, class_map, k=3, a=int(order[0]), b=int(order[1]))
    assert at.slider(key="cl_k").max == 10  # min(10, C = 12)
    at.slider(key="cl_k").set_value(6).run()
    at.selectbox(key="cl_a").set_value(int(order[7])).run()
    at.selectbox(key="cl_b").set_value(int(order[2])).run()
    ok(at)
    media.clear()
    at.run()
    check_page(at, media, view, probs, class_map, k=6, a=int(order[7]), b=int(order[2]))
    assert at.query_params["cl_k"] == "6" and at.query_params["cl_a"] == str(order[7])
    # the values persist on other tabs and come back
    open_tab(at, "Overview")
    open_tab(at, "Classes")
    assert at.slider(key="cl_k").value == 6 and at.selectbox(key="cl_b").value == int(order[2])


@pytest.mark.app
def test_the_tab_follows_the_rollout_tabs_display_settings(models, media):
    at = open_tab(start(models["classifier"]), "Rollout")
    at.selectbox(key="ro_up").set_value("paper").run()
    at.selectbox(key="ro_cmap").set_value("viridis").run()
    media.clear()
    open_tab(at, "Classes")
    lm, view, probs, class_map = reference(models["classifier"], at)
    order = np.argsort(-probs, kind="stable")
    opts = {"method": "paper", "cmap": "viridis", "alpha": 0.55}
    check_page(at, media, view, probs, class_map, k=3, a=int(order[0]), b=int(order[1]), opts=opts)
    assert contrast_chart(at)["data"][1]["zsmooth"] == "best"


@pytest.mark.app
def test_a_model_without_a_classifier_is_told_why(models):
    at = open_tab(start(models["features"]), "Classes")
    assert [i.value for i in at.info] == [T.NO_CLASSIFIER]
    assert not at.get("plotly_chart")


@pytest.mark.app
def test_a_broken_classifier_draws_no_value_and_does_not_fail(models):
    at = open_tab(start(models["broken"]), "Classes")
    cells = contrast_chart(at)["data"][1]
    assert np.isnan(decode(cells["z"])).all()
    assert np.isfinite([cells["zmin"], cells["zmax"]]).all()
    assert any("No value" in c.value for c in at.caption)


@pytest.mark.app
def test_the_tab_shows_transformer_attribution(models, media):
    at = open_tab(start(models["classifier"]), "Classes")
    at.selectbox(key="ro_method").set_value("lrp").run()
    ok(at)
    media.clear()
    at.run()
    lm, view, probs, class_map = reference(models["classifier"], at, "lrp")
    order = np.argsort(-probs, kind="stable")
    check_page(at, media, view, probs, class_map, k=3, a=int(order[0]), b=int(order[1]))
