"""Mean attention distance per head (paper Fig. 7 right, Fig. 11), and the share of attention
that goes to prefix tokens, which the "as_is" convention counts as distance 0.

Definitions: docs/DEFINITIONS.md, section 'Mean attention distance'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunks import map_chunks

CONVENTIONS = ("as_is", "renormalized")


def patch_distances(grid: tuple[int, int], patch_size: int, *, device=None) -> Tensor:
    """(N, N) Euclidean distance between patch centres in pixels of the model input (built on the
    host in float64, then moved to `device`)."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, device="cpu"), torch.arange(gw, device="cpu"), indexing="ij")
    centres = torch.stack([yy.flatten(), xx.flatten()], dim=-1).double() * patch_size  # (N, 2)
    return torch.cdist(centres, centres).float().to(device)


def _row_terms(attn: Tensor, *, num_prefix: int, grid: tuple[int, int], patch_size: int) -> Tensor:
    """The per-query sums every distance statistic is made of, in one pass over the maps.

    attn: (..., H, T, T) -> (..., H, N, 4) float32, for each patch query i (rows P .. T-1):
    [sum over patches j of A[i, j] * d(i, j), sum over patches j of A[i, j],
     sum over prefix keys j < P of A[i, j], sum over all keys j of A[i, j]].
    """
    P = num_prefix
    d = patch_distances(grid, patch_size, device=attn.device)

    def terms(a: Tensor) -> Tensor:  # (k, N, T) patch queries to all keys -> (k, N, 4)
        a = a.float()
        patches = a[..., P:]
        # a product and a row sum: twice as fast as einsum("kij,ij->ki") on the CPU, and the
        # temporary is one chunk (map_chunks)
        dist = (patches * d).sum(dim=-1)
        return torch.stack([dist, patches.sum(dim=-1), a[..., :P].sum(dim=-1), a.sum(dim=-1)], dim=-1)

    return map_chunks(attn[..., P:, :], terms)


def _per_query(terms: Tensor, convention: str) -> Tensor:
    """_row_terms' output -> the distance of each patch query, (..., H, N), in pixels."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    dist = terms[..., 0]
    if convention == "renormalized":  # the row renormalized first: the same as dividing after
        dist = dist / terms[..., 1].clamp_min(1e-30)
    return dist


def attention_distance_per_query(
    attns: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    patch_size: int,
    convention: str = "as_is",
) -> Tensor:
    """D[..., h, i] = sum over patches j of A[i, j] * d(i, j), in pixels, for every patch query i.

    attns: (..., H, T, T) -> (..., H, N), queries in patch order (prefix queries left out).
    convention "as_is": attention mass on prefix tokens counts as distance 0; "renormalized":
    each query's patch row is renormalized to sum 1 first (the result is 0 for a query that puts
    no mass on patches). mean_attention_distance is the mean of this over the last dimension.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    terms = _row_terms(attns, num_prefix=num_prefix, grid=grid, patch_size=patch_size)
    return _per_query(terms, convention)


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
    as distance 0 (the paper's formula over patches, as common re-implementations do), so a head
    that sends most of its mass to the class token reads as very local: read it together with
    prefix_mass_share. "renormalized": each query's patch row is renormalized to sum 1 first.
    """
    return attention_distance_per_query(
        attns, num_prefix=num_prefix, grid=grid, patch_size=patch_size, convention=convention
    ).mean(dim=-1)


def prefix_mass_per_query(attn: Tensor, *, num_prefix: int) -> Tensor:
    """s[..., h, i] = (sum over prefix keys j < P of A[i, j]) / (sum over all keys j of A[i, j]).

    attn: (..., H, T, T) -> (..., H, N), one value in [0, 1] per patch query i (rows P .. T-1,
    prefix queries left out), 0 when num_prefix is 0 (and for an all-zero row). For post-softmax
    rows the denominator is 1; dividing by it keeps low-precision rows exact shares.
    """
    P = num_prefix

    def per_query(a: Tensor) -> Tensor:  # (k, N, T) patch queries to all keys -> (k, N)
        a = a.float()
        return a[..., :P].sum(dim=-1) / a.sum(dim=-1).clamp_min(1e-30)

    return map_chunks(attn[..., P:, :], per_query)


def prefix_mass_share(attn: Tensor, num_prefix: int) -> Tensor:
    """Mean share of attention mass that patch queries send to prefix tokens, per map.

    share[..., h] = mean over the N patch queries i (rows P .. T-1; the P prefix queries are left
    out, exactly the queries mean_attention_distance averages over, each weighted 1/N) of
    s_i = (sum over prefix keys j < P of A[i, j]) / (sum over all keys j of A[i, j]).
    Prefix tokens are the first num_prefix tokens: class, distillation, registers.

    attn: (..., H, T, T), e.g. (B, L, H, T, T) -> (B, L, H); values in [0, 1]; all 0 when
    num_prefix is 0; 1 for a head whose patch queries attend only to prefix tokens.

    Relation to mean_attention_distance, for rows that sum to 1 (post-softmax): per query,
    as_is_i = renormalized_i * (1 - s_i) exactly (attention_distance_per_query and
    prefix_mass_per_query give the per-query values). For the means over queries this gives
    MAD_as_is = MAD_renormalized * (1 - share) - cov_i(renormalized_i, s_i) (population
    covariance over the N queries), so the product form holds for the means only when s_i or
    renormalized_i is the same for every query; always MAD_as_is <= MAD_renormalized.
    """
    return prefix_mass_per_query(attn, num_prefix=num_prefix).mean(dim=-1)


def distance_statistics(attn: Tensor, *, num_prefix: int, grid: tuple[int, int], patch_size: int) -> dict[str, Tensor]:
    """mean_attention_distance in both conventions and prefix_mass_share from one pass over the
    maps (attn (..., H, T, T) -> three (..., H)), equal bit for bit to the three functions called
    one by one: {"as_is", "renormalized", "prefix_mass_share"}."""
    terms = _row_terms(attn, num_prefix=num_prefix, grid=grid, patch_size=patch_size)
    return {
        "as_is": _per_query(terms, "as_is").mean(dim=-1),
        "renormalized": _per_query(terms, "renormalized").mean(dim=-1),
        "prefix_mass_share": (terms[..., 2] / terms[..., 3].clamp_min(1e-30)).mean(dim=-1),
    }
