"""Resampling learned position embeddings to another patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import POS_RESAMPLE_METHODS


def resample_grid(
    grid_embed: Tensor, *, src_grid: tuple[int, int], dst_grid: tuple[int, int], method: str = "bicubic"
) -> Tensor:
    """Resample (N, C) patch embeddings laid out row-major on src_grid to dst_grid.

    Methods, named after where they come from:
      bicubic       timm: bicubic with antialias, align_corners=False (default)
      bicubic_plain bicubic without antialias (transformers' DINOv2)
      bilinear      the original JAX code: scipy.ndimage.zoom(grid, zoom, order=1), i.e. linear
                    interpolation with the corner patches on the corners (output index o samples
                    input coordinate o * (src - 1) / (dst - 1), coordinate 0 when dst == 1)
      bicubic_dino  DINO: bicubic, no antialias, with scale_factor = (dst + 0.1) / src per axis
                    (0.1 added to the target size inside the scale factor)
      nearest       patch replication
    Computed in float32; the result has the input's dtype.
    """
    if method not in POS_RESAMPLE_METHODS:
        raise ValueError(f"unknown resampling method {method!r}; choose from {POS_RESAMPLE_METHODS}")
    sh, sw = src_grid
    dh, dw = dst_grid
    N, C = grid_embed.shape
    if N != sh * sw:
        raise ValueError(f"{N} embeddings do not fill a {sh}x{sw} grid")
    if (sh, sw) == (dh, dw):
        return grid_embed
    x = grid_embed.float().reshape(1, sh, sw, C).permute(0, 3, 1, 2)  # (1, C, sh, sw)
    if method == "bicubic":
        x = F.interpolate(x, size=(dh, dw), mode="bicubic", antialias=True, align_corners=False)
    elif method == "bicubic_plain":
        x = F.interpolate(x, size=(dh, dw), mode="bicubic", align_corners=False)
    elif method == "bilinear":
        # align_corners=True is scipy's zoom order=1 mapping: o -> o * (src - 1) / (dst - 1), and
        # coordinate 0 for a one-patch output (PyTorch then uses scale 0, as scipy does)
        x = F.interpolate(x, size=(dh, dw), mode="bilinear", align_corners=True)
    elif method == "bicubic_dino":
        scale = ((dh + 0.1) / sh, (dw + 0.1) / sw)
        x = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        if x.shape[-2:] != (dh, dw):  # adding 0.1 to the target size guards against float rounding
            raise ValueError(f"DINO resampling produced {tuple(x.shape[-2:])}, expected {(dh, dw)}")
    else:
        x = F.interpolate(x, size=(dh, dw), mode="nearest")
    return x.permute(0, 2, 3, 1).reshape(dh * dw, C).to(grid_embed.dtype)


def resample_pos_embed(
    pos_embed: Tensor,
    *,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    num_prefix: int,
    method: str = "bicubic",
) -> Tensor:
    """pos_embed (1, num_prefix + sh*sw, C) -> (1, num_prefix + dh*dw, C); prefix rows kept as is.

    An unchanged grid returns the input tensor itself.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
    grid = resample_grid(grid, src_grid=src_grid, dst_grid=dst_grid, method=method)
    return torch.cat([prefix, grid[None]], dim=1)
