"""Renderers: shapes, colour scales, and that the geometry maps back to the original image."""

import cv2
import numpy as np
import pytest
from PIL import Image

from model import Preprocessing, prepare_image
from viz_app import figures, render


def test_overlay_methods():
    view = np.full((64, 64, 3), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0
    for method in ("nearest", "bilinear"):
        out = render.overlay(view, heat, method=method, alpha=0.6, patch_size=16)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    near = render.overlay(view, heat, method="nearest", alpha=1.0)
    hot = render.colorize(np.array([[0.0, 1.0]]))[0, 1]
    assert (near[16:32, 32:48] == hot).all()  # the hot patch exactly, nothing else
    assert not (near[0:16, 0:16] == hot).all()
    paper = render.overlay(view, heat, method="paper", patch_size=16)
    assert paper[24, 40].sum() > paper[60, 4].sum()  # bright where attended, black far away
    with pytest.raises(ValueError):
        render.overlay(view, heat, method="cubic")


def test_overlay_on_original_inverts_the_crop():
    orig = np.zeros((100, 200, 3), np.uint8)  # W=200, H=100
    orig[:, :] = (50, 50, 50)
    prepared = prepare_image(Image.fromarray(orig), Preprocessing(input_size=(32, 32), crop_pct=1.0))
    assert prepared.resized_size == (64, 32) and prepared.crop_box == (16, 0, 48, 32)
    heat = np.zeros((2, 2))
    heat[0, 0] = 1.0  # top-left patch of the model's view
    out = render.overlay_on_original(orig, prepared, heat, alpha=1.0, patch_size=16)
    hot = render.colorize(np.array([[0.0, 1.0]]))[0, 1]
    # model pixel (0..16, 0..16) -> original x 50..100, y 0..50
    assert (out[5:45, 55:95] == hot).all()
    assert (out[:, :45] < 50).all()  # outside the crop: dimmed original
    x, y = prepared.to_original(0, 0)
    assert (x, y) == (50.0, 0.0)


def test_patch_grid_and_click_mapping():
    view = np.zeros((48, 64, 3), np.uint8)
    img = render.draw_patch_grid(view, 16, highlight=(1, 2))
    assert img.shape[0] > 48 and img.shape[1] > 64
    assert render.patch_at(40, 20, patch_size=16, grid=(3, 4), num_prefix=1) == (1, 2, 1 + 1 * 4 + 2)
    with pytest.raises(ValueError):
        render.patch_at(70, 20, patch_size=16, grid=(3, 4), num_prefix=1)


def test_tiles_and_filters():
    tiles = np.random.default_rng(0).uniform(-1, 1, (3, 4, 3, 4))
    img = render.tile_grid(tiles, scale=2)
    assert img.shape == (3 * 7 + 1, 4 * 9 + 1, 3)
    th, tw = 6, 8  # each tile is its own colored map, enlarged, at its place; gaps stay white
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        want = np.repeat(np.repeat(render.colorize(tiles[r, c], "viridis", -1.0, 1.0), 2, axis=0), 2, axis=1)
        y, x = 1 + r * (th + 1), 1 + c * (tw + 1)
        np.testing.assert_array_equal(img[y : y + th, x : x + tw], want)
        assert (img[y - 1, x : x + tw] == 255).all() and (img[y : y + th, x - 1] == 255).all()
    assert render.tile_grid(np.zeros((0, 4, 3, 4)), scale=2).shape == (1, 4 * 9 + 1, 3)  # no rows: a blank strip
    comps = np.random.default_rng(1).normal(size=(28, 3, 8, 8))
    f = render.filter_tiles(comps, cols=7, scale=2)
    assert f.shape == (4 * 18 + 2, 7 * 18 + 2, 3)


def test_mad_scatter():
    mad = np.arange(12, dtype=float).reshape(3, 4)
    fig = figures.mad_scatter_figure(mad)
    assert len(fig.data) == 4 and list(fig.data[1].y) == [1.0, 5.0, 9.0]
    assert "pixels" in fig.layout.yaxis.title.text
    png = render.to_png(render.mad_scatter_png(mad))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_is_a_valid_plotly_figure():
    """figures.py skips plotly's validation for speed: every function's output must pass it here
    (a misspelt property would otherwise be dropped silently by the browser)."""
    import plotly.graph_objects as go

    rng = np.random.default_rng(0)
    maps = rng.random((3, 4, 5, 5))
    made = [
        figures.patch_heatmap(maps[0, 0], num_prefix=1, zmin=0, title="t", colorbar_title="a", marked=(1, 2)),
        figures.patch_heatmap(maps[0, 0] - 0.5, num_prefix=0, colorscale="blue-white-red"),
        figures.clickable_view(rng.integers(0, 255, (80, 80, 3)).astype(np.uint8), 16, num_prefix=1, selected=(0, 1)),
        figures.layer_head_matrix(maps[0, :, :, 0], title="t", unit="px", zmin=0),
        figures.curves({"a": (np.arange(3), np.arange(3.0))}, title="t", x_title="x", y_title="y"),
        figures.top_classes(["a", "b"], [0.7, 0.3]),
        figures.token_norm_map(rng.random((3, 6)), rng.random((3, 6)) > 0.7, num_prefix=1, prefix_names=("cls",)),
        figures.mad_scatter_figure(maps[0, :, :, 0] * 100, prefix_share=maps[1, :, :, 0]),
        figures.tile_figure(maps, row_name="layer", col_name="head", colorbar_title="x", title="t", selected=(1, 1)),
        figures.clickable_tiles(
            rng.integers(0, 255, (60, 90, 3)).astype(np.uint8),
            [(0, 0, 40, 40), (45, 0, 85, 40)],
            hover=["head 1", "head 2"],
            selected=1,
        ),
        figures.animation(
            [rng.integers(0, 255, (30, 40, 3)).astype(np.uint8) for _ in range(3)],
            ["1", "2", "3"],
            fps=2,
            slider_name="layer",
        ),
    ]
    for fig in made:
        spec = fig.to_dict()
        checked = go.Figure(spec)  # raises on any property plotly does not know or any bad value
        assert len(checked.data) == len(spec["data"])


def test_patch_grid_numbers_are_legible_at_224_px():
    """Row and column numbers at least 12 px tall in the picture (they were about 4 px)."""
    view = np.full((224, 224, 3), 128, np.uint8)
    grid = render.draw_patch_grid(view, 16)
    margin = grid.shape[0] - 672  # the view is enlarged 3 times; the numbers sit in the margin
    ink = np.nonzero((grid[:margin, margin:, 0] < 100).any(axis=1))[0]  # rows of the column numbers
    assert margin > 0 and ink.size and ink.max() - ink.min() + 1 >= 12


def test_a_long_title_is_wrapped_inside_the_figure():
    """A title wider than the figure is broken into lines, none of them cut at the edge."""
    title = "Layer 6, every head: attention of the read-out token; outlined: the patches holding 60% of the mass"
    fig, _ = render.publication_figure(np.zeros((100, 200, 3), np.uint8), title=title, cmap=None)
    width = fig.shape[1]
    scale = max(0.7, 1000 / 1000)  # the image is enlarged to 1000 px wide (x5)
    lines = render.wrap_text(title, width - 16, scale, 2)
    assert len(lines) > 1 and " ".join(lines) == title
    assert all(cv2.getTextSize(line, render.FONT, scale, 2)[0][0] <= width - 16 for line in lines)
    ink = (fig[:, -8:] < 128).any()  # nothing drawn in the last 8 px: no text runs off the edge
    assert not ink
