"""Position-embedding resampling against references written from the original code's definition."""

import numpy as np
import pytest
import torch

from model import resample_grid, resample_pos_embed
from model.vit import sincos_2d_pos_embed


def _zoom_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy.ndimage.zoom(order=1, grid_mode=False) along one axis: output index o samples input
    coordinate o * (n_in - 1) / (n_out - 1); with one output (or one input) that coordinate is 0."""
    if n_out == 1 or n_in == 1:
        coord = np.zeros(n_out)
    else:
        coord = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    lo = np.clip(np.floor(coord).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, coord - lo


def zoom_order1(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """What google-research/vision_transformer and big_vision compute for a (gh, gw, D) grid:
    scipy.ndimage.zoom(grid, (out_h / gh, out_w / gw, 1), order=1), in float64."""
    g = np.asarray(grid, dtype=np.float64)
    lo, hi, w = _zoom_axis(g.shape[0], out_hw[0])
    g = g[lo] * (1 - w)[:, None, None] + g[hi] * w[:, None, None]
    lo, hi, w = _zoom_axis(g.shape[1], out_hw[1])
    return g[:, lo] * (1 - w)[None, :, None] + g[:, hi] * w[None, :, None]


def test_reference_on_hand_computed_values():
    """The oracle itself: corners stay on corners, midpoints average, one output samples index 0."""
    g = np.array([[0.0, 1.0], [2.0, 3.0]])[..., None]
    np.testing.assert_allclose(zoom_order1(g, (3, 3))[..., 0], [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]])
    ramp = np.arange(5.0)[:, None, None]  # 5 x 1
    np.testing.assert_allclose(zoom_order1(ramp, (3, 1))[:, 0, 0], [0, 2, 4])
    np.testing.assert_allclose(zoom_order1(ramp, (1, 1))[:, 0, 0], [0])  # not the centre (2)
    np.testing.assert_allclose(zoom_order1(np.full((1, 1, 1), 7.0), (3, 2))[..., 0], np.full((3, 2), 7.0))


PAIRS = [
    ((14, 14), (24, 24)),  # ViT-B/16 at 224 -> 384
    ((24, 24), (14, 14)),  # downsampling
    ((7, 7), (7, 7)),  # identity
    ((14, 10), (20, 16)),  # non-square
    ((1, 1), (3, 3)),  # one patch in
    ((5, 4), (1, 3)),  # one row out: scipy samples row 0
    ((27, 27), (16, 16)),
]


def _tables(src: tuple[int, int], dim: int = 16):
    gen = torch.Generator().manual_seed(src[0] * 100 + src[1])
    yield "random", torch.randn(src[0] * src[1], dim, generator=gen)
    yield "sincos", sincos_2d_pos_embed(dim, src)


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in PAIRS])
def test_bilinear_is_scipy_zoom_order1(src, dst):
    for kind, table in _tables(src):
        out = resample_grid(table, src_grid=src, dst_grid=dst, method="bilinear")
        assert out.shape == (dst[0] * dst[1], table.shape[1]) and out.dtype == table.dtype
        ref = zoom_order1(table.numpy().reshape(*src, -1), dst).reshape(dst[0] * dst[1], -1)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0, err_msg=kind)


def test_bilinear_keeps_the_corner_patches_and_the_prefix():
    table = torch.randn(1 + 14 * 14, 8, generator=torch.Generator().manual_seed(1))[None]
    out = resample_pos_embed(table, src_grid=(14, 14), dst_grid=(24, 24), num_prefix=1, method="bilinear")
    assert torch.equal(out[0, 0], table[0, 0])
    src, dst = table[0, 1:].reshape(14, 14, 8), out[0, 1:].reshape(24, 24, 8)
    for r, c in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert (dst[r, c] - src[r, c]).abs().max() < 1e-6


def test_bilinear_in_bfloat16_keeps_the_dtype():
    table = sincos_2d_pos_embed(8, (4, 4)).bfloat16()
    out = resample_grid(table, src_grid=(4, 4), dst_grid=(7, 7), method="bilinear")
    assert out.dtype == torch.bfloat16
    ref = zoom_order1(table.float().numpy().reshape(4, 4, -1), (7, 7)).reshape(49, -1)
    np.testing.assert_allclose(out.float().numpy(), ref, atol=1e-2, rtol=0)
