"""Per-head attention maps, the reverse view, mass-threshold masks and entropy.

Definitions: docs/DEFINITIONS.md, sections 'Notation and token order', 'Per-head attention maps'
and 'Attention entropy'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunks import map_chunks

READOUTS = ("auto", "cls", "dist", "mean", "patches")


def readout_rows(mat: Tensor, *, num_prefix: int, readout_tokens: tuple[int, ...], readout: str = "auto") -> Tensor:
    """The read-out row(s) of (..., T, T) -> (..., T).

    readout: auto (the tokens the classifier reads, averaged; patch mean when there are none),
    cls (token 0), dist (token 1), mean (mean of cls and dist), patches (mean of patch rows).
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if readout == "auto":
        if not readout_tokens:
            readout = "patches"
        else:
            return mat[..., list(readout_tokens), :].mean(dim=-2)
    if readout == "patches":
        return mat[..., num_prefix:, :].mean(dim=-2)
    need = {"cls": 1, "dist": 2, "mean": 2}[readout]
    if num_prefix < need or (readout != "cls" and need > len(readout_tokens)):
        raise ValueError(f"readout {readout!r} needs a {'distillation' if need == 2 else 'class'} token")
    if readout == "cls":
        return mat[..., 0, :]
    if readout == "dist":
        return mat[..., 1, :]
    return mat[..., :2, :].mean(dim=-2)


def _to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    gh, gw = grid
    if x.shape[-1] != gh * gw:
        raise ValueError(f"{x.shape[-1]} patch values do not fill a {gh}x{gw} grid")
    return x.reshape(*x.shape[:-1], gh, gw)


def _renorm(x: Tensor) -> Tensor:
    return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def attention_maps(
    attn: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    query: int | None = None,
    readout_tokens: tuple[int, ...] = (0,),
    readout: str = "auto",
    drop_prefix: bool = False,
) -> Tensor:
    """Map of each head for one query token: A[..., q, P:] -> (..., gh, gw).

    attn: (..., T, T). query: a token index (P + row * gw + col for a patch); None uses the
    read-out token(s). drop_prefix: renormalize the patch part to sum 1.
    """
    T = attn.shape[-1]
    if query is None:
        rows = readout_rows(attn, num_prefix=num_prefix, readout_tokens=readout_tokens, readout=readout)
    else:
        if not 0 <= query < T:
            raise ValueError(f"query token {query} is outside 0..{T - 1}")
        rows = attn[..., query, :]
    patch = rows[..., num_prefix:]
    return _to_grid(_renorm(patch) if drop_prefix else patch, grid)


def attention_to_patch(attn: Tensor, *, num_prefix: int, grid: tuple[int, int], patch: int) -> Tensor:
    """Reverse view: how much each patch attends to patch j, the column A[..., P:, P + j] -> (..., gh, gw)."""
    N = attn.shape[-1] - num_prefix
    if not 0 <= patch < N:
        raise ValueError(f"patch {patch} is outside 0..{N - 1}")
    return _to_grid(attn[..., num_prefix:, num_prefix + patch], grid)


def mass_threshold_mask(maps: Tensor, tau: float = 0.6) -> Tensor:
    """DINO-style mask: the smallest set of patches holding a share tau of each map's mass.

    maps: (..., gh, gw), non-negative. Returns a bool tensor of the same shape. Among equal values
    at the cut, the patch first in row-major order is kept first. A map with a NaN or infinite
    value has no defined mass share: its mask is empty (all False).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    flat = maps.flatten(-2).float()
    finite = torch.isfinite(flat).all(dim=-1, keepdim=True)  # (..., 1)
    flat = torch.where(finite, flat, torch.zeros_like(flat))
    if (flat < 0).any():
        raise ValueError("mass threshold needs non-negative maps")
    flat = _renorm(flat)
    vals, idx = flat.sort(dim=-1, descending=True, stable=True)  # ties: the first in row-major order first
    before = vals.cumsum(dim=-1) - vals  # mass of the patches ranked above each one
    keep_sorted = (before < tau - 1e-7) & finite
    mask = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return mask.reshape(maps.shape)


def attention_entropy(attn: Tensor, *, num_prefix: int = 0, patches_only: bool = False) -> Tensor:
    """Mean row entropy in nats over query tokens, (..., H, T, T) -> (..., H).

    patches_only: average over patch queries only (the prefix rows are left out).
    """

    def row_entropy(p: Tensor) -> Tensor:  # (k, T, T) -> (k, T)
        p = p.float()
        # -sum p log p with one temporary, worked in place (the same operations, the same bits as
        # the plain expression, 20 % faster: the analyses share two cores with the model)
        plogp = p.clamp_min(1e-30).log_().mul_(p)
        return -plogp.sum(dim=-1)

    ent = map_chunks(attn, row_entropy)  # (..., H, T)
    if patches_only:
        ent = ent[..., num_prefix:]
    return ent.mean(dim=-1)
