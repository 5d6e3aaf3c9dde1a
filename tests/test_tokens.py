"""Token budgets (Darcet et al. 2024, 'registers'): token_budgets against a plain-loop definition,
its properties, and the Tokens tab (the values it shows are token_budgets', for models with registers,
a distillation token and no class token)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import streamlit as st
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_app import decode
from test_probes_app import save_model
from test_trust import ok, open_tab, start

from model import ViTConfig, load_checkpoint, load_image, prepare_image
from viz_app import analysis as A
from viz_app.sidebar import gallery
from viz_app.tabs import tokens as tab

# ---- an independent definition ---------------------------------------------------------------------


def budgets_by_loop(
    attn: np.ndarray, norms: np.ndarray, P: int, factor: float, queries: str, readout_tokens: tuple[int, ...]
) -> np.ndarray:
    """(L, H, T, T), (L+1, T) -> (L, H, P+1): every number from its definition, one value at a time."""
    L, H, T, _ = attn.shape
    out = np.zeros((L, H, P + 1))
    for layer in range(L):
        patch_norms = [float(norms[layer, t]) for t in range(P, T)]
        ranked, n = sorted(patch_norms), len(patch_norms)
        median = ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2  # even: the two middles' mean
        high = [P + n for n, v in enumerate(patch_norms) if v > factor * median]
        if queries == "patches":
            rows = list(range(P, T))
        elif queries == "all":
            rows = list(range(T))
        else:
            rows = list(readout_tokens) if readout_tokens else list(range(P, T))
        for h in range(H):
            for j in range(P + 1):
                acc = 0.0
                for i in rows:
                    total = sum(float(attn[layer, h, i, k]) for k in range(T))
                    mass = float(attn[layer, h, i, j]) if j < P else sum(float(attn[layer, h, i, k]) for k in high)
                    acc += mass / total
                out[layer, h, j] = acc / len(rows)
            if any(np.isnan(v) for v in patch_norms):
                out[layer, h, P] = np.nan
    return out


def random_case(seed: int, *, L=3, H=2, P=2, N=12, lead=()):
    g = torch.Generator().manual_seed(seed)
    T = P + N
    attn = torch.randn(*lead, L, H, T, T, generator=g).mul(2).softmax(-1)
    norms = torch.rand(*lead, L + 1, T, generator=g) + 0.5
    # a few clear outliers in some layers
    norms[..., 1, P + 3] = 9.0
    norms[..., 2, P + 5] = 7.0
    norms[..., 2, P + 7] = 3.0
    return attn, norms


# ---- token_budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("queries", ["patches", "readout", "all"])
@pytest.mark.parametrize("P,readout", [(0, ()), (1, (0,)), (2, (0, 1)), (5, (0,)), (4, None)])
def test_budgets_match_the_loop_definition(queries, P, readout):
    attn, norms = random_case(P * 7 + len(queries), P=P, N=15)  # N odd: the median is a patch's own norm
    got = A.token_budgets(attn, norms, num_prefix=P, factor=2.0, queries=queries, readout_tokens=readout)
    assert got.dtype == torch.float32 and got.shape == (3, 2, P + 1)
    want_tokens = readout if readout is not None else ((0,) if P else ())
    want = budgets_by_loop(attn.double().numpy(), norms.double().numpy(), P, 2.0, queries, want_tokens)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_budgets_of_rows_that_do_not_sum_to_one_are_shares():
    attn, norms = random_case(1, P=1, N=12)  # N even: the median is the mean of the two middle values
    scaled = attn * torch.linspace(0.3, 3.0, attn.shape[-2])[:, None]  # each query row its own total
    got = A.token_budgets(scaled, norms, num_prefix=1, factor=1.5)
    want = budgets_by_loop(scaled.double().numpy(), norms.double().numpy(), 1, 1.5, "patches", (0,))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), A.token_budgets(attn, norms, num_prefix=1, factor=1.5).numpy(), atol=1e-6)


def test_prefix_columns_sum_to_prefix_mass_share_and_use_the_layer_input():
    attn, norms = random_case(2, P=3, N=20)
    got = A.token_budgets(attn, norms, num_prefix=3)
    np.testing.assert_allclose(got[..., :3].sum(-1).numpy(), A.prefix_mass_share(attn, 3).numpy(), atol=1e-6)
    # layer 2 (index 1) reads row 1 of the norms (its input, after block 1), where patch 3 is the only outlier
    np.testing.assert_allclose(got[1, :, 3].numpy(), attn[1, :, 3:, 3 + 3].mean(-1).numpy(), atol=1e-6)
    # an outlier only in the last row (after the last block) is no layer's input: nothing changes
    moved = norms.clone()
    moved[-1, 3 + 10] = 100.0
    torch.testing.assert_close(A.token_budgets(attn, moved, num_prefix=3), got)
    # the first layer's outliers come from row 0 (the embedding's output)
    moved[0, 3 + 8] = 100.0
    np.testing.assert_allclose(
        A.token_budgets(attn, moved, num_prefix=3)[0, :, 3].numpy(), attn[0, :, 3:, 3 + 8].mean(-1).numpy(), atol=1e-6
    )


def test_no_high_norm_patch_gives_zero_and_all_high_norm_gives_the_patch_share():
    attn, _ = random_case(3, P=1, N=9)
    flat = torch.ones(4, 10)
    got = A.token_budgets(attn, flat, num_prefix=1)
    assert (got[..., 1] == 0).all()
    # factor so small every patch is high-norm: the column is the share on patches, 1 - the prefix share
    got = A.token_budgets(attn, flat, num_prefix=1, factor=0.5)
    np.testing.assert_allclose(got[..., 1].numpy(), 1 - got[..., 0].numpy(), atol=1e-6)


def test_batch_is_per_image_and_inputs_are_not_modified():
    attn, norms = random_case(4, P=2, N=12, lead=(3,))
    a0, n0 = attn.clone(), norms.clone()
    for queries in ("patches", "readout", "all"):
        got = A.token_budgets(attn, norms, num_prefix=2, queries=queries, readout_tokens=(0, 1))
        assert got.shape == (3, 3, 2, 3)
        for b in range(3):
            one = A.token_budgets(attn[b], norms[b], num_prefix=2, queries=queries, readout_tokens=(0, 1))
            torch.testing.assert_close(got[b], one)
    torch.testing.assert_close(attn, a0, rtol=0, atol=0)
    torch.testing.assert_close(norms, n0, rtol=0, atol=0)
    # a batch viewed out of the model's (L, B, H, T, T) block (not contiguous), and two leading dims
    viewed = attn.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(A.token_budgets(viewed, norms, num_prefix=2), A.token_budgets(attn, norms, num_prefix=2))
    two = A.token_budgets(attn[None], norms[None], num_prefix=2)
    torch.testing.assert_close(two[0], A.token_budgets(attn, norms, num_prefix=2))
    empty = A.token_budgets(attn[:0], norms[:0], num_prefix=2)
    assert empty.shape == (0, 3, 2, 3)


def test_low_precision_attention_is_read_as_float32():
    attn, norms = random_case(5, P=1, N=12)
    half = attn.bfloat16()
    got = A.token_budgets(half, norms, num_prefix=1)
    want = budgets_by_loop(half.double().numpy(), norms.double().numpy(), 1, 2.0, "patches", (0,))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("queries", ["patches", "readout", "all"])
def test_budgets_taken_a_few_images_at_a_time_match_the_loop_definition(monkeypatch, queries):
    from viz_app.analysis import chunks

    attn, norms = random_case(6, P=2, N=12, lead=(5,))
    attn = attn.transpose(0, 1).contiguous().transpose(0, 1).to(torch.bfloat16)  # the model's block, bf16
    monkeypatch.setattr(chunks, "CHUNK_VALUES", 2 * 2 * 14 * 14)  # two images of a layer per step: 3 steps
    got = A.token_budgets(attn, norms, num_prefix=2, queries=queries)
    for b in range(5):
        one = budgets_by_loop(attn[b].double().numpy(), norms[b].double().numpy(), 2, 2.0, queries, (0,))
        np.testing.assert_allclose(got[b].numpy(), one, atol=1e-6)


def test_nan_norms_and_nan_attention():
    attn, norms = random_case(6, P=1, N=12)
    bad = norms.clone()
    bad[1, 4] = float("nan")  # a patch norm of layer 2's input: that layer's outliers are undefined
    got = A.token_budgets(attn, bad, num_prefix=1)
    assert torch.isnan(got[1, :, 1]).all()
    assert torch.isfinite(got[1, :, 0]).all() and torch.isfinite(got[[0, 2]]).all()
    torch.testing.assert_close(got[[0, 2]], A.token_budgets(attn, norms, num_prefix=1)[[0, 2]])
    bad = norms.clone()
    bad[1, 0] = float("nan")  # the class token's norm: the patches' median is still defined
    torch.testing.assert_close(A.token_budgets(attn, bad, num_prefix=1), A.token_budgets(attn, norms, num_prefix=1))
    broken = attn.clone()
    broken[0, 1, 5, 7] = float("nan")  # one query row of layer 1, head 2
    got = A.token_budgets(broken, norms, num_prefix=1)
    assert torch.isnan(got[0, 1]).all()  # the mean over queries includes the NaN row
    torch.testing.assert_close(got[1:], A.token_budgets(attn, norms, num_prefix=1)[1:])
    # the read-out row alone is unaffected by a patch row's NaN
    read = A.token_budgets(broken, norms, num_prefix=1, queries="readout")
    torch.testing.assert_close(read, A.token_budgets(attn, norms, num_prefix=1, queries="readout"))


def test_bad_arguments():
    attn, norms = random_case(7, P=1, N=12)
    with pytest.raises(ValueError, match="queries"):
        A.token_budgets(attn, norms, num_prefix=1, queries="cls")
    with pytest.raises(ValueError, match="token_norms"):
        A.token_budgets(attn, norms[:-1], num_prefix=1)
    with pytest.raises(ValueError, match="readout tokens"):
        A.token_budgets(attn, norms, num_prefix=1, queries="readout", readout_tokens=(1,))
    with pytest.raises(ValueError, match="factor"):
        A.token_budgets(attn, norms, num_prefix=1, factor=0.0)
    with pytest.raises(ValueError, match="num_prefix"):
        A.token_budgets(attn, norms, num_prefix=13)


def test_budget_names():
    assert A.budget_names(ViTConfig()) == ["cls", "high-norm patches"]
    assert A.budget_names(ViTConfig(distill_token=True, num_registers=2)) == [
        "cls",
        "dist",
        "reg0",
        "reg1",
        "high-norm patches",
    ]
    assert A.budget_names(ViTConfig(class_token=False, global_pool="avg")) == ["high-norm patches"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_attention_is_worked_one_layer_at_a_time(dtype):
    """ViT-B size: no allocation larger than one layer's maps in float32 (bfloat16 maps are read one
    layer at a time as float32; float32 ones are not copied at all)."""
    from torch.profiler import ProfilerActivity, profile

    attn = torch.rand(12, 12, 197, 197).div_(197).to(dtype)
    norms = torch.rand(13, 197)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = A.token_budgets(attn, norms, num_prefix=1)
    assert got.shape == (12, 12, 2)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    layer = 12 * 197 * 197 * 4
    assert 0 < biggest <= (layer if dtype == torch.bfloat16 else layer // 50), biggest


# ---- the Tokens tab -----------------------------------------------------------------------------------

SMALL = dict(image_size=(96, 80), patch_size=16, embed_dim=48, depth=3, num_heads=2, mlp_dim=96)  # a 6 x 5 grid
LAYOUTS = {
    "registers": ViTConfig(**SMALL, num_classes=5, num_registers=3, pos_embed_prefix=1, layer_scale=True),
    "distilled": ViTConfig(**SMALL, num_classes=5, distill_token=True, distilled_head=True),
    "no class token": ViTConfig(**SMALL, num_classes=5, class_token=False, global_pool="avg", fc_norm=True),
}
ONE_LAYER = ViTConfig(image_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_dim=16, num_classes=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {
        name: save_model(cfg, tmp_path_factory.mktemp(name.replace(" ", "_")), seed=5) for name, cfg in LAYOUTS.items()
    }


def model_run(at: AppTest, path: Path):
    """The model's own attention and token norms for the image the page shows (no app code)."""
    lm = load_checkpoint(path)
    x = prepare_image(load_image(gallery()[at.selectbox(key="img").value]), lm.preprocessing).pixels[None]
    with torch.inference_mode():
        out = lm.model(x, output_attentions=True, output_token_norms=True)
    return lm.config, torch.stack(out.attentions, 1)[0].float(), out.token_norms[0].float()


