"""The Compare tab beyond position embeddings: both models' rollouts, class-specific maps, per-head
maps and mean attention distances, with the Rollout and Heads tabs' settings, at one size.

The mappings (layer at the same relative depth, query patch at the same place in the image) are
checked against definitions written here (nearest relative depth by search; the patch whose
rectangle in the original image holds the point); every value the page shows against the analysis
functions run on each model here, for models of different depths, head counts and grids; the
Download tab's entry points (compared, downloads, report_arrays) through a page run."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest
from test_app import decode

from model import Preprocessing, VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from model.resources import EXAMPLES_DIR
from viz_app import analysis as A
from viz_app import colormaps, results
from viz_app.sidebar import gallery
from viz_app.tabs import compare
from viz_app.tabs import distance as distance_tab

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")

# The first model is the demo (6 layers x 6 heads, 12x12 grid, 96 px, a conv stem, 8 labelled classes).
# Second models: shallower, 2 heads, a non-square 4x6 grid, two registers, 5 unlabelled classes ...
SHALLOW = ViTConfig(
    image_size=(64, 96), patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_dim=64, num_classes=5, num_registers=2
)
# ... and deeper, 4 heads, 8x8 grid, no class token (patches averaged), no classifier.
DEEP = ViTConfig(
    image_size=128,
    patch_size=16,
    embed_dim=32,
    depth=8,
    num_heads=4,
    mlp_dim=64,
    num_classes=0,
    class_token=False,
    global_pool="avg",
)


# the Download tab's files of the Compare tab
COMPARE_FILES = {
    "compare_rollout.png",
    "compare_grad_rollout.png",
    "compare_heads.png",
    "compare_head.png",
    "compare_distance.png",
    "compare_position_similarity.png",
}


def save_model(cfg: ViTConfig, folder: Path, seed: int, breakage=None) -> Path:
    m = VisionTransformer(cfg)
    m.init_weights(seed=seed)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if breakage is not None:
        breakage(sd)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    return folder


@pytest.fixture(scope="module")
def shallow(tmp_path_factory) -> Path:
    return save_model(SHALLOW, tmp_path_factory.mktemp("shallow"), seed=1)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    return save_model(DEEP, tmp_path_factory.mktemp("deep"), seed=2)


# ---- definitions written here -------------------------------------------------------------------


def nearest_relative_depth(layer: int, depth: int, other_depth: int) -> int:
    """The layer of the other model whose relative depth l / other_depth is nearest to
    layer / depth; a tie goes to the deeper layer."""
    best = None
    for cand in range(1, other_depth + 1):
        gap = abs(cand / other_depth - layer / depth)
        if best is None or gap <= best[0] + 1e-12:
            best = (gap, cand)
    return best[1]


def patch_rect(prepared, grid, patch: tuple[int, int]) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1): a patch's rectangle in the original image (the resize and crop undone)."""
    sx = prepared.original_size[0] / prepared.resized_size[0]
    sy = prepared.original_size[1] / prepared.resized_size[1]
    H, W = prepared.view.shape[:2]
    (gh, gw), (r, c) = grid, patch
    return (
        (c * W / gw + prepared.crop_box[0]) * sx,
        ((c + 1) * W / gw + prepared.crop_box[0]) * sx,
        (r * H / gh + prepared.crop_box[1]) * sy,
        ((r + 1) * H / gh + prepared.crop_box[1]) * sy,
    )


def rect_distance(point: tuple[float, float], rect) -> float:
    x0, x1, y0, y1 = rect
    return math.hypot(max(x0 - point[0], 0, point[0] - x1), max(y0 - point[1], 0, point[1] - y1))


