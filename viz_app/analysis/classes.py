"""Class-specific maps compared: each map as a share of its own relevance, and the contrastive map of
two classes (share of A's relevance minus share of B's).

The maps themselves (gradient rollout, Chefer et al. ICCV 2021; Transformer Attribution, Chefer et al.
CVPR 2021) come from viz_app/analysis/rollout.py and the LRP module; docs/DEFINITIONS.md, section
'Class maps side by side and the contrastive map'.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

Map = np.ndarray | Tensor


def _float_dtype(*maps: Map):
    """The dtype results come in: the inputs' promoted floating dtype, at least float32."""
    if isinstance(maps[0], Tensor):
        dtype = torch.float32
        for m in maps:
            dtype = torch.promote_types(dtype, m.dtype if m.dtype.is_floating_point else torch.float32)
        return dtype
    return np.result_type(np.float32, *(m.dtype if np.issubdtype(m.dtype, np.floating) else np.float32 for m in maps))


def _as_backend(m, like: Map) -> Map:
    """m as the same kind of array as `like` (a torch tensor on like's device, or numpy); never a copy
    when it already is one."""
    if isinstance(like, Tensor):
        return m if isinstance(m, Tensor) else torch.as_tensor(np.asarray(m), device=like.device)
    return m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)


def _share(m: Map, dtype) -> Map:
    """m (..., gh, gw) divided by its total over the grid; NaN everywhere where the total is not a
    positive finite number."""
    if isinstance(m, Tensor):
        v = m.to(dtype)
        total = v.sum(dim=(-2, -1), keepdim=True)
        ok = torch.isfinite(total) & (total > 0)
        return torch.where(ok, v / torch.where(ok, total, torch.ones_like(total)), torch.full_like(v, float("nan")))
    v = m.astype(dtype, copy=False)
    total = v.sum(axis=(-2, -1), keepdims=True)
    ok = np.isfinite(total) & (total > 0)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(ok, v / np.where(ok, total, 1), np.nan).astype(dtype, copy=False)


def relevance_share(heat: Map) -> Map:
    """Each map as the share of its own relevance: heat / heat.sum() over the grid.

    heat: (..., gh, gw), numpy or torch -> the same kind and shape, floating (the input's dtype, at least
    float32). A map whose total is zero, negative or not finite (a NaN or infinite value anywhere in
    it) has no shares: NaN everywhere. For a non-negative map the shares lie in [0, 1] and sum to 1.
    """
    if heat.ndim < 2:
        raise ValueError(f"a map is (..., gh, gw), got shape {tuple(heat.shape)}")
    return _share(heat, _float_dtype(heat))


def contrastive_map(map_a: Map, map_b: Map) -> Map:
    """Share of A's relevance minus share of B's, patch by patch: a / sum(a) - b / sum(b).

    map_a, map_b: class-specific maps (..., gh, gw) of the same image for classes A and B, numpy or
    torch (the result is the kind of map_a, on its device; map_b is converted when it is the other
    kind); their shapes broadcast (one image's map against a batch). -> (..., gh, gw), floating (the
    inputs' promoted dtype, at least float32).

    Each map is first made a distribution over the patches (its own total, so two classes whose maps
    differ only in overall scale, e.g. gradient rollout of a confident and an unlikely class, compare
    by where their relevance lies, not by how much there is). The result sums to 0 over the grid;
    positive where A has a larger share of its relevance than B, negative where B has. For
    non-negative maps (gradient rollout, Transformer Attribution) every value lies in [-1, 1].

    A map whose total is zero, negative or not finite (a NaN or infinite value anywhere in it) has
    no shares, and the contrastive map is NaN everywhere (no value), not a one-sided map. The same
    class as A and B gives 0 everywhere. Inputs are not modified.
    """
    if map_a.ndim < 2 or np.ndim(map_b) < 2:
        raise ValueError(f"maps are (..., gh, gw), got shapes {tuple(map_a.shape)} and {tuple(np.shape(map_b))}")
    map_b = _as_backend(map_b, map_a)
    if tuple(map_a.shape[-2:]) != tuple(map_b.shape[-2:]):
        raise ValueError(f"maps of different grids: {tuple(map_a.shape)} and {tuple(map_b.shape)}")
    dtype = _float_dtype(map_a, map_b)
    return _share(map_a, dtype) - _share(map_b, dtype)
