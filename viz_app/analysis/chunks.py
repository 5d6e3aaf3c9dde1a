"""Apply a per-map function over many (T, T) maps a few at a time, so that float32 temporaries
stay small (ViT-L/16 at 384 has 24 x 16 maps of 577 x 577: 0.5 GB per full-size temporary).

See docs/DEFINITIONS.md, section 'Memory cost'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CHUNK_VALUES = 1 << 22  # values per temporary (16 MB in float32)


def map_chunks(maps: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """maps (..., R, C) -> fn over flattened (k, R, C) chunks -> (..., *fn's trailing shape)."""
    lead, (R, C) = maps.shape[:-2], maps.shape[-2:]
    if maps.numel() == 0:
        out = fn(maps.reshape(-1, R, C))
        return out.reshape(*lead, *out.shape[1:])
    # The maps are independent: walk them in memory order. A batch viewed out of the model's
    # (L, B, H, T, T) block is (B, L, H, T, T) with L outermost in memory; taking the leading
    # dims by decreasing stride makes them one mergeable run again, so chunks stay large.
    order = sorted(range(len(lead)), key=lambda i: -maps.stride(i))
    if order != list(range(len(lead))):
        inverse = [order.index(i) for i in range(len(lead))]
        out = map_chunks(maps.permute(*order, -2, -1), fn)
        return out.permute(*inverse, *range(len(lead), out.ndim))
    try:
        flat = maps.view(-1, R, C)
    except RuntimeError:  # leading dims not mergeable without a copy (a batch of stacked maps): go one by one
        return torch.stack([map_chunks(m, fn) for m in maps.unbind(0)])
    step = max(1, CHUNK_VALUES // max(1, R * C))
    out = torch.cat([fn(flat[i : i + step]) for i in range(0, flat.shape[0], step)])
    return out.reshape(*lead, *out.shape[1:])
