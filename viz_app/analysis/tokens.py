"""Token norms per layer and high-norm outlier tokens (Darcet et al. 2024, 'registers'), and the
token budgets: where each head's attention goes among the prefix tokens and the high-norm patches.

Definition: docs/DEFINITIONS.md, sections 'Token norms and high-norm outliers' and 'Token budgets'.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .attention import readout_rows

QUERIES = ("patches", "readout", "all")
HIGH_NORM_NAME = "high-norm patches"


def token_norm_outliers(norms: Tensor, *, num_prefix: int, factor: float = 2.0) -> Tensor:
    """Patch tokens whose norm exceeds `factor` x the median patch-token norm of their layer (for
    an even number of patches, the mean of the two middle norms).

    norms: (..., L+1, T) -> bool (..., L+1, N) over patch tokens.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    patches = norms[..., num_prefix:].float()
    # the median of an even count is the mean of the two middle values (torch.median would take
    # the lower one); a NaN norm makes it NaN, so that no patch of that layer is flagged
    ranked = patches.sort(dim=-1).values
    N = ranked.shape[-1]
    median = (ranked[..., (N - 1) // 2 : (N - 1) // 2 + 1] + ranked[..., N // 2 : N // 2 + 1]) / 2
    median = median.masked_fill(patches.isnan().any(dim=-1, keepdim=True), float("nan"))
    return patches > factor * median


def _layer_budget(a: Tensor, high: Tensor, num_prefix: int) -> Tensor:
    """Per-query budgets of one layer: a (H, T, T) attention, high (N,) bool -> (H, T, P + 1) float32.

    b[h, i, j] = A[i, j] / sum_k A[i, k] for prefix keys j < P; b[h, i, P] = the same share summed over the
    high-norm patch keys. One pass over the layer; no (H, T, T) temporary for float32 input.
    """
    P = num_prefix
    a = a.float()
    total = a.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # (H, T, 1); 1 for post-softmax rows
    weights = torch.zeros(a.shape[-1], dtype=a.dtype, device=a.device)
    weights[P:] = high.to(a.dtype)
    high_mass = (a @ weights)[..., None]  # (H, T, 1)
    return torch.cat([a[..., :P], high_mass], dim=-1) / total


def token_budgets(
    attn: Tensor,
    token_norms: Tensor,
    *,
    num_prefix: int,
    factor: float = 2.0,
    queries: str = "patches",
    readout_tokens: tuple[int, ...] | None = None,
) -> Tensor:
    """Share of each head's attention on each prefix token and on the high-norm patch tokens.

    attn: (..., L, H, T, T) post-softmax; token_norms: (..., L+1, T) (row 0 after the embedding, row l
    after block l) -> (..., L, H, P + 1) float32, P = num_prefix:

        budget[..., l, h, j] = mean over the chosen queries i of A[i, j] / sum_k A[i, k]     (j < P)
        budget[..., l, h, P] = mean over the chosen queries i of sum over high-norm patch keys j of
                               A[i, j] / sum_k A[i, k]

    The high-norm patches of layer l are those of its INPUT: token_norm_outliers(token_norms, num_prefix,
    factor)[..., l, :], l = 0 .. L-1 (for layer 1, the embedding's output). For post-softmax rows the
    denominator is 1 (dividing keeps low-precision rows exact shares, as prefix_mass_share does).

    queries: "patches": the N patch queries (rows P .. T-1), each weighted 1/N; the first P columns then
    sum to prefix_mass_share. "readout": the read-out row of readout_rows(readout="auto"): the mean over
    `readout_tokens` (the tokens the classifier reads, config.readout_tokens; None: the class token, token 0,
    when num_prefix > 0, else none), the patch queries when there are none. "all": all T queries.

    A layer whose patch norms hold a NaN has no defined median: its high-norm column is NaN. A NaN in an
    attention row makes that row's budgets NaN. Works one layer of one image at a time (no full-size
    temporary); the inputs are not modified.
    """
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    if attn.ndim < 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (..., L, H, T, T), got {tuple(attn.shape)}")
    lead, (L, H, T) = attn.shape[:-4], attn.shape[-4:-1]
    if tuple(token_norms.shape) != (*lead, L + 1, T):
        raise ValueError(
            f"token_norms must be {(*lead, L + 1, T)} for attn {tuple(attn.shape)}, got {tuple(token_norms.shape)}"
        )
    P = num_prefix
    if not 0 <= P < T:
        raise ValueError(f"num_prefix must be in [0, {T - 1}], got {P}")
    if readout_tokens is None:
        readout_tokens = (0,) if P > 0 else ()
    if any(not 0 <= t < P for t in readout_tokens):
        raise ValueError(f"readout tokens {readout_tokens} must be prefix tokens (0 .. {P - 1})")
    high = token_norm_outliers(token_norms, num_prefix=P, factor=factor)[..., :L, :]  # (..., L, N)
    undefined = torch.isnan(token_norms[..., :L, P:]).any(dim=-1)  # (..., L): no median
    out = torch.empty((*lead, L, H, P + 1), dtype=torch.float32, device=attn.device)
    for idx in itertools.product(*(range(n) for n in lead)):
        for layer in range(L):
            b = _layer_budget(attn[idx + (layer,)], high[idx + (layer,)], P)  # (H, T, P + 1)
            if queries == "patches":
                row = b[..., P:, :].mean(dim=-2)
            elif queries == "all":
                row = b.mean(dim=-2)
            else:
                row = readout_rows(b, num_prefix=P, readout_tokens=tuple(readout_tokens), readout="auto")
            out[idx + (layer,)] = row
    out[..., P] = out[..., P].masked_fill(undefined[..., None], float("nan"))
    return out


def budget_names(config) -> list[str]:
    """The P + 1 column names of token_budgets for a model config: its prefix tokens ('cls', 'dist',
    'reg0', ...), then 'high-norm patches'."""
    return [*config.prefix_names, HIGH_NORM_NAME]
