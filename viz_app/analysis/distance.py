"""Mean attention distance per head (paper Fig. 7 right, Fig. 11).

Definition: docs/DEFINITIONS.md, section 'Mean attention distance'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunks import map_chunks

CONVENTIONS = ("as_is", "renormalized")


def patch_distances(grid: tuple[int, int], patch_size: int, *, device=None) -> Tensor:
    """(N, N) Euclidean distance between patch centres in pixels of the model input."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([yy.flatten(), xx.flatten()], dim=-1).double() * patch_size  # (N, 2)
    return torch.cdist(centres, centres).float().to(device)


def mean_attention_distance(
    attns: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    patch_size: int,
    convention: str = "as_is",
) -> Tensor:
    """MAD[l, h] = mean over query patches i of sum over patches j of A[i, j] * d(i, j), in pixels.

    attns: (..., H, T, T) -> (..., H). convention "as_is": attention mass on prefix tokens counts
    as distance 0 (the paper's formula over patches, as common re-implementations do);
    "renormalized": each query's patch row is renormalized to sum 1 first.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    P = num_prefix
    d = patch_distances(grid, patch_size, device=attns.device)

    def per_query(a: Tensor) -> Tensor:  # (k, N, N) patch queries to patch keys -> (k, N)
        a = a.float()
        dist = torch.einsum("kij,ij->ki", a, d)  # one pass, no (k, N, N) temporary
        if convention == "renormalized":  # the row renormalized first: the same as dividing after
            dist = dist / a.sum(dim=-1).clamp_min(1e-30)
        return dist

    return map_chunks(attns[..., P:, P:], per_query).mean(dim=-1)