def shown_charts(at: AppTest) -> dict[str, dict]:
    """plotly charts of the tab by their key (without Streamlit's prefix)."""
    out = {}
    for el in at.get("plotly_chart"):
        key = el.proto.id.rsplit("-", 1)[-1]
        if key.startswith("tk_"):
            out[key] = json.loads(el.proto.spec)
    return out


@pytest.mark.app
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_tab_shows_token_budgets(models, layout):
    at = open_tab(start(models[layout]), "Tokens")
    c, attn, norms = model_run(at, models[layout])
    P = c.num_prefix_tokens
    names = A.budget_names(c)
    for factor, queries in ((2.0, "patches"), (1.0, "readout"), (1.0, "all")):
        at.slider(key="tk_factor").set_value(factor).run()
        at.radio(key="tk_queries").set_value(queries).run()
        ok(at)
        want = A.token_budgets(
            attn, norms, num_prefix=P, factor=factor, queries=queries, readout_tokens=c.readout_tokens
        ).numpy()
        charts = shown_charts(at)
        assert len([k for k in charts if k.startswith("tk_budget_")]) == P + 1
        for j, name in enumerate(names):
            spec = charts[f"tk_budget_{j}"]
            assert name in spec["layout"]["title"]["text"]
            trace = spec["data"][0]
            assert (trace["zmin"], trace["zmax"]) == (0, 1)
            assert list(trace["x"]) == list(range(1, c.num_heads + 1)) and list(trace["y"]) == [1, 2, 3]
            np.testing.assert_allclose(decode(trace["z"]), want[..., j], atol=1e-5)
        high = A.token_norm_outliers(norms, num_prefix=P, factor=factor).numpy()
        counts = charts["tk_counts"]["data"][0]
        np.testing.assert_allclose(decode(counts["y"]), high[:3].sum(-1))
        assert list(decode(counts["x"])) == [1, 2, 3]
        caption = " ".join(x.value for x in at.caption)
        assert f"{factor:g} x the median" in caption and tab.QUERY_LABELS[queries].split(" ")[0] in caption
        if factor == 1.0:  # about half the patches are above the median: the column is not all 0
            assert want[..., P].max() > 0.05
    if layout == "registers":
        assert "reg2" in names and "Darcet" in " ".join(m.value for m in at.markdown)
    # the chosen layer's norms on the grid, its high-norm patches outlined
    at.slider(key="tk_layer").set_value(2).run()
    spec = shown_charts(ok(at))["tk_norms"]
    np.testing.assert_allclose(decode(spec["data"][0]["z"]), norms[1, P:].reshape(c.grid).numpy(), rtol=1e-5)
    high = A.token_norm_outliers(norms, num_prefix=P, factor=1.0)[1].reshape(c.grid).numpy()
    boxes = {(round(s["y0"] + 0.5), round(s["x0"] + 0.5)) for s in spec["layout"].get("shapes", [])}
    assert boxes == set(zip(*map(tuple, np.nonzero(high))))
    assert any("high-norm patches outlined" in (im.proto.imgs[0].caption or "") for im in at.get("image"))


