"""Mass-threshold masks drawn at pixel level and their IoU (Jaccard index) with a ground-truth mask.

DINO (Caron et al., ICCV 2021, facebookresearch/dino `visualize_attention.py`) keeps, for each
head's read-out map, the smallest set of patches holding a share tau of the map's mass
(mass_threshold_mask, tau = 0.6 in the paper) and compares that mask with segmentation masks by
their Jaccard index. Here a patch mask (..., gh, gw) covers every pixel of its patches on the
model's input grid (each patch a p x p block), and the IoU is counted in pixels against a target
(..., gh * p, gw * p) on the same grid.

Shapes: (gh, gw) patch grid, p patch size in pixels; leading dimensions (...) broadcast as in numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .attention import mass_threshold_mask

DEFAULT_TAU = 0.6  # DINO's share of the attention mass kept


def _check_patch_size(patch_size: int) -> int:
    if isinstance(patch_size, bool) or int(patch_size) != patch_size or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    return int(patch_size)


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def patch_mask_pixels(mask: Tensor | np.ndarray, patch_size: int) -> Tensor | np.ndarray:
    """A patch mask (..., gh, gw) drawn at pixel level: (..., gh * p, gw * p) bool, each patch a p x p block.

    Returns the input's type (a Tensor on the input's device, or a numpy array); any non-zero value
    counts as inside. The input is not modified.
    """
    p = _check_patch_size(patch_size)
    if mask.ndim < 2:
        raise ValueError(f"a patch mask needs (..., gh, gw), got shape {tuple(mask.shape)}")
    if isinstance(mask, Tensor):
        return (mask != 0).repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
    m = np.asarray(mask) != 0
    return np.repeat(np.repeat(m, p, axis=-2), p, axis=-1)


def mask_iou(patch_mask: Tensor | np.ndarray, target: Tensor | np.ndarray, patch_size: int) -> np.ndarray:
    """IoU in pixels of a patch mask (..., gh, gw) and a target mask (..., gh * p, gw * p) -> float64 (...,).

    Both masks lie on the model's input grid (image_size = grid * patch_size); the patch mask covers
    each kept patch's p x p pixels (patch_mask_pixels). IoU = |M & G| / |M | G|, NaN where the union
    is empty (an empty mask and an empty target). Non-zero values count as inside. numpy and torch
    inputs are accepted, the result is numpy; leading dimensions broadcast as in numpy. A target
    whose last two dimensions are not (gh * p, gw * p) raises ValueError.
    """
    p = _check_patch_size(patch_size)
    m, g = _numpy(patch_mask) != 0, _numpy(target) != 0
    if m.ndim < 2 or g.ndim < 2:
        raise ValueError(f"masks need (..., gh, gw) and (..., H, W), got {m.shape} and {g.shape}")
    gh, gw = m.shape[-2:]
    if g.shape[-2:] != (gh * p, gw * p):
        raise ValueError(
            f"target {g.shape[-2:]} is not the {gh}x{gw} grid of {p} px patches ({gh * p}x{gw * p} pixels)"
        )
    # target pixels inside each patch: (..., gh, gw), exact integer counts
    inside = g.reshape(*g.shape[:-2], gh, p, gw, p).sum(axis=(-3, -1), dtype=np.int64)
    inter = (m * inside).sum(axis=(-2, -1))
    union = m.sum(axis=(-2, -1), dtype=np.int64) * (p * p) + inside.sum(axis=(-2, -1)) - inter
    out = np.full(union.shape, np.nan)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def mask_ious(
    maps: Tensor | np.ndarray, target: Tensor | np.ndarray, patch_size: int, tau: float = DEFAULT_TAU
) -> np.ndarray:
    """IoU in pixels of each map's mass-threshold mask with the target: (..., gh, gw) maps -> float64 (...,).

    mass_threshold_mask(maps, tau) (the smallest set of patches holding a share tau of the map's mass;
    a map with a NaN or infinite value gets an empty mask, so IoU 0 with a non-empty target), then
    mask_iou with target (..., gh * p, gw * p). Maps must be non-negative; they are not modified.
    """
    t = maps if isinstance(maps, Tensor) else torch.from_numpy(np.array(maps))  # a copy: read-only arrays too
    return mask_iou(mass_threshold_mask(t, tau), target, patch_size)
