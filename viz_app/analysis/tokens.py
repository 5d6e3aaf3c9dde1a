"""Token norms per layer and high-norm outlier tokens (Darcet et al. 2024, 'registers'), and the
token budgets: where each head's attention goes among the prefix tokens and the high-norm patches.

Definition: docs/DEFINITIONS.md, sections 'Token norms and high-norm outliers' and 'Token budgets'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import chunks

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


def _layer_budget(a: Tensor, high: Tensor, num_prefix: int, queries: str, readout_tokens: tuple[int, ...]) -> Tensor:
    """The budgets of one layer of k images: a (k, H, T, T) attention, high (k, N) bool ->
    (k, H, P + 1) float32 (token_budgets' definition).

    The mean over the chosen queries i of A[i, j] / sum_k A[i, k] is, for every key j at once, one
    row vector times the rows (weights 1 / (n * sum_k A[i, k])): the shares of all keys, of which the
    prefix keys are read and the high-norm patch keys summed. One product per layer instead of a
    matrix-vector product per query row and key set; no (k, H, T, T) temporary for float32 input.
    """
    P = num_prefix
    if queries == "readout" and readout_tokens:
        rows = a[..., list(readout_tokens), :]  # readout_rows(readout="auto"): their mean
    elif queries == "all":
        rows = a
    else:  # the patch queries ("patches", or "readout" for a model that reads no prefix token)
        rows = a[..., P:, :]
    rows = rows.float()
    weights = (1.0 / rows.shape[-2]) / rows.sum(dim=-1).clamp_min(1e-30)  # (k, H, n); total 1 for post-softmax rows
    shares = (weights.unsqueeze(-2) @ rows).squeeze(-2)  # (k, H, T): each key's mean share
    high_share = (shares[..., P:] * high[:, None, :].to(shares.dtype)).sum(dim=-1, keepdim=True)
    return torch.cat([shares[..., :P], high_share], dim=-1)


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
    attention row makes that row's budgets NaN. Works one layer of a few images at a time (no full-size
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
    # one layer of a few images at a time: a float32 copy of a bf16 layer stays near CHUNK_VALUES
    step = max(1, chunks.CHUNK_VALUES // max(1, H * T * T))
    flat_out = out.view(-1, L, H, P + 1)
    for layer in range(L):
        maps = attn[..., layer, :, :, :].reshape(-1, H, T, T)  # a view of the model's block (L outermost)
        flags = high[..., layer, :].reshape(-1, T - P)
        for i in range(0, maps.shape[0], step):
            flat_out[i : i + step, layer] = _layer_budget(
                maps[i : i + step], flags[i : i + step], P, queries, tuple(readout_tokens)
            )
    out[..., P] = out[..., P].masked_fill(undefined[..., None], float("nan"))
    return out


def budget_names(config) -> list[str]:
    """The P + 1 column names of token_budgets for a model config: its prefix tokens ('cls', 'dist',
    'reg0', ...), then 'high-norm patches'."""
    return [*config.prefix_names, HIGH_NORM_NAME]