@pytest.mark.app
def test_a_one_layer_model_has_no_layer_slider(tmp_path):
    at = open_tab(start(save_model(ONE_LAYER, tmp_path, seed=0)), "Tokens")
    assert "tk_norms" in shown_charts(at) and not [s for s in at.slider if s.key == "tk_layer"]
    assert "input of layer 1" in shown_charts(at)["tk_norms"]["layout"]["title"]["text"]


@pytest.mark.app
@pytest.mark.parametrize("variant", ["all_nan", "block_qkv_inf", "last_mlp_nan"])
def test_a_nonfinite_model_shows_no_value_and_one_warning(tmp_path, variant):
    from test_hostile_nonfinite import VARIANTS, one_warning, write_model

    breakage, must, must_not = VARIANTS[variant]
    at = open_tab(start(write_model(tmp_path / variant, breakage)), "Tokens")
    one_warning(at, must, must_not)  # the page's one warning; every chart strict JSON with finite ranges
    at.radio(key="tk_queries").set_value("all").run()
    one_warning(at, must, must_not)
    if variant == "last_mlp_nan":  # the norms after the last block are NaN: no layer's input, so no NaN shown
        assert any("After the last layer: no value" in c.value for c in at.caption)
        assert np.isfinite(decode(shown_charts(at)["tk_budget_1"]["data"][0]["z"])).all()