def assert_patch_under(got: tuple[tuple[int, int], bool], point: tuple[float, float], prepared, grid) -> None:
    """got = ((row, col), inside) is the patch whose rectangle holds the point (inside) or, when
    none does, the nearest one (not inside); a point within 1e-6 px of a border may go either way."""
    eps = 1e-6
    gh, gw = grid
    distances = {(r, c): rect_distance(point, patch_rect(prepared, grid, (r, c))) for r in range(gh) for c in range(gw)}
    assert distances[got[0]] <= min(distances.values()) + eps, (got, point)
    x0, _, y0, _ = patch_rect(prepared, grid, (0, 0))
    _, x1, _, y1 = patch_rect(prepared, grid, (gh - 1, gw - 1))
    if x0 + eps < point[0] < x1 - eps and y0 + eps < point[1] < y1 - eps:
        assert got[1], (got, point)
    if min(distances.values()) > eps:
        assert not got[1], (got, point)


def centre_in_original(patch: tuple[int, int], prepared, grid) -> tuple[float, float]:
    H, W = prepared.view.shape[:2]
    gh, gw = grid
    x = ((patch[1] + 0.5) * W / gw + prepared.crop_box[0]) * prepared.original_size[0] / prepared.resized_size[0]
    y = ((patch[0] + 0.5) * H / gh + prepared.crop_box[1]) * prepared.original_size[1] / prepared.resized_size[1]
    return x, y


def head_map(attn: np.ndarray, layer: int, head: int, query: int | None, P: int, grid, drop: bool) -> np.ndarray:
    """One head's map, plain numpy: the query's row (the class token's, or the mean patch row
    without one) over the patches, renormalized when prefix tokens are dropped."""
    a = attn[layer - 1, head - 1]
    if query is not None:
        row = a[query]
    elif P:
        row = a[0]
    else:
        row = a[P:].mean(axis=0)
    patch = row[P:].astype(np.float64)
    if drop:
        patch = patch / patch.sum()
    return patch.reshape(grid)


# ---- the mappings --------------------------------------------------------------------------------


def test_same_depth_is_the_nearest_relative_depth():
    for depth in range(1, 14):
        for other in range(1, 14):
            for layer in range(1, depth + 1):
                assert compare.same_depth(layer, depth, other) == nearest_relative_depth(layer, depth, other), (
                    layer,
                    depth,
                    other,
                )
            assert compare.same_depth(depth, depth, other) == other  # the last layer to the last
    assert [compare.same_depth(k, 12, 12) for k in range(1, 13)] == list(range(1, 13))
    assert [compare.same_depth(k, 6, 3) for k in range(1, 7)] == [1, 1, 2, 2, 3, 3]  # 1.5 -> 2: halves up
    assert [compare.same_depth(k, 3, 8) for k in range(1, 4)] == [3, 5, 8]


PREPROCESSINGS = {
    "square crop": (Preprocessing(input_size=(96, 96), crop_pct=1.0), (12, 12)),
    "wide crop": (Preprocessing(input_size=(64, 96), crop_pct=0.875), (4, 6)),
    "squash": (Preprocessing(input_size=(224, 224), mode="squash"), (14, 14)),
    "tight crop": (Preprocessing(input_size=(160, 160), crop_pct=0.5), (5, 5)),
}


@pytest.mark.parametrize("first", list(PREPROCESSINGS))
@pytest.mark.parametrize("second", list(PREPROCESSINGS))
def test_same_position_is_the_patch_under_the_same_point(first, second):
    image = load_image(EXAMPLES_DIR / "chelsea.jpg")  # 451 x 300
    (pa, grid_a), (pb, grid_b) = PREPROCESSINGS[first], PREPROCESSINGS[second]
    a, b = prepare_image(image, pa), prepare_image(image, pb)
    seen_outside = False
    for r in range(grid_a[0]):
        for c in range(grid_a[1]):
            got = compare.same_position((r, c), a, grid_a, b, grid_b)
            assert_patch_under(got, centre_in_original((r, c), a, grid_a), b, grid_b)
            seen_outside |= not got[1]
            if first == second:
                assert got == ((r, c), True)
    if first == "squash" and second == "tight crop":
        assert seen_outside  # the tight crop keeps the centre only: the edges map to its nearest patch


