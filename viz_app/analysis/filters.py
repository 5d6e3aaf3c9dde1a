"""Principal components of the patch-embedding filters (paper Fig. 7 left).

Definition: docs/DEFINITIONS.md, section 'Patch-embedding filters'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FilterPCA:
    components: Tensor  # (K, C_in, p, p), unit norm, sign fixed (largest-magnitude entry > 0)
    explained_variance_ratio: Tensor  # (K,)
    mean: Tensor  # (C_in, p, p), the mean filter that was subtracted (centred PCA)


def _undefined(k: int, mean: Tensor, shape: torch.Size) -> FilterPCA:
    """The PCA of filters that have no principal components: every component and ratio NaN."""
    return FilterPCA(
        components=torch.full((k, *shape), float("nan")),
        explained_variance_ratio=torch.full((k,), float("nan")),
        mean=mean.float().reshape(shape),
    )


def filter_pca(weight: Tensor, k: int = 28) -> FilterPCA:
    """PCA over the D filters of a patch embedding, weight (D, C_in, p, p). Filters are centred
    first. At most min(D, C_in * p * p) components exist.

    Filters with a NaN or infinite entry (a broken checkpoint) have no principal components:
    the SVD would fail on them (LAPACK does not converge on non-finite input), so the components
    and ratios come back NaN, with the same shapes as for finite filters, and never raise."""
    if weight.ndim != 4:
        raise ValueError(f"patch-embedding weight must be (D, C_in, p, p), got {tuple(weight.shape)}")
    D = weight.shape[0]
    X = weight.detach().double().reshape(D, -1)  # (D, C_in*p*p)
    mean = X.mean(dim=0)
    k = min(k, D, X.shape[1])
    if not bool(torch.isfinite(X).all()):
        return _undefined(k, mean, weight.shape[1:])
    try:
        _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    except torch.linalg.LinAlgError:  # did not converge (finite, but pathological): no components
        return _undefined(k, mean, weight.shape[1:])
    comps = Vh[:k]
    pivot = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, pivot[:, None]))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = S**2
    ratio = var[:k] / var.sum().clamp_min(1e-300)
    shape = weight.shape[1:]
    return FilterPCA(
        components=comps.float().reshape(k, *shape),
        explained_variance_ratio=ratio.float(),
        mean=mean.float().reshape(shape),
    )
