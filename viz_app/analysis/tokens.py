"""Token norms per layer and high-norm outlier tokens (Darcet et al. 2024, 'registers').

Definition: docs/DEFINITIONS.md, section 'Token norms and high-norm outliers'.
"""

from __future__ import annotations

from torch import Tensor


def token_norm_outliers(norms: Tensor, *, num_prefix: int, factor: float = 2.0) -> Tensor:
    """Patch tokens whose norm exceeds `factor` x the median patch-token norm of their layer.

    norms: (..., L+1, T) -> bool (..., L+1, N) over patch tokens.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    patches = norms[..., num_prefix:].float()
    median = patches.median(dim=-1, keepdim=True).values
    return patches > factor * median