def test_same_position_on_a_non_square_original():
    image = Image.fromarray(np.zeros((300, 700, 3), np.uint8))
    a = prepare_image(image, Preprocessing(input_size=(64, 96), crop_pct=1.0))
    b = prepare_image(image, Preprocessing(input_size=(96, 64), crop_pct=0.9))
    for r in range(4):
        for c in range(6):
            got = compare.same_position((r, c), a, (4, 6), b, (6, 4))
            assert_patch_under(got, centre_in_original((r, c), a, (4, 6)), b, (6, 4))


# ---- one size, layouts, colour scales --------------------------------------------------------------


def fake_ctx(h: int, w: int):
    return SimpleNamespace(result=SimpleNamespace(prepared=SimpleNamespace(view=np.zeros((h, w, 3), np.uint8))))


@pytest.mark.parametrize(
    "a, b", [((96, 96), (224, 224)), ((64, 96), (96, 96)), ((384, 384), (32, 64)), ((48, 48), (48, 48))]
)
def test_pictures_of_both_models_have_one_size(a, b):
    H, W = compare.display_size(fake_ctx(*a), fake_ctx(*b))
    assert H == max(224, a[0], b[0])
    assert W == max(round(a[1] * H / a[0]), round(b[1] * H / b[0]))
    rng = np.random.default_rng(0)
    for h, w in (a, b):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        before = img.copy()
        out = compare.fit(img, (H, W))
        np.testing.assert_array_equal(img, before)  # the input is not modified
        assert out.shape == (H, W, 3)
        w2 = round(w * H / h)
        x0 = (W - w2) // 2
        # nearest neighbour: the centre of each enlarged pixel is that input pixel
        for i in range(0, h, max(1, h // 7)):
            for j in range(0, w, max(1, w // 7)):
                y, x = int((i + 0.5) * H / h), x0 + int((j + 0.5) * w2 / w)
                np.testing.assert_array_equal(out[y, x], img[i, j])
        assert (out[:, :x0] == 255).all() and (out[:, x0 + w2 :] == 255).all()  # centred on white
        # the enlarged picture holds the input's pixels and no others
        assert {tuple(p) for p in out[:, x0 : x0 + w2].reshape(-1, 3)} <= {tuple(p) for p in img.reshape(-1, 3)}


def test_head_layout_and_tiles():
    assert compare.head_layout(6, 2) == (1, 6)
    assert compare.head_layout(12, 16) == (1, 16)
    assert compare.head_layout(24, 3) == (2, 16)
    maps = np.arange(3 * 2 * 5, dtype=float).reshape(3, 2, 5)
    tiles = compare.laid_out(maps, 2, 2)
    assert tiles.shape == (2, 2, 2, 5)
    np.testing.assert_array_equal(tiles[0, 0], maps[0])
    np.testing.assert_array_equal(tiles[0, 1], maps[1])
    np.testing.assert_array_equal(tiles[1, 0], maps[2])
    assert np.isnan(tiles[1, 1]).all()  # no fourth head: blank


def test_colour_scales_and_nan():
    a = np.array([[0.1, np.nan], [0.3, 0.2]])
    b = np.array([[0.5, 0.25], [np.inf, 0.0]])
    shared = compare.Views(a=None, b=None, scale="shared", convention="as_is", method="gradient", same_place=True)
    per_map = compare.Views(a=None, b=None, scale="per map", convention="as_is", method="gradient", same_place=True)
    assert shared.tops(a, b) == (0.5, 0.5)
    assert per_map.tops(a, b) == (0.3, 0.5)  # the largest finite value of each map
    nothing = np.full((2, 2), np.nan)
    assert all(np.isfinite(t) and t > 0 for t in shared.tops(nothing, nothing))


# ---- the page --------------------------------------------------------------------------------------


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


@pytest.fixture
def captured(monkeypatch):
    """What the Download tab gets (compared, downloads, report_arrays), recorded on each run of the
    Compare tab (after it drew) and of the Distance tab (a tab without the second model's picker)."""
    seen: dict = {}
    for module in (compare, distance_tab):
        original = module.draw

        def draw(ctx, original=original):
            original(ctx)
            got = compare.compared(ctx)
            seen.clear()
            seen["got"] = got
            if got is not None:
                seen["files"] = compare.downloads(ctx, *got)
                seen["arrays"] = compare.report_arrays(ctx, *got)

        monkeypatch.setattr(module, "draw", draw)
    return seen


def start_compare(second: Path, **settings) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    for k, v in settings.items():
        at.session_state[k] = v
    at.session_state["tab"] = "Compare"
    ok(at.run())
    at.radio(key="cmp_kind").set_value("Path or hub id").run()
    at.text_input(key="cmp_path").set_value(str(second)).run()
    at.button(key="cmp_load").click().run()
    return ok(at)


def spec(at: AppTest, chart: str) -> dict:
    found = [json.loads(el.proto.spec) for el in at.get("plotly_chart") if f"-{chart}" in el.proto.id]
    assert len(found) == 1, [el.proto.id for el in at.get("plotly_chart")]
    return found[0]


def pictures(at: AppTest, media: dict[str, bytes]) -> dict[str, np.ndarray]:
    """caption -> the picture (RGB) of every st.image on the page."""
    out = {}
    for el in at.get("image"):
        for img in el.proto.imgs:
            file_id = img.url.rsplit("/", 1)[-1].split(".")[0]
            out[img.caption] = np.asarray(Image.open(io.BytesIO(media[file_id])).convert("RGB"))
    return out


def picture_of(shown: dict[str, np.ndarray], start: str) -> np.ndarray:
    found = [v for k, v in shown.items() if k.startswith(start)]
    assert len(found) == 1, (start, list(shown))
    return found[0]


class Model:
    """One model run here on the page's image: its attention and what the views are made of."""

    def __init__(self, source: str | Path, image):
        self.lm = load_checkpoint(source)
        self.c = self.lm.config
        self.prepared = prepare_image(image, self.lm.preprocessing)
        with torch.no_grad():
            out = self.lm.model(self.prepared.pixels[None])
        self.attn_t = torch.stack(out.attentions, 1)  # (1, L, H, T, T)
        self.attn = self.attn_t[0].numpy()
        self.logits = None if out.logits is None else out.logits[0].numpy()

    @property
    def P(self) -> int:
        return self.c.num_prefix_tokens

    def tiles_of(self, fig: dict) -> np.ndarray:
        """(H, gh, gw) the tiles of a per-head grid (rows of `columns` tiles, a 1-value gap)."""
        big = decode(fig["data"][0]["z"])
        gh, gw = self.c.grid
        columns = len(decode(fig["layout"]["xaxis"]["tickvals"]))
        out = []
        for k in range(self.c.num_heads):
            r, col = divmod(k, columns)
            out.append(big[r * (gh + 1) : r * (gh + 1) + gh, col * (gw + 1) : col * (gw + 1) + gw])
        return np.stack(out)

    def rollout(self, first: int, last: int, fusion: str, discard: float, readout: str) -> np.ndarray:
        return A.attention_rollout(
            self.attn_t,
            num_prefix=self.P,
            grid=self.c.grid,
            readout_tokens=self.c.readout_tokens,
            readout=readout,
            head_fusion=fusion,
            discard_ratio=discard,
            start=first - 1,
            end=last - 1,
        )[0].numpy()

    def mad(self, convention: str) -> np.ndarray:
        return A.mean_attention_distance(
            self.attn_t[0], num_prefix=self.P, grid=self.c.grid, patch_size=self.c.patch_size, convention=convention
        ).numpy()

    def assert_picture_shows(self, picture: np.ndarray, heat: np.ndarray, vmax: float, size, cmap: str) -> None:
        """With opacity 1 and nearest upsampling, the picture's pixel at each patch centre is the
        colour map's colour of value / vmax (the overlay sits left of its colour bar, centred in
        the common width)."""
        H, W = size
        h, w = self.prepared.view.shape[:2]
        w2 = round(w * H / h)
        x0 = (W - w2) // 2
        gh, gw = self.c.grid
        lut = colormaps.get(cmap).lut
        for r in range(gh):
            for col in range(gw):
                y, x = int((r + 0.5) * H / gh), x0 + int((col + 0.5) * w2 / gw)
                u = min(max(float(heat[r, col]) / vmax, 0.0), 1.0)
                want = lut[int(u * 255 + 0.5)]
                assert np.abs(picture[y, x].astype(int) - want.astype(int)).max() <= 1, (r, col)


def page_image(at: AppTest):
    return load_image(gallery()[at.selectbox(key="img").value])


def test_views_equal_the_functions_for_a_shallower_model_on_another_grid(shallow, media, captured):
    settings = dict(
        hd_query="patch",
        hd_row=3,
        hd_col=9,
        ro_fusion="max",
        ro_discard=0.3,
        ro_layers=(2, 5),
        ro_alpha=1.0,
        ro_up="nearest",
        ro_cmap="viridis",
        cmp_layer=4,
        cmp_head=5,
        cmp_head_b=2,
    )
    at = start_compare(shallow, **settings)
    image = page_image(at)
    a, b = Model("demo", image), Model(shallow, image)
    layer_a, layer_b = 4, nearest_relative_depth(4, 6, 3)
    assert layer_b == 2
    patch_b, inside = compare.same_position((3, 9), a.prepared, a.c.grid, b.prepared, b.c.grid)
    assert_patch_under((patch_b, inside), centre_in_original((3, 9), a.prepared, a.c.grid), b.prepared, b.c.grid)
    q_a = a.P + 3 * a.c.grid[1] + 9
    q_b = b.P + patch_b[0] * b.c.grid[1] + patch_b[1]
    # per-head grids: each map from 0 to its own maximum (the default scale), every head of the layer
    for m, layer, q, chart in ((a, layer_a, q_a, "cmp_heads_a"), (b, layer_b, q_b, "cmp_heads_b")):
        fig = spec(at, chart)
        want = np.stack([head_map(m.attn, layer, h, q, m.P, m.c.grid, False) for h in range(1, m.c.num_heads + 1)])
        want = want / want.max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(m.tiles_of(fig), want, atol=1e-5)
        assert f"layer {layer} of {m.c.depth}" in fig["layout"]["title"]["text"]
    # both grids laid out alike: 6 columns (the demo's 6 heads), the second one's blank after head 2
    big_b = decode(spec(at, "cmp_heads_b")["data"][0]["z"])
    assert np.isnan(big_b[:, 2 * (b.c.grid[1] + 1) :]).all()
    # the heads shown large, raw attention, the query patch outlined
    for m, layer, head, q, chart in ((a, 4, 5, q_a, "cmp_big_a"), (b, layer_b, 2, q_b, "cmp_big_b")):
        fig = spec(at, chart)
        want = head_map(m.attn, layer, head, q, m.P, m.c.grid, False)
        np.testing.assert_allclose(decode(fig["data"][0]["z"]), want, atol=1e-6)
        assert fig["data"][0]["zmax"] == pytest.approx(want.max(), rel=1e-5)
    shape = spec(at, "cmp_big_b")["layout"]["shapes"][0]
    assert (shape["x0"] + 0.5, shape["y0"] + 0.5) == (patch_b[1], patch_b[0])
    # mean attention distance: each model's own values, one y range for both
    ya = spec(at, "cmp_mad_a")["layout"]["yaxis"]["range"]
    yb = spec(at, "cmp_mad_b")["layout"]["yaxis"]["range"]
    assert ya == yb
    for m, chart in ((a, "cmp_mad_a"), (b, "cmp_mad_b")):
        fig = spec(at, chart)
        mad = m.mad("as_is")
        assert len(fig["data"]) == m.c.num_heads
        for h, trace in enumerate(fig["data"]):
            np.testing.assert_allclose(decode(trace["y"]), mad[:, h], rtol=1e-4)
    assert ya[1] == pytest.approx(max(a.mad("as_is").max(), b.mad("as_is").max()) * 1.05, rel=1e-4)
    # rollouts with the Rollout tab's settings, the second model's layers at the same relative depth
    shown = pictures(at, media)
    size = compare.display_size(*(SimpleNamespace(result=SimpleNamespace(prepared=m.prepared)) for m in (a, b)))
    assert size == (224, 336)  # the demo's 96x96 and the 64x96 input, both 224 px high
    ra = a.rollout(2, 5, "max", 0.3, "auto")
    first_b, last_b = nearest_relative_depth(2, 6, 3), nearest_relative_depth(5, 6, 3)
    rb = b.rollout(first_b, last_b, "max", 0.3, "auto")
    pa, pb = picture_of(shown, a.lm.name + ": layers 2-5"), picture_of(shown, f"{b.lm.name}: layers {first_b}-{last_b}")
    assert pa.shape == pb.shape  # one display size
    a.assert_picture_shows(pa, ra, ra.max(), size, "viridis")
    b.assert_picture_shows(pb, rb, rb.max(), size, "viridis")
    # the class-specific maps: the demo's top-1; the second model has other classes: its own top-1
    cls_a, cls_b = int(np.argmax(a.logits)), int(np.argmax(b.logits))
    ga = results.gradient_map(a.lm, a.prepared, cls_a)
    gb = results.gradient_map(b.lm, b.prepared, cls_b)
    qa, qb = picture_of(shown, f"{a.lm.name}: for"), picture_of(shown, f"{b.lm.name}: for")
    assert qa.shape == qb.shape == pa.shape
    a.assert_picture_shows(qa, ga, ga.max(), size, "viridis")
    b.assert_picture_shows(qb, gb, gb.max(), size, "viridis")
    # what the Download tab gets: the same second model, decodable PNGs, the second model's arrays
    other, other_result = captured["got"]
    assert other.config == b.c
    files = captured["files"]
    assert set(files) == COMPARE_FILES
    for name, (label, data) in files.items():
        png = np.asarray(Image.open(io.BytesIO(data)))
        assert png.ndim == 3 and max(png.shape[:2]) >= 1024, name
        assert label.startswith("Compare: ")
    arrays = captured["arrays"]
    gh, gw = b.c.grid
    want_shapes = {
        "compare_layers": (2,),
        "compare_heads": (2,),
        "compare_rollout_b": (gh, gw),
        "compare_rollout_layers_b": (2,),
        "compare_readout_attention_b": (b.c.depth, b.c.num_heads, gh, gw),
        "compare_query_patch_b": (2,),
        "compare_query_attention_b": (b.c.depth, b.c.num_heads, gh, gw),
        "compare_mean_attention_distance_b": (b.c.depth, b.c.num_heads),
        "compare_mean_attention_distance_renormalized_b": (b.c.depth, b.c.num_heads),
        "compare_prefix_mass_share_b": (b.c.depth, b.c.num_heads),
        "compare_grad_rollout_b": (gh, gw),
        "compare_grad_class_b": (),
    }
    assert {k: v.shape for k, v in arrays.items()} == want_shapes
    assert arrays["compare_layers"].tolist() == [4, layer_b] and arrays["compare_heads"].tolist() == [5, 2]
    assert arrays["compare_rollout_layers_b"].tolist() == [first_b, last_b]
    assert arrays["compare_query_patch_b"].tolist() == list(patch_b)
    np.testing.assert_allclose(arrays["compare_rollout_b"], rb, atol=1e-6)
    np.testing.assert_allclose(arrays["compare_grad_rollout_b"], gb, atol=1e-6)
    assert int(arrays["compare_grad_class_b"]) == cls_b
    np.testing.assert_allclose(arrays["compare_mean_attention_distance_b"], b.mad("as_is"), rtol=1e-4)
    np.testing.assert_allclose(
        arrays["compare_mean_attention_distance_renormalized_b"], b.mad("renormalized"), rtol=1e-4
    )
    for layer in range(1, b.c.depth + 1):
        for h in range(1, b.c.num_heads + 1):
            np.testing.assert_allclose(
                arrays["compare_query_attention_b"][layer - 1, h - 1],
                head_map(b.attn, layer, h, q_b, b.P, b.c.grid, False),
                atol=1e-6,
            )
            np.testing.assert_allclose(
                arrays["compare_readout_attention_b"][layer - 1, h - 1],
                head_map(b.attn, layer, h, None, b.P, b.c.grid, False),
                atol=1e-6,
            )
    # the captions name the mappings
    captions = " ".join(c.value for c in at.caption)
    assert "same relative depth" in captions and "same place in the image" in captions
    assert inside


def test_views_equal_the_functions_for_a_deeper_model_without_class_token(deep, media, captured):
    settings = dict(
        hd_drop=True,
        ro_layers=(2, 5),
        ro_alpha=1.0,
        cmp_layer=2,
        cmp_head=6,
        cmp_head_b=4,
        cmp_scale="shared",
        cmp_conv="renormalized",
    )
    at = start_compare(deep, **settings)
    image = page_image(at)
    a, b = Model("demo", image), Model(deep, image)
    layer_b = nearest_relative_depth(2, 6, 8)
    assert layer_b == 3
    # shared scale: raw attention (prefix dropped: renormalized over the patches), one range for both
    maps_a = np.stack([head_map(a.attn, 2, h, None, a.P, a.c.grid, True) for h in range(1, 7)])
    maps_b = np.stack([head_map(b.attn, layer_b, h, None, b.P, b.c.grid, True) for h in range(1, 5)])
    top = max(maps_a.max(), maps_b.max())
    for m, maps, chart in ((a, maps_a, "cmp_heads_a"), (b, maps_b, "cmp_heads_b")):
        fig = spec(at, chart)
        np.testing.assert_allclose(m.tiles_of(fig), maps, atol=1e-6)
        assert fig["data"][0]["zmax"] == pytest.approx(top, rel=1e-5)
    for chart, want in (("cmp_big_a", maps_a[5]), ("cmp_big_b", maps_b[3])):
        fig = spec(at, chart)
        np.testing.assert_allclose(decode(fig["data"][0]["z"]), want, atol=1e-6)
        assert fig["data"][0]["zmax"] == pytest.approx(top, rel=1e-5)
    # the renormalized convention for both, one y range
    for m, chart in ((a, "cmp_mad_a"), (b, "cmp_mad_b")):
        fig = spec(at, chart)
        mad = m.mad("renormalized")
        for h, trace in enumerate(fig["data"]):
            np.testing.assert_allclose(decode(trace["y"]), mad[:, h], rtol=1e-4)
    assert spec(at, "cmp_mad_a")["layout"]["yaxis"]["range"] == spec(at, "cmp_mad_b")["layout"]["yaxis"]["range"]
    # rollouts on one shared scale; the second model reads out the mean of its patches
    shown = pictures(at, media)
    fa, la = 2, 5
    fb, lb = nearest_relative_depth(2, 6, 8), nearest_relative_depth(5, 6, 8)
    ra, rb = a.rollout(fa, la, "mean", 0.0, "auto"), b.rollout(fb, lb, "mean", 0.0, "auto")
    size = (224, 224)
    pa, pb = picture_of(shown, f"{a.lm.name}: layers 2-5"), picture_of(shown, f"{b.lm.name}: layers {fb}-{lb}")
    assert pa.shape == pb.shape
    top = max(ra.max(), rb.max())
    a.assert_picture_shows(pa, ra, top, size, colormaps.DEFAULT_SEQUENTIAL)
    b.assert_picture_shows(pb, rb, top, size, colormaps.DEFAULT_SEQUENTIAL)
    # no classifier on the second model: its class-specific map is missing, and said so
    assert any("has no classifier" in i.value for i in at.info)
    assert picture_of(shown, f"{a.lm.name}: for").shape == pa.shape
    arrays = captured["arrays"]
    assert "compare_grad_rollout_b" not in arrays and "compare_query_patch_b" not in arrays
    assert arrays["compare_readout_attention_b"].shape == (8, 4, 8, 8)
    np.testing.assert_allclose(arrays["compare_readout_attention_b"][layer_b - 1], maps_b, atol=1e-6)
    assert set(captured["files"]) == COMPARE_FILES
    # a click on the second grid's third tile shows head 3 large
    from test_probes_app import click, tile_point

    click(at, "cmp_heads_b", tile_point(2))
    assert at.session_state["cmp_head_b"] == 3
    np.testing.assert_allclose(decode(spec(at, "cmp_big_b")["data"][0]["z"]), maps_b[2], atol=1e-6)
    click(at, "cmp_heads_b", tile_point(5))  # a blank tile (the second model has 4 heads): nothing changes
    assert at.session_state["cmp_head_b"] == 3


def test_other_tabs_get_the_second_model_without_a_picker(shallow, captured):
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params["compare"] = str(shallow)
    at.session_state["tab"] = "Distance"
    ok(at.run())
    other, _ = captured["got"]
    assert other.config == SHALLOW
    assert "compare_rollout_b" in captured["arrays"]
    # a hub id that is not in the local cache: never downloaded by a link, so no second model
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params["compare"] = "someone/not-cached-vit"
    at.session_state["tab"] = "Distance"
    ok(at.run())
    assert captured["got"] is None


def test_a_broken_second_model_draws_no_value_and_warns(tmp_path, captured):
    def breakage(sd):
        sd["blocks.1.attn.qkv.weight"].fill_(float("inf"))

    broken = save_model(SHALLOW, tmp_path, seed=4, breakage=breakage)
    at = start_compare(broken, cmp_scale="shared")
    assert any("NaN or infinite" in w.value for w in at.warning)
    for chart in ("cmp_heads_b", "cmp_big_b", "cmp_mad_b", "cmp_heads_a"):
        fig = spec(at, chart)
        for trace in fig["data"]:
            for key in ("zmin", "zmax"):
                if key in trace:
                    assert np.isfinite(trace[key]), (chart, key)
        assert all(np.isfinite(v) for v in fig["layout"].get("yaxis", {}).get("range", [0, 1]))
    for name, (_, data) in captured["files"].items():
        assert np.asarray(Image.open(io.BytesIO(data))).ndim == 3, name
    assert np.isnan(captured["arrays"]["compare_readout_attention_b"][1:]).any()


def test_a_one_layer_one_head_second_model(tmp_path, captured):
    tiny = ViTConfig(image_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_dim=32, num_classes=2)
    at = start_compare(save_model(tiny, tmp_path, seed=6), cmp_layer=3)
    assert spec(at, "cmp_heads_b")["layout"]["title"]["text"].endswith("layer 1 of 1, 1 head")
    assert captured["arrays"]["compare_layers"].tolist() == [3, 1]
    assert captured["arrays"]["compare_readout_attention_b"].shape == (1, 1, 2, 2)
