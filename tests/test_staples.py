"""Issue 17's views that live in the Heads, Rollout and Download tabs: per-head overlays, mass
masks drawn on the image, layers in motion (animation, GIF, MP4), and the report's new arrays.

Each shown value is checked against the analysis function, and each analysis against a
definition written here."""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_trust import download

from model import Preprocessing, VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from model.resources import DEMO_DIR, SCENES_DIR
from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import animation, colormaps, render, report
from viz_app.pipeline import run_forward

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
SCENE = "scene: 3_star"


# --- pictures -----------------------------------------------------------------------------------


def outline_reference(H: int, W: int, mask: np.ndarray, t: int) -> np.ndarray:
    """Pixels an outline of thickness t covers, from the definition: a pixel is on the outline when
    it lies within the band of an edge between a kept patch and a patch not kept (or the border)."""
    gh, gw = mask.shape
    ph, pw = H // gh, W // gw
    on = np.zeros((H, W), bool)
    kept = lambda r, c: 0 <= r < gh and 0 <= c < gw and mask[r, c]  # noqa: E731
    for r in range(gh + 1):
        for c in range(gw):
            if kept(r - 1, c) != kept(r, c):
                y0 = min(max(r * ph - t // 2, 0), H - t)
                on[y0 : y0 + t, c * pw : (c + 1) * pw] = True
    for r in range(gh):
        for c in range(gw + 1):
            if kept(r, c - 1) != kept(r, c):
                x0 = min(max(c * pw - t // 2, 0), W - t)
                on[r * ph : (r + 1) * ph, x0 : x0 + t] = True
    return on


@pytest.mark.parametrize("seed", range(4))
def test_outline_follows_the_mask_boundary(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((5, 7)) < 0.4
    img = np.zeros((40, 56, 3), np.uint8)
    out = render.outline_patches(img, mask, width=2)
    drawn = (out != 0).any(axis=-1)
    np.testing.assert_array_equal(drawn, outline_reference(40, 56, mask, 2))
    assert (out[drawn] == render.MASK_COLOR).all()
    assert (img == 0).all()  # the input is not modified


def test_outline_of_one_patch_and_of_two_neighbours():
    img = np.zeros((32, 32, 3), np.uint8)
    one = np.zeros((4, 4), bool)
    one[1, 2] = True
    drawn = (render.outline_patches(img, one, width=1) != 0).any(-1)
    ring = np.zeros((32, 32), bool)
    ring[8:16, 16:24] = True
    ring[9:15, 17:23] = False
    # the band of an edge starts at the edge (t // 2 = 0 for t = 1): the ring's bottom and right
    # sides lie on the next patch's first row and column
    want = np.zeros((32, 32), bool)
    want[8, 16:24] = want[16, 16:24] = True
    want[8:16, 16] = want[8:16, 24] = True
    np.testing.assert_array_equal(drawn, want)
    two = one.copy()
    two[1, 3] = True  # a neighbour on the right: no edge between them
    drawn = (render.outline_patches(img, two, width=1) != 0).any(-1)
    assert not drawn[9:15, 24].any()
    assert not (render.outline_patches(img, np.zeros((4, 4), bool)) != 0).any()


def test_tile_mosaic_puts_each_tile_in_its_box():
    tiles = [np.full((20, 30, 3), 10 * k, np.uint8) for k in range(1, 6)]
    picture, boxes = render.tile_mosaic(tiles, [f"head {k}" for k in range(1, 6)], cols=3)
    assert len(boxes) == 5
    for tile, (x0, y0, x1, y1) in zip(tiles, boxes):
        np.testing.assert_array_equal(picture[y0:y1, x0:x1], tile)
    assert boxes[3][1] > boxes[0][3]  # the fourth tile starts a second row


# --- animation ----------------------------------------------------------------------------------


def frames_of(n: int = 5, shape=(61, 83)) -> list[np.ndarray]:
    """Pictures like the page's: a photo-like gradient with a colour-mapped block per frame."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = np.stack([yy * 3 % 256, xx * 3 % 256, (yy + xx) % 256], -1).astype(np.uint8)
    out = []
    for k in range(n):
        f = base.copy()
        f[10:30, 10 + 8 * k : 30 + 8 * k] = colormaps.get("inferno").lut[40 * k + 50]
        out.append(f)
    return out


def test_gif_holds_every_frame_at_the_rate():
    frames = frames_of()
    data = animation.gif_bytes(frames, fps=4)
    im = Image.open(io.BytesIO(data))
    assert im.n_frames == len(frames) and im.info["loop"] == 0
    for k, f in enumerate(frames):
        im.seek(k)
        assert im.info["duration"] == 250
        got = np.asarray(im.convert("RGB")).astype(int)
        assert np.abs(got - f).mean() < 4  # 256 colours a frame, median cut


def test_mp4_holds_every_frame_at_even_size():
    frames = frames_of(shape=(61, 83))
    data = animation.mp4_bytes(frames, fps=3)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        cap = cv2.VideoCapture(f.name)
        assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(3)
        got = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            got.append(frame[..., ::-1])
    assert len(got) == len(frames)
    for g, want in zip(got, frames):
        assert g.shape == (62, 84, 3)  # padded to even sides
        assert np.abs(g[:61, :83].astype(int) - want).mean() < 12  # lossy, but the same picture


def test_animation_refuses_bad_frames():
    with pytest.raises(ValueError, match="at least one"):
        animation.gif_bytes([], 2)
    with pytest.raises(ValueError, match="equal-size"):
        animation.mp4_bytes([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], 2)
    with pytest.raises(ValueError, match="fps"):
        animation.gif_bytes(frames_of(2), 0)


# --- report arrays ------------------------------------------------------------------------------


def small_model(**kw) -> LoadedModel:
    base = dict(image_size=48, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_dim=96, num_classes=5)
    config = ViTConfig(**{**base, **kw})
    model = VisionTransformer(config)
    model.init_weights(seed=1)
    with torch.no_grad():  # larger weights than the init: attention that is not uniform
        for p in model.parameters():
            p.mul_(8.0)
    return LoadedModel(model.eval(), config, Preprocessing(), None, "ViT", "test", "test", "test model")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_registers": 2},
        {"distill_token": True, "distilled_head": True},
        {"class_token": False, "global_pool": "avg"},
    ],
)
@pytest.mark.parametrize("query", [None, (2, 4)])
def test_report_arrays_follow_their_definitions(kw, query):
    lm = small_model(**kw)
    c = lm.config
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    fwd = run_forward(lm.model, x)
    s = report.Settings(
        query_patch=query, mask_tau=0.5, high_norm_factor=1.2, rollout_fusion="max", rollout_discard=0.3
    )
    arrays = report.analyze_batch(lm, fwd, s)
    P, (gh, gw) = c.num_prefix_tokens, c.grid
    shown = arrays["query_attention"] if query else arrays["readout_attention"]
    for b in range(2):
        # masks: the smallest set of patches holding half the mass, by sorting in numpy
        for layer in range(c.depth):
            for h in range(c.num_heads):
                m = shown[b, layer, h].ravel().astype(np.float64)
                order = np.argsort(-m, kind="stable")
                share = np.cumsum(m[order]) / m.sum()
                k = int(np.searchsorted(share, 0.5 - 1e-7) + 1)
                assert arrays["head_masks"][b, layer, h].sum() == k
                assert arrays["head_masks"][b, layer, h].ravel()[order[: k - 1]].all()
        # the rollout after each layer: the rollout that ends there
        options = report.rollout_options(c, s)
        for e in range(c.depth):
            want = A.attention_rollout(fwd.attentions[b : b + 1], **{**options, "start": 0, "end": e})[0].numpy()
            np.testing.assert_allclose(arrays["rollout_per_layer"][b, e], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(arrays["rollout_per_layer"][b, -1], arrays["rollout"][b], rtol=1e-5, atol=1e-7)
        # token budget: per prefix token, the mean over patch queries of its column; then the high-norm patches
        attn = fwd.attentions[b].double().numpy()  # (L, H, T, T)
        norms = fwd.token_norms[b].double().numpy()  # (L+1, T)
        for layer in range(c.depth):
            patch_norms = norms[layer, P:]
            high = patch_norms > 1.2 * np.median(patch_norms)
            np.testing.assert_array_equal(arrays["high_norm_patches"][b, layer], high)
            rows = attn[layer, :, P:, :]  # (H, N, T)
            want = [rows[:, :, j].mean(-1) for j in range(P)] + [rows[:, :, P:][:, :, high].sum(-1).mean(-1)]
            np.testing.assert_allclose(arrays["token_budget"][b, layer], np.stack(want, -1), atol=1e-6)
        np.testing.assert_allclose(
            arrays["token_budget"][b, ..., :P].sum(-1), arrays["prefix_mass_share"][b], atol=1e-6
        )
    assert arrays["rollout_mask"].shape == (2, gh, gw)
    for key, value in arrays.items():
        assert value.dtype == np.dtype(report.DTYPES[key]), key


def test_settings_check_the_new_fields():
    for bad in (
        dict(mask_tau=0.0),
        dict(mask_tau=1.5),
        dict(class_method="lime"),
        dict(class_maps=-1),
        dict(high_norm_factor=0),
    ):
        with pytest.raises(ValueError):
            report.Settings(**bad)
    s = report.Settings(contrast_classes=[3, 1], class_maps=2, class_method="lrp")
    assert report.Settings.from_dict(s.to_dict()) == s
    assert json.loads(json.dumps(s.to_dict()))["contrast_classes"] == [3, 1]


# --- the page -----------------------------------------------------------------------------------


def open_tab(at: AppTest, label: str) -> AppTest:
    at.session_state["tab"] = label
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def demo_scene_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.selectbox(key="img").set_value(SCENE).run()
    assert not at.exception
    return at


def demo_forward():
    lm = load_checkpoint(DEMO_DIR)
    image = load_image(SCENES_DIR / f"{SCENE.removeprefix('scene: ')}.png")
    x = prepare_image(image, lm.preprocessing).pixels[None]
    fwd = run_forward(lm.model, x)
    mask = Image.fromarray(
        (np.asarray(Image.open(SCENES_DIR / "3_star_mask.png").convert("L")) > 127).astype(np.uint8) * 255
    )
    target = prepare_image(mask.convert("RGB"), lm.preprocessing).view[..., 0] > 127
    return lm, fwd, target


def image_trace(spec: dict) -> np.ndarray:
    src = spec["data"][0]["source"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def plotly_spec(at: AppTest, key: str) -> dict:
    for el in at.get("plotly_chart"):
        if el.proto.id and key in el.proto.id:
            return json.loads(el.proto.spec)
    raise KeyError(key)


@pytest.mark.app
def test_per_head_overlays_show_the_layer_maps_masks_and_ious():
    at = demo_scene_app()
    at.session_state["ro_alpha"] = 1.0  # the colour of a patch is then its value's colour alone
    open_tab(at, "Heads")
    at.slider(key="hd_layer").set_value(4).run()
    lm, fwd, target = demo_forward()
    c = lm.config
    maps = A.attention_maps(fwd.attentions[0, 3], num_prefix=1, grid=c.grid).numpy()  # (H, gh, gw)
    masks = A.mass_threshold_mask(torch.from_numpy(maps), 0.6).numpy()
    ious = A.mask_iou(masks, target, c.patch_size)
    # the numbers under the grid
    table = at.dataframe[0].value
    np.testing.assert_allclose(table["largest attention"], maps.reshape(6, -1).max(1), rtol=1e-5)
    np.testing.assert_array_equal(table["patches in mask"], masks.reshape(6, -1).sum(1))
    np.testing.assert_allclose(table["mask IoU"], ious, rtol=1e-6)
    # the pictures: every patch centre of every tile has the colour of its value (0 to the map's max)
    spec = plotly_spec(at, "hd_overlays")
    picture = image_trace(spec)
    xs, ys = spec["data"][1]["x"], spec["data"][1]["y"]
    lut = colormaps.get(colormaps.DEFAULT_SEQUENTIAL).lut.astype(int)
    gh, gw = c.grid
    for h in range(c.num_heads):
        tile_w = 2 * c.image_size[1]  # 96 px enlarged x2 (MIN_TILE 160)
        x0, y0 = int(round(xs[h] - tile_w / 2)), int(round(ys[h] - tile_w / 2))
        cell = tile_w // gw
        for r in range(gh):
            for col in range(gw):
                got = picture[y0 + r * cell + cell // 2, x0 + col * cell + cell // 2].astype(int)
                want = lut[int(maps[h, r, col] / maps[h].max() * 255 + 0.5)]
                assert np.abs(got - want).max() <= 4, (h, r, col)  # the page sends JPEG (quality 95, 4:4:4)
    assert "IoU" in spec["data"][1]["text"][0]


@pytest.mark.app
def test_rollout_tab_masks_and_motion_frames_match_the_functions():
    at = demo_scene_app()
    at.session_state["ro_alpha"] = 1.0
    open_tab(at, "Rollout")
    at.slider(key="mk_tau").set_value(0.4).run()
    lm, fwd, target = demo_forward()
    c = lm.config
    roll = A.attention_rollout(fwd.attentions, num_prefix=1, grid=c.grid)[0]
    mask = A.mass_threshold_mask(roll, 0.4).numpy()
    iou = float(A.mask_iou(mask, target, c.patch_size))
    captions = [i.caption for el in at.get("image") for i in el.proto.imgs]
    caption = [t for t in captions if t.startswith("Layers 1-6")][0]
    assert f"the {int(mask.sum())} patches holding 40%" in caption
    assert f"IoU with the scene's target {iou:.2f}" in caption
    spec = plotly_spec(at, "mo_anim")
    assert len(spec["frames"]) == c.depth
    assert [s["label"] for s in spec["layout"]["sliders"][0]["steps"]] == [str(i) for i in range(1, c.depth + 1)]
    per_layer = A.rollout_per_layer(fwd.attentions, num_prefix=1, grid=c.grid)[0].numpy()
    lut = colormaps.get(colormaps.DEFAULT_SEQUENTIAL).lut.astype(int)
    band = 34  # the label above each frame
    for e, frame in enumerate(spec["frames"]):
        pic = image_trace(frame)
        cell = (pic.shape[0] - band) // c.grid[0]
        for r, col in [(0, 0), (5, 6), (11, 11), (3, 9)]:
            got = pic[band + r * cell + cell // 2, col * cell + cell // 2].astype(int)
            want = lut[int(per_layer[e, r, col] / per_layer[e].max() * 255 + 0.5)]
            assert np.abs(got - want).max() <= 4, (e, r, col)
    assert any("GIF" in b.proto.label for b in at.get("download_button"))


@pytest.mark.app
def test_download_report_and_files_hold_the_new_views(media):
    at = demo_scene_app()
    open_tab(at, "Heads")
    at.slider(key="hd_layer").set_value(5).run()
    at.selectbox(key="hd_head").set_value(2).run()
    open_tab(at, "Rollout")
    at.slider(key="mk_tau").set_value(0.7).run()
    at.radio(key="mo_what").set_value("head").run()
    rollout_gif = download(at, media, "Animation (GIF)", partial=True)
    open_tab(at, "Download")
    lm, fwd, target = demo_forward()
    c = lm.config
    arrays, meta = report.read_report(download(at, media, "Report (NPZ)", partial=True))
    assert meta["settings"]["mask_tau"] == 0.7
    readout = A.attention_maps(fwd.attentions[0], num_prefix=1, grid=c.grid)
    np.testing.assert_array_equal(arrays["head_masks"], A.mass_threshold_mask(readout, 0.7).numpy())
    roll = A.attention_rollout(fwd.attentions, num_prefix=1, grid=c.grid)[0]
    np.testing.assert_array_equal(arrays["rollout_mask"], A.mass_threshold_mask(roll, 0.7).numpy())
    np.testing.assert_allclose(
        arrays["mask_iou_heads"], A.mask_iou(arrays["head_masks"], target, c.patch_size), rtol=1e-6
    )
    assert arrays["mask_iou_rollout"] == pytest.approx(float(A.mask_iou(arrays["rollout_mask"], target, 8)))
    np.testing.assert_allclose(
        arrays["rollout_per_layer"], A.rollout_per_layer(fwd.attentions, num_prefix=1, grid=c.grid)[0], rtol=1e-5
    )
    budget = A.token_budgets(fwd.attentions, fwd.token_norms, num_prefix=1)[0].numpy()
    np.testing.assert_allclose(arrays["token_budget"], budget, atol=1e-6)
    high = A.token_norm_outliers(fwd.token_norms[0, :-1], num_prefix=1).numpy()
    np.testing.assert_array_equal(arrays["high_norm_patches"], high)
    # the pictures and the animation are those of the tabs
    labels = [b.proto.label for b in at.get("download_button")]
    for want in ("Layer 5, every head over the image", "Rollout with its mass mask"):
        assert any(want in label for label in labels), (want, labels)
    gif = download(at, media, "(GIF)", partial=True)
    assert gif == rollout_gif  # the Download tab writes the Rollout tab's animation (head 2 through the layers)
    im = Image.open(io.BytesIO(gif))
    assert im.n_frames == c.depth
    mp4 = download(at, media, "(MP4)", partial=True)
    assert mp4[4:8] == b"ftyp"
    png = download(at, media, "every head over the image", partial=True)
    assert Image.open(io.BytesIO(png)).size[0] >= 1024


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory) -> Path:
    """One layer, one head, two classes: every slider over layers, heads or classes has one value."""
    from safetensors.torch import save_file

    cfg = ViTConfig(image_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_dim=32, num_classes=2)
    m = VisionTransformer(cfg)
    m.init_weights(seed=0)
    folder = tmp_path_factory.mktemp("one")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


@pytest.mark.app
def test_every_tab_draws_a_one_layer_one_head_model(one_layer_model):
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.radio(key="main_kind").set_value("Path or hub id").run()
    at.text_input(key="main_path").set_value(str(one_layer_model)).run()
    at.button(key="main_load").click().run()
    from viz_app.tabs import TABS

    for label in TABS:
        open_tab(at, label)
    open_tab(at, "Heads")
    assert any(c.value == "Layer: 1" for c in at.caption)


@pytest.mark.app
def test_download_with_a_second_model_holds_the_compare_views(one_layer_model, media):
    at = demo_scene_app()
    open_tab(at, "Compare")
    at.radio(key="cmp_kind").set_value("Path or hub id").run()
    at.text_input(key="cmp_path").set_value(str(one_layer_model)).run()
    at.button(key="cmp_load").click().run()
    open_tab(at, "Download")
    arrays, meta = report.read_report(download(at, media, "Report (NPZ)", partial=True))
    other = load_checkpoint(one_layer_model)
    assert arrays["compare_readout_attention_b"].shape == (1, 1, *other.config.grid)
    assert arrays["compare_mean_attention_distance_b"].shape == (1, 1)
    assert list(arrays["compare_layers"]) == [6, 1]  # the last layer of each
    assert set(meta["keys"]) >= {"compare_rollout_b", "compare_grad_class_b"}
    for label in ("Compare: rollouts", "Compare: per-head maps", "Compare: attention distance"):
        png = download(at, media, label, partial=True)
        assert Image.open(io.BytesIO(png)).size[0] >= 1024


@pytest.mark.app
def test_rollout_tab_shows_transformer_attribution(media):
    """The class-specific map with method lrp is transformer_attribution's map: its download's
    report array, and the picture's patch colours."""
    at = demo_scene_app()
    at.session_state["ro_alpha"] = 1.0
    open_tab(at, "Rollout")
    at.selectbox(key="ro_method").set_value("lrp").run()
    at.selectbox(key="ro_class").set_value(2).run()
    assert not at.exception
    lm, fwd, target = demo_forward()
    x = prepare_image(load_image(SCENES_DIR / "3_star.png"), lm.preprocessing).pixels[None]
    want = A.transformer_attribution(lm.model, x, torch.tensor([2]))[0].numpy()
    titles = [m.value for m in at.markdown]
    assert any("Transformer Attribution" in t for t in titles)
    captions = [i.caption for el in at.get("image") for i in el.proto.imgs]
    assert any(t.startswith(f"For '{lm.labels[2]}'") for t in captions)
    open_tab(at, "Download")
    arrays, meta = report.read_report(download(at, media, "Report (NPZ)", partial=True))
    assert meta["settings"]["class_method"] == "lrp" and "grad_rollout" not in arrays
    np.testing.assert_allclose(arrays["transformer_attribution"], want, rtol=1e-4, atol=1e-4 * want.max())
    assert int(arrays["grad_class"]) == 2
    assert any(b.proto.label == "Transformer Attribution overlay" for b in at.get("download_button"))


def test_cli_class_maps_contrast_and_lrp_equal_the_functions(tmp_path):
    from viz_app.cli import main as cli_main

    images = [SCENES_DIR / "3_star.png", SCENES_DIR / "0_circle.png"]
    out = tmp_path / "out"
    argv = ["analyze", "--model", "demo", "--out", str(out), "--batch-size", "2"]
    argv += ["--grad-rollout", "--class-method", "lrp", "--class-maps", "2", "--contrast", "1", "4"]
    argv += ["--mask-tau", "0.5", "--budget-queries", "readout", *map(str, images)]
    assert cli_main(argv) == 0
    lm = load_checkpoint(DEMO_DIR)
    c = lm.config
    for path in images:
        arrays, meta = report.read_report((out / f"{path.stem}.npz").read_bytes())
        assert meta["settings"]["class_method"] == "lrp" and meta["settings"]["mask_tau"] == 0.5
        x = prepare_image(load_image(path), lm.preprocessing).pixels[None]
        fwd = run_forward(lm.model, x)
        top = fwd.logits[0].softmax(-1).topk(2).indices
        np.testing.assert_array_equal(arrays["class_map_classes"], top.numpy())
        for j, cls in enumerate(top.tolist()):
            want = A.transformer_attribution(lm.model, x, torch.tensor([cls]))[0].numpy()
            np.testing.assert_allclose(arrays["class_maps"][j], want, rtol=1e-3, atol=2e-3 * want.max())
        a, b = (A.transformer_attribution(lm.model, x, torch.tensor([k]))[0].numpy() for k in (1, 4))
        np.testing.assert_allclose(arrays["contrastive_map"], a / a.sum() - b / b.sum(), atol=2e-4)
        assert list(arrays["contrastive_classes"]) == [1, 4]
        top1 = int(fwd.logits[0].argmax())
        want = A.transformer_attribution(lm.model, x, torch.tensor([top1]))[0].numpy()
        np.testing.assert_allclose(arrays["transformer_attribution"], want, rtol=1e-3, atol=2e-3 * want.max())
        assert "grad_rollout" not in arrays
        budget = A.token_budgets(fwd.attentions, fwd.token_norms, num_prefix=1, queries="readout")[0].numpy()
        np.testing.assert_allclose(arrays["token_budget"], budget, atol=1e-6)
        readout = A.attention_maps(fwd.attentions[0], num_prefix=1, grid=c.grid)
        np.testing.assert_array_equal(arrays["head_masks"], A.mass_threshold_mask(readout, 0.5).numpy())


@pytest.mark.app
@pytest.mark.parametrize("tab", ["Overview", "Download", "Classes"])
def test_a_link_with_numbers_out_of_range_opens_every_tab(tab):
    """NaN and out-of-range numbers in a copied link take the default or are clamped wherever
    they are read, also on tabs that do not draw their widget."""
    at = AppTest.from_file(APP, default_timeout=300)
    for key, value in dict(mk_tau="nan", ro_discard="nan", ro_alpha="nan", mo_fps="0", tk_factor="inf").items():
        at.query_params[key] = value
    at.query_params["tab"] = tab
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


LAYOUTS_17 = {
    "registers, non-square": dict(image_size=(48, 80), num_registers=4, num_classes=7),
    "distilled": dict(distill_token=True, distilled_head=True, num_classes=7),
    "no class token, average pool": dict(class_token=False, global_pool="avg", num_classes=7),
    "no classifier": dict(num_classes=0),
}


@pytest.mark.app
@pytest.mark.parametrize("layout", list(LAYOUTS_17))
def test_every_new_view_draws_each_model_layout(layout, tmp_path, media):
    """Heads (overlays, masks), Rollout (LRP, motion), Classes, Tokens and Download on models with
    registers and a non-square grid, a distillation token, no class token, no classifier."""
    from safetensors.torch import save_file

    base = dict(image_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=4, mlp_dim=64)
    cfg = ViTConfig(**{**base, **LAYOUTS_17[layout]})
    m = VisionTransformer(cfg)
    m.init_weights(seed=2)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.radio(key="main_kind").set_value("Path or hub id").run()
    at.text_input(key="main_path").set_value(str(tmp_path)).run()
    at.button(key="main_load").click().run()
    open_tab(at, "Heads")
    assert len(image_trace(plotly_spec(at, "hd_overlays")).shape) == 3
    open_tab(at, "Rollout")
    if cfg.num_classes:
        at.selectbox(key="ro_method").set_value("lrp").run()
    at.radio(key="mo_what").set_value("head").run()
    assert len(plotly_spec(at, "mo_anim")["frames"]) == cfg.depth
    for tab in ("Classes", "Tokens", "Download"):
        open_tab(at, tab)
    arrays, meta = report.read_report(download(at, media, "Report (NPZ)", partial=True))
    P, N = cfg.num_prefix_tokens, cfg.num_patches
    assert arrays["token_budget"].shape == (cfg.depth, cfg.num_heads, P + 1)
    assert arrays["head_masks"].shape == (cfg.depth, cfg.num_heads, *cfg.grid)
    assert arrays["high_norm_patches"].shape == (cfg.depth, N)
    assert ("transformer_attribution" in arrays) == bool(cfg.num_classes)
    assert ("class_maps" in arrays) == bool(cfg.num_classes)
