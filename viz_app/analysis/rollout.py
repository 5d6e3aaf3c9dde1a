"""Attention rollout (Abnar & Zuidema 2020) and gradient rollout (Chefer et al. 2021).

Definitions: docs/DEFINITIONS.md, sections 'Attention rollout' and 'Gradient rollout'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import readout_rows

FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: Tensor, fusion: str = "mean") -> Tensor:
    """(..., H, T, T) -> (..., T, T)."""
    if fusion == "mean":
        return attn.mean(dim=-3)
    if fusion == "max":
        return attn.amax(dim=-3)
    if fusion == "min":
        return attn.amin(dim=-3)
    raise ValueError(f"head fusion must be one of {FUSIONS}, got {fusion!r}")


def _discard(fused: Tensor, ratio: float, protect: tuple[int, ...]) -> Tensor:
    """Zero the lowest `ratio` share of entries of each (T, T) matrix, never the read-out
    tokens' own (r, r) entries. Works on a copy; every batch item and layer separately."""
    if ratio <= 0:
        return fused
    T = fused.shape[-1]
    flat = fused.flatten(-2).clone()  # (..., T*T)
    k = int(T * T * ratio)
    if k == 0:
        return fused
    ranked = flat.clone()
    for r in protect:
        ranked[..., r * T + r] = float("inf")
    idx = ranked.topk(k, dim=-1, largest=False).indices
    flat.scatter_(-1, idx, 0.0)
    for r in protect:  # inf was never among the k lowest unless k > T*T - len(protect)
        flat[..., r * T + r] = fused.flatten(-2)[..., r * T + r]
    return flat.reshape(fused.shape)


def _layer_range(L: int, start: int, end: int | None) -> range:
    end = L - 1 if end is None else end
    if not (0 <= start <= end < L):
        raise ValueError(f"layer range [{start}, {end}] is not inside [0, {L - 1}]")
    return range(start, end + 1)


def _residual_matrices(
    attns: Tensor, *, fusion: str, discard_ratio: float, start: int, end: int | None, protect: tuple[int, ...]
) -> list[Tensor]:
    """Per layer: A_hat = normalize_rows(0.5 * fused + 0.5 * I), each (B, T, T), in float32."""
    if attns.ndim != 5:
        raise ValueError(f"attentions must be (B, L, H, T, T), got shape {tuple(attns.shape)}")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    L, T = attns.shape[1], attns.shape[-1]
    eye = torch.eye(T, device=attns.device, dtype=torch.float32)
    out = []
    for layer in _layer_range(L, start, end):
        fused = _discard(fuse_heads(attns[:, layer].float(), fusion), discard_ratio, protect)
        a = 0.5 * fused + 0.5 * eye
        out.append(a / a.sum(dim=-1, keepdim=True))
    return out


def rollout_matrix(
    attns: Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start: int = 0,
    end: int | None = None,
    protect: tuple[int, ...] = (0,),
) -> Tensor:
    """R = A_hat[end] @ ... @ A_hat[start], (B, T, T)."""
    mats = _residual_matrices(
        attns, fusion=head_fusion, discard_ratio=discard_ratio, start=start, end=end, protect=protect
    )
    R = mats[0]
    for a in mats[1:]:
        R = a @ R  # later layers on the left
    return R


def attention_rollout(
    attns: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    readout_tokens: tuple[int, ...] = (0,),
    readout: str = "auto",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start: int = 0,
    end: int | None = None,
) -> Tensor:
    """Rollout map of the read-out token, (B, L, H, T, T) -> (B, gh, gw). Defaults: the paper's
    settings (mean fusion, no discard, all layers).

    Only the read-out row of R = A_hat[end] @ ... @ A_hat[start] is needed, and taking rows is
    linear, so it is carried from the left as a row vector: O(L T^2) instead of O(L T^3)."""
    mats = _residual_matrices(
        attns, fusion=head_fusion, discard_ratio=discard_ratio, start=start, end=end, protect=tuple(readout_tokens)
    )
    row = readout_rows(mats[-1], num_prefix=num_prefix, readout_tokens=readout_tokens, readout=readout)  # (B, T)
    for a in reversed(mats[:-1]):
        row = torch.bmm(row[:, None, :], a)[:, 0]
    return row[..., num_prefix:].reshape(-1, *grid)


def _readout_map(R: Tensor, *, num_prefix: int, grid: tuple[int, int], readout_tokens, readout: str) -> Tensor:
    """(B, T, T) rollout -> the read-out row over the patches, (B, gh, gw)."""
    row = readout_rows(R, num_prefix=num_prefix, readout_tokens=readout_tokens, readout=readout)
    return row[..., num_prefix:].reshape(-1, *grid)


def rollout_per_layer(
    attns: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    readout_tokens: tuple[int, ...] = (0,),
    readout: str = "auto",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Tensor:
    """The rollout map after each layer (from layer 0), (B, L, gh, gw): map e is
    attention_rollout(..., start=0, end=e).

    Each map's read-out row is carried from the left through the layers below it, as in
    attention_rollout: O(L^2 T^2) instead of the O(L T^3) of multiplying the full matrices."""
    mats = _residual_matrices(
        attns, fusion=head_fusion, discard_ratio=discard_ratio, start=0, end=None, protect=tuple(readout_tokens)
    )
    maps = []
    for e, top in enumerate(mats):
        row = readout_rows(top, num_prefix=num_prefix, readout_tokens=readout_tokens, readout=readout)  # (B, T)
        for a in reversed(mats[:e]):
            row = torch.bmm(row[:, None, :], a)[:, 0]
        maps.append(row[..., num_prefix:].reshape(-1, *grid))
    return torch.stack(maps, dim=1)


def gradient_rollout(
    attns: Tensor,
    grads: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    readout_tokens: tuple[int, ...] = (0,),
    readout: str = "auto",
) -> Tensor:
    """Chefer et al. (ICCV 2021), generic attention explainability.

    R = I; for each layer l: A_bar = mean_h(relu(dy_c/dA_l * A_l)); R = R + A_bar @ R.
    attns, grads: (B, L, H, T, T), grads[:, l] paired with attns[:, l]. -> (B, gh, gw).
    """
    if attns.shape != grads.shape:
        raise ValueError(f"attentions {tuple(attns.shape)} and gradients {tuple(grads.shape)} differ in shape")
    B, L, H, T, _ = attns.shape
    R = torch.eye(T, device=attns.device, dtype=torch.float32).expand(B, T, T)
    for layer in range(L):
        a_bar = (grads[:, layer].float() * attns[:, layer].float()).clamp_min(0).mean(dim=1)  # (B, T, T)
        R = R + a_bar @ R
    return _readout_map(R, num_prefix=num_prefix, grid=grid, readout_tokens=readout_tokens, readout=readout)
