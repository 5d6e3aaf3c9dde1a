"""AppTest: every tab and control renders, and what the page shows matches viz_app's functions."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from model.resources import DEMO_DIR, EXAMPLES_DIR, SCENES_DIR
from viz_app import analysis as A
from viz_app.sidebar import gallery

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
EXAMPLE = EXAMPLES_DIR / "chelsea.jpg"
TIMEOUT = 300


def decode(value):
    """plotly arrays arrive base64-typed: {'dtype': 'f8', 'bdata': ..., 'shape': '4, 4'}."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            arr = arr.reshape([int(s) for s in str(shape).split(",")])
        return arr
    return np.asarray(value, dtype=float)


def chart(at: AppTest, key: str) -> dict:
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if el.proto.id and key in el.proto.id:
            return spec
    raise KeyError(key)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def heatmap_with_title(at: AppTest, text: str) -> np.ndarray:
    for spec in charts(at):
        title = spec.get("layout", {}).get("title", {})
        title = title.get("text", "") if isinstance(title, dict) else str(title)
        if text in title:
            return decode(spec["data"][0]["z"])
    raise KeyError(text)


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory) -> Path:
    """A random checkpoint with the ViT-B/16 shape (86 M parameters), timm layout."""
    model = VisionTransformer(ViTConfig(num_classes=1000))
    model.init_weights(seed=0)
    path = tmp_path_factory.mktemp("b16") / "vit_b16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def load_path(at: AppTest, path: Path, prefix: str = "main") -> AppTest:
    at.radio(key=f"{prefix}_kind").set_value("Path or hub id").run()
    at.text_input(key=f"{prefix}_path").set_value(str(path)).run()
    at.button(key=f"{prefix}_load").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_tab(at: AppTest, label: str) -> AppTest:
    """Tabs are lazy (only the open one runs): open one the way a click does."""
    at.session_state["tab"] = label
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_problems(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_default_page_has_every_tab():
    at = run_app()
    no_problems(at)
    labels = [t.label for t in at.tabs]
    assert labels[:9] == [
        "Overview",
        "Heads",
        "Rollout",
        "Classes",
        "Tokens",
        "Embeddings",
        "Distance",
        "Compare",
        "Download",
    ]
    assert len(at.get("image")) >= 2
    for label in labels:
        open_tab(at, label)
        no_problems(at)


def test_vit_b16_views_match_the_functions(vit_b16):
    at = load_path(run_app(), vit_b16)
    no_problems(at)
    lm = load_checkpoint(vit_b16)
    # the example shown by default
    path = gallery()[at.selectbox(key="img").value]
    x = prepare_image(load_image(path), lm.preprocessing).pixels[None]
    with torch.no_grad():
        attn = torch.stack(lm.model(x).attentions, 1)
    c = lm.config
    # Heads: a patch query, layer 3, head 5
    open_tab(at, "Heads")
    at.radio(key="hd_query").set_value("patch").run()
    at.number_input(key="hd_row").set_value(4).run()
    at.number_input(key="hd_col").set_value(9).run()
    at.slider(key="hd_layer").set_value(3).run()
    at.selectbox(key="hd_head").set_value(6).run()  # heads count from 1 on the page
    no_problems(at)
    shown = heatmap_with_title(at, "Layer 3, head 6: attention of patch (4, 9)")
    q = c.num_prefix_tokens + 4 * c.grid[1] + 9
    want = A.attention_maps(attn[0, 2, 5], query=q, num_prefix=1, grid=c.grid).numpy()
    np.testing.assert_allclose(shown, want, atol=1e-5)
    rev = heatmap_with_title(at, "Who attends to patch")
    np.testing.assert_allclose(
        rev, A.attention_to_patch(attn[0, 2, 5], num_prefix=1, grid=c.grid, patch=4 * 14 + 9).numpy(), atol=1e-5
    )
    mad = heatmap_with_title(at, "Mean attention distance")
    want_mad = A.mean_attention_distance(attn[0], num_prefix=1, grid=c.grid, patch_size=16).numpy()
    np.testing.assert_allclose(mad, want_mad, rtol=1e-4)
    # Embeddings: the large tile is a row of the position similarity
    open_tab(at, "Embeddings")
    at.number_input(key="pe_row").set_value(2).run()
    at.number_input(key="pe_col").set_value(11).run()
    tile = heatmap_with_title(at, "Similarity to patch (2, 11)")
    sim = A.position_similarity(lm.model.pos_embed[0, 1:].float()).numpy()
    np.testing.assert_allclose(tile.ravel(), sim[2 * 14 + 11], atol=1e-5)


@pytest.mark.slow
def test_rollout_and_distance_controls(vit_b16):
    at = load_path(run_app(), vit_b16)
    open_tab(at, "Rollout")
    at.selectbox(key="ro_fusion").set_value("max").run()
    at.slider(key="ro_discard").set_value(0.5).run()
    at.slider(key="ro_layers").set_value((2, 10)).run()
    at.selectbox(key="ro_readout").set_value("patches").run()
    at.selectbox(key="ro_class").set_value(7).run()
    at.selectbox(key="ro_up").set_value("paper").run()
    at.selectbox(key="ro_cmap").set_value("viridis").run()
    no_problems(at)
    open_tab(at, "Overview").toggle(key="ov_original").set_value(True).run()
    open_tab(at, "Heads").toggle(key="hd_drop").set_value(True).run()
    open_tab(at, "Download")
    names = {b.proto.label for b in at.get("download_button")}
    assert {"Report (NPZ)", "Rollout overlay", "Gradient rollout overlay", "Every layer and head"} <= names
    open_tab(at, "Distance")
    no_problems(at)
    at.button(key="md_examples").click().run()
    no_problems(at)
    titles = [str(s.get("layout", {}).get("title", {})) for s in charts(at)]
    assert any("Mean over" in t for t in titles)


def test_compare_two_models(vit_b16, tmp_path):
    other = VisionTransformer(
        ViTConfig(image_size=160, patch_size=16, embed_dim=192, depth=3, num_heads=3, mlp_dim=384)
    )
    other.init_weights(seed=1)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    at = open_tab(load_path(run_app(), vit_b16), "Compare")
    at = load_path(at, path, prefix="cmp")
    no_problems(at)
    at.selectbox(key="cmp_method").set_value("bilinear").run()
    no_problems(at)
    decay = [s for s in charts(at) if "decay" in str(s.get("layout", {}).get("title", ""))]
    assert len(decay) == 1 and len(decay[0]["data"]) == 2


def test_bad_image_then_good_image():
    at = run_app()
    at.radio(key="img_kind").set_value("Upload").run()
    at.get("file_uploader")[-1].set_value(("notes.png", b"this is not a png", "image/png")).run()
    assert not at.exception
    assert any("not an image" in e.value or "damaged" in e.value for e in at.error)
    buf = io.BytesIO()
    Image.open(EXAMPLE).save(buf, format="PNG")
    at.get("file_uploader")[-1].set_value(("cat.png", buf.getvalue(), "image/png")).run()
    no_problems(at)


def test_bad_checkpoint_keeps_the_previous_model(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x04not a checkpoint")
    at = load_path(run_app(), bad)
    assert not at.exception
    assert any("Could not load" in e.value for e in at.error)
    assert len(at.tabs) >= 7 and at.tabs[0].label == "Overview"  # still showing the previous model


def test_uploaded_checkpoint_loads_and_leaves_no_file(tmp_path):
    import tempfile

    m = VisionTransformer(
        ViTConfig(image_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_dim=128, num_classes=3)
    )
    m.init_weights(seed=5)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    before = set(Path(tempfile.gettempdir()).glob("vit-lens-upload-*"))
    at = run_app()
    at.radio(key="main_kind").set_value("Upload a checkpoint").run()
    at.get("file_uploader")[0].set_value(("tiny.safetensors", path.read_bytes(), "application/octet-stream")).run()
    no_problems(at)
    assert "64x64" in " ".join(md.value for md in at.markdown)  # the model card shows the upload
    assert set(Path(tempfile.gettempdir()).glob("vit-lens-upload-*")) == before


@pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(), reason="demo model not installed")
def test_demo_model_is_the_default_and_sanity_tab_scores_a_scene():
    at = run_app()
    no_problems(at)
    assert at.radio(key="main_kind").value == "Embedded demo"
    at.selectbox(key="img").set_value("scene: 0_circle").run()
    open_tab(at, "Sanity")
    no_problems(at)
    tables = at.get("table")
    assert tables, "the sanity tab shows where each map points"
    open_tab(at, "Overview")
    lm = load_checkpoint("demo")
    x = prepare_image(load_image(SCENES_DIR / "0_circle.png"), lm.preprocessing).pixels[None]
    with torch.no_grad():
        probs = lm.model(x).logits.softmax(-1)[0]
    shown = [s for s in charts(at) if s["data"] and s["data"][0].get("type") == "bar"]
    assert shown, "top-5 bar chart"
    np.testing.assert_allclose(sorted(decode(shown[0]["data"][0]["x"]))[::-1], probs.topk(5).values.numpy(), atol=1e-5)


@pytest.mark.slow
def test_failing_hub_then_working_hub_then_offline_cache(tmp_path, monkeypatch):
    """A hub download that fails gives one message and keeps the model; once the server works the
    model loads; with HF_HUB_OFFLINE=1 the page lists what is cached."""
    from huggingface_hub import constants

    from model.weights import hub

    import fake_hub
    import hf_models

    folder = tmp_path / "repo"
    hf_models.save(hf_models.build("vit", patch_size=16, image_size=64), folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "TIMEOUT_S", 1.0)
    with fake_hub.serve({"acme/tiny-vit": files}) as (url, state):
        monkeypatch.setenv("HF_ENDPOINT", url)
        state.mode = "500"
        at = load_path(run_app(), Path("acme/tiny-vit"))
        assert [e.value for e in at.error] == [
            "Could not load acme/tiny-vit: the hub answered 500 for acme/tiny-vit; try again later. "
            "Showing the previous model, the embedded demo model."
        ]
        assert at.radio(key="main_kind").value == "Embedded demo"  # the picker names the model shown
        assert at.tabs[0].label == "Overview" and not list((tmp_path / "cache").rglob("*.incomplete"))
        state.mode = "ok"
        at = load_path(at, Path("acme/tiny-vit"))
        no_problems(at)
        assert any("acme/tiny-vit" in m.value for m in at.markdown)  # its model card
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = run_app()
    at.radio(key="main_kind").set_value("Path or hub id").run()
    assert any("Hub models in the cache: acme/tiny-vit" in c.value for c in at.caption), [c.value for c in at.caption]


def test_memory_warning_instead_of_dying(monkeypatch):
    from viz_app import pipeline

    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda device: 1024)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception and not at.tabs
    assert any("needs about" in w.value and "free on cpu" in w.value for w in at.warning)
    at.button(key="mem_override").click().run()
    no_problems(at)
    assert at.tabs[0].label == "Overview"
    at.run()  # later reruns do not ask again for the same model
    assert at.tabs[0].label == "Overview" and not at.warning