def fake_ctx(cfg: ViTConfig, attn: torch.Tensor, norms: torch.Tensor):
    return SimpleNamespace(
        lm=SimpleNamespace(config=cfg),
        result=SimpleNamespace(attentions=attn, token_norms=norms.numpy()),
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_tabs_numbers_and_the_png_follow_the_settings(monkeypatch, layout):
    cfg = LAYOUTS[layout]
    P, N = cfg.num_prefix_tokens, cfg.num_patches
    attn, norms = random_case(11, L=cfg.depth, H=cfg.num_heads, P=P, N=N)
    ctx = fake_ctx(cfg, attn, norms)
    monkeypatch.setattr(st, "session_state", {"tk_factor": 1.2, "tk_queries": "readout"})
    budget, high = tab.compute(ctx, *tab.settings())
    arrays = {"token_budget": budget, "high_norm_patches": high[: cfg.depth]}
    want = A.token_budgets(
        attn, norms, num_prefix=P, factor=1.2, queries="readout", readout_tokens=cfg.readout_tokens
    ).numpy()
    assert arrays["token_budget"].dtype == np.float32 and arrays["token_budget"].shape == (cfg.depth, 2, P + 1)
    np.testing.assert_array_equal(arrays["token_budget"], want)
    high = arrays["high_norm_patches"]
    assert high.dtype == bool and high.shape == (cfg.depth, N)
    np.testing.assert_array_equal(high, A.token_norm_outliers(norms, num_prefix=P, factor=1.2)[: cfg.depth].numpy())
    files = tab.downloads(ctx)
    assert list(files) == ["token_budgets.png"]
    label, png = files["token_budgets.png"]
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert max(img.shape[:2]) >= 1024 and img.shape[2] == 3
    # defaults where nothing was set; a factor out of range is clamped
    monkeypatch.setattr(st, "session_state", {"tk_factor": 99.0})
    assert tab.settings() == (tab.FACTOR_RANGE[1], "patches")
    monkeypatch.setattr(st, "session_state", {})
    assert tab.settings() == (2.0, "patches")


def test_the_png_draws_each_budget_column(monkeypatch):
    """Each panel of the picture is its column's values through the colour map (one tile per layer x head)."""
    cfg = LAYOUTS["distilled"]
    budget = np.zeros((3, 2, 3), np.float32)
    budget[..., 0] = 1.0  # cls: all yellow; dist and high-norm: all dark
    budget[1, 1, 2] = np.nan
    picture = tab.budget_picture(budget, A.budget_names(cfg), 2)
    from viz_app import colormaps

    lut = colormaps.get("viridis").lut
    colours = {tuple(v) for v in picture.reshape(-1, 3)}
    assert tuple(lut[-1]) in colours and tuple(lut[0]) in colours
    third = picture[:, 2 * picture.shape[1] // 3 :]
    assert tuple(lut[-1]) not in {tuple(v) for v in third.reshape(-1, 3)}  # the high-norm panel has no 1
    from viz_app import render

    assert tuple(render.NO_VALUE) in {tuple(v) for v in third.reshape(-1, 3)}  # the NaN tile is hatched grey
