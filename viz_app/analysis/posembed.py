"""Position-embedding similarity and model comparison (paper Fig. 7 centre).

Definitions: docs/DEFINITIONS.md, section 'Position-embedding similarity' (resampling methods
and their known differences from the originals included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.pos_embed import resample_grid


def position_similarity(grid_embed: Tensor) -> Tensor:
    """Cosine similarity of patch position embeddings: (N, D) without prefix rows -> (N, N)."""
    e = F.normalize(grid_embed.double(), dim=-1)
    return (e @ e.T).float()


def similarity_tiles(sim: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, N) -> (gh, gw, gh, gw): tile (r, c) is the similarity of patch (r, c) to every patch."""
    gh, gw = grid
    return sim.reshape(gh, gw, gh, gw)


def _grid_offsets(grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    return (y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs()


def similarity_decay(sim: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Mean similarity vs Euclidean grid distance, binned to the nearest integer (self pairs left
    out). -> (distances (K,), mean similarity (K,))."""
    dy, dx = _grid_offsets(grid)
    dist = torch.sqrt((dy**2 + dx**2).double()).round().long()
    off = ~torch.eye(sim.shape[0], dtype=torch.bool)
    d, s = dist[off], sim[off].double()
    bins = torch.unique(d)
    means = torch.stack([s[d == b].mean() for b in bins]).float()
    return bins, means


def similarity_by_offset(sim: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Mean similarity of pairs in the same row at column offset k, and in the same column at
    row offset k, k = 1..max. -> (row_curve (gw-1,), column_curve (gh-1,))."""
    gh, gw = grid
    dy, dx = _grid_offsets(grid)
    rows = torch.stack([sim[(dy == 0) & (dx == k)].mean() for k in range(1, gw)]) if gw > 1 else torch.zeros(0)
    cols = torch.stack([sim[(dx == 0) & (dy == k)].mean() for k in range(1, gh)]) if gh > 1 else torch.zeros(0)
    return rows, cols


def neighbour_contrast(sim: Tensor, grid: tuple[int, int], *, far: int = 4) -> float:
    """Mean similarity of 4-neighbours minus that of patches `far` or more apart (Chebyshev)."""
    dy, dx = _grid_offsets(grid)
    near = (dy + dx) == 1
    away = torch.maximum(dy, dx) >= far
    if not away.any() or not near.any():
        raise ValueError(
            f"grid {grid} has no patches {far} or more apart" if near.any() else f"grid {grid} has no neighbours"
        )
    return float(sim[near].mean() - sim[away].mean())


@dataclass
class PosEmbedComparison:
    grid: tuple[int, int]
    method: str
    sim_a: Tensor  # (N, N) on the common grid
    sim_b: Tensor
    difference: Tensor  # sim_a - sim_b
    decay_a: tuple[Tensor, Tensor]
    decay_b: tuple[Tensor, Tensor]
    anisotropy_a: float  # mean(row curve) - mean(column curve)
    anisotropy_b: float


def _anisotropy(sim: Tensor, grid: tuple[int, int]) -> float:
    rows, cols = similarity_by_offset(sim, grid)
    k = min(len(rows), len(cols))
    return float((rows[:k] - cols[:k]).mean()) if k else 0.0


def compare_position_embeddings(
    embed_a: Tensor,
    grid_a: tuple[int, int],
    embed_b: Tensor,
    grid_b: tuple[int, int],
    *,
    grid: tuple[int, int] | None = None,
    method: str = "bicubic",
) -> PosEmbedComparison:
    """Resample both (N, D) patch position embeddings to a common grid with a named method
    (bicubic = timm, bilinear = original JAX, bicubic_dino = DINO), then compare similarities.
    The common grid defaults to the larger of the two."""
    common = grid or max(grid_a, grid_b, key=lambda g: g[0] * g[1])
    a = resample_grid(embed_a.float(), src_grid=grid_a, dst_grid=common, method=method)
    b = resample_grid(embed_b.float(), src_grid=grid_b, dst_grid=common, method=method)
    sa, sb = position_similarity(a), position_similarity(b)
    return PosEmbedComparison(
        grid=tuple(common),
        method=method,
        sim_a=sa,
        sim_b=sb,
        difference=sa - sb,
        decay_a=similarity_decay(sa, common),
        decay_b=similarity_decay(sb, common),
        anisotropy_a=_anisotropy(sa, common),
        anisotropy_b=_anisotropy(sb, common),
    )