def test_memory_estimate_grows_with_tokens_and_gradients():
    from viz_app.pipeline import analysis_memory_bytes

    b16, l16 = ViTConfig(), ViTConfig(image_size=384, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)
    maps_l16 = 24 * 16 * 577**2
    assert 4 * maps_l16 <= analysis_memory_bytes(l16, torch.float32) <= 8 * maps_l16  # the maps once, plus a margin
    assert analysis_memory_bytes(b16, torch.float32) < analysis_memory_bytes(l16, torch.float32) / 10
    # bf16 maps are analysed as a float32 copy: more memory than fp32 maps analysed in place
    assert analysis_memory_bytes(b16, torch.bfloat16) > analysis_memory_bytes(b16, torch.float32)
    assert analysis_memory_bytes(b16, torch.float32, gradients=True) > analysis_memory_bytes(b16, torch.float32)


def test_conv_stem_model_explains_the_missing_filter_view(tmp_path):
    cfg = ViTConfig(
        image_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        num_classes=3,
        conv_stem=(8, 16, 32),
    )
    m = VisionTransformer(cfg)
    m.init_weights(seed=0)
    save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    at = load_path(run_app(), tmp_path)
    no_problems(at)
    assert any("conv stem 8-16-32" in m.value for m in at.markdown)  # the model card says so
    open_tab(at, "Embeddings")
    no_problems(at)
    assert any("convolutional stem" in i.value for i in at.info)
    assert any("Similarity to patch" in str(c.get("layout", {}).get("title")) for c in charts(at))  # tiles still shown
