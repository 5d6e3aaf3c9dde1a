"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021): layer-wise relevance propagation through
the model, weighted by the attention gradients, rolled out over the layers.

Definition: docs/DEFINITIONS.md, section 'Transformer Attribution (LRP)'. In short, for one image and
a target class c:

1. relevance R = one-hot(c) at the logits is propagated back to every block's attention
   probabilities with the LRP rules of the authors' code (alpha = 1, beta = 0 for every linear map,
   identity for LayerNorm, activations, softmax and LayerScale, the 'simple' rule x * d(z)/dx * R / z
   for products and selections, a rescaled split for every residual sum, a sum for every copy);
2. per layer l, M_l = mean over heads of max(0, dy_c/dA_l * R(A_l)), (T, T);
3. the map is the read-out row of (M_{L-1} + I) ... (M_s + I) over the patches (s = start_layer),
   without any row normalisation.

Nothing is written to the model: a functional forward pass runs with the model's own parameters
(detached, cast to float32), records what the rules need, is checked against model(pixels).logits,
and gives the attention gradients by autograd from the same pass. No hooks, no .grad on parameters.

Shapes: B batch, L layers, H heads, T tokens, P prefix tokens, N = gh * gw patches, C width, D head
dim; token order [class, distillation, registers..., patches row-major].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.linear import ACTIVATIONS
from model.vit import Block, LayerScale, VisionTransformer

from .attention import readout_rows

# The stabiliser of every division of the rules: z -> z + EPS, and 0 / 0 -> 0 (the authors'
# safe_divide: a / (b + 1e-9), zero where b == 0).
EPS = 1e-9
# How far the functional forward pass may stray from model(pixels).logits, as a share of the
# logits' largest magnitude (plus the same share of 1e-3 for models whose logits are all ~0):
# float32 differs only by the order of operations; TF32, bfloat16 and float16 models run their
# own forward in that precision while this one is float32, a few percent apart after 12 blocks.
# A mismatch beyond these is a model this module does not mirror (a RuntimeError).
LOGIT_TOLERANCE = {"fp32": 1e-3, "tf32": 3e-2, "bf16": 0.15, "fp16": 0.15}


@dataclass
class LRPTrace:
    """What one propagation computes, in the compute dtype (float32; float64 for a float64 model).

    logits: (B, classes) of the functional forward pass.
    target: (B,) the classes whose relevance was propagated.
    matrices: (B, L, T, T) per layer, mean over heads of max(0, gradient * relevance).
    attentions, gradients, relevances: (B, L, H, T, T) the attention probabilities, d logit[target] /
        d attention, and the LRP relevance of the attention probabilities (the authors' attn_cam);
        None unless asked for (heads=True).
    token_relevance: (B, T, C) relevance at the input of block 0 (what the rules leave of the
        one-hot after every block; its sum per image is 1 where the rules conserve).
    """

    logits: Tensor
    target: Tensor
    matrices: Tensor
    token_relevance: Tensor
    attentions: Tensor | None = None
    gradients: Tensor | None = None
    relevances: Tensor | None = None


# ---- the rules -------------------------------------------------------------------------------


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / (den + EPS), 0 where den == 0 (EPS alone where den + EPS is exactly 0)."""
    d = den + EPS
    d.masked_fill_(d == 0, EPS)
    return (num / d).masked_fill_(den == 0, 0.0)


def _linear_rule(x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    """LRP alpha = 1, beta = 0 through y = x w^T (+ bias, which takes no relevance): each input gets
    its share of the positive contributions, x+ w+ and x- w-.  x (..., in), w (out, in), r (..., out)."""
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s = _safe_div(r, F.linear(xp, wp) + F.linear(xn, wn))
    return xp * (s @ wp) + xn * (s @ wn)


def _per_image(t: Tensor) -> Tensor:
    """Sum over everything but the batch dimension: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _add_rule(a_in: Tensor, b_in: Tensor, z: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """z = a_in + b_in (given, as the forward pass computed it). Each summand first gets x * r / z,
    then both are rescaled so that their totals split r's total in the ratio of their absolute
    totals: the authors' Add rule, with the totals taken per image (theirs: over the whole tensor,
    the same for one image)."""
    s = _safe_div(r, z)
    a, b = a_in * s, b_in * s
    a_sum, b_sum = _per_image(a), _per_image(b)
    both = a_sum.abs() + b_sum.abs()
    r_sum = _per_image(r)
    shape = (-1,) + (1,) * (r.ndim - 1)
    a = a * _safe_div(_safe_div(a_sum.abs(), both) * r_sum, a_sum).view(shape)
    b = b * _safe_div(_safe_div(b_sum.abs(), both) * r_sum, b_sum).view(shape)
    return a, b


def _copy_rule(x: Tensor, *rs: Tensor) -> Tensor:
    """A tensor used twice (a residual stream's copy): x * sum_i r_i / x."""
    total = _safe_div(rs[0], x)
    for r in rs[1:]:
        total = total + _safe_div(r, x)
    return x * total


# ---- the functional forward pass --------------------------------------------------------------


@dataclass
class _BlockRecord:
    """One block's tensors that the rules read (compute dtype, detached). Token-major (B, T, .)
    unless stated; q, k, v, heads (B, H, T, D); attn (B, H, T, T)."""

    x_in: Tensor
    n1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor
    heads: Tensor
    heads_flat: Tensor
    branch1: Tensor  # ls1(proj(heads)): what the first residual sum adds
    x_mid: Tensor
    n2: Tensor
    hidden: Tensor  # act(fc1(n2)), the input of fc2
    branch2: Tensor  # ls2(fc2(hidden))
    x_out: Tensor


@dataclass
class _ReadoutRecord:
    xn: Tensor  # (B, T, C) after the encoder norm
    pooled_raw: Tensor  # (B, C) or (B, 2C): the pooling before fc_norm
    pooled: Tensor  # after fc_norm
    feats: Tensor  # after pre-logits (tanh), what the head reads
    head: Tensor  # (B, classes) head(feats)
    head_dist: Tensor | None  # (B, classes) head_dist(xn[:, 1]), distilled DeiT
    logits: Tensor


def _w(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A parameter, detached, in the compute dtype (the same tensor when it already is)."""
    return None if p is None else p.detach().to(dtype)


def _norm(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        dt = x.dtype
        return F.layer_norm(x, module.normalized_shape, _w(module.weight, dt), _w(module.bias, dt), module.eps)
    if isinstance(module, nn.Identity):
        return x
    raise TypeError(f"transformer_attribution does not know the norm {type(module).__name__}")


def _scale(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, LayerScale):
        return x * _w(module.gamma, x.dtype)
    if isinstance(module, nn.Identity):
        return x
    raise TypeError(f"transformer_attribution does not know the layer scale {type(module).__name__}")


def _linear(module: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, _w(module.weight, x.dtype), _w(module.bias, x.dtype))


def _block_forward(block: Block, x: Tensor) -> tuple[Tensor, Tensor, _BlockRecord]:
    """x (B, T, C) -> (output, attention probabilities (B, H, T, T) in the autograd graph, record)."""
    attn_mod = block.attn
    B, T, C = x.shape
    H = attn_mod.num_heads
    D = C // H
    n1 = _norm(block.norm1, x)
    qkv = _linear(attn_mod.qkv, n1).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = torch.baddbmm(
        q.new_zeros(1, 1, 1),
        q.reshape(B * H, T, D),
        k.reshape(B * H, T, D).transpose(1, 2),
        beta=0,
        alpha=attn_mod.scale,
    )
    attn = scores.view(B, H, T, T).softmax(dim=-1)
    heads = attn @ v  # (B, H, T, D)
    heads_flat = heads.transpose(1, 2).reshape(B, T, C)
    branch1 = _scale(block.ls1, _linear(attn_mod.proj, heads_flat))
    x_mid = x + branch1
    n2 = _norm(block.norm2, x_mid)
    hidden = ACTIVATIONS[block.mlp.act](_linear(block.mlp.fc1, n2))
    branch2 = _scale(block.ls2, _linear(block.mlp.fc2, hidden))
    x_out = x_mid + branch2
    d = [t.detach() for t in (x, n1, q, k, v, attn, heads, heads_flat, branch1, x_mid, n2, hidden, branch2, x_out)]
    return x_out, attn, _BlockRecord(*d)


def _embed(model: VisionTransformer, pixels: Tensor, dt: torch.dtype) -> Tensor:
    """VisionTransformer.embed, functionally in dtype dt: pixels (B, 3, H, W) -> tokens (B, T, C)."""
    c = model.config
    if tuple(pixels.shape[-2:]) != c.image_size:
        (h, w), (mh, mw) = pixels.shape[-2:], c.image_size
        raise ValueError(f"input is {h}x{w} but the model is configured for {mh}x{mw}")
    pe = model.patch_embed
    x = pixels.to(dt)
    for layer in pe.stem if pe.stem is not None else ():
        conv, bn = layer.conv, layer.norm
        x = F.conv2d(x, _w(conv.weight, dt), _w(conv.bias, dt), conv.stride, conv.padding)
        x = F.batch_norm(
            x, _w(bn.running_mean, dt), _w(bn.running_var, dt), _w(bn.weight, dt), _w(bn.bias, dt), False, 0.0, bn.eps
        )
        x = F.relu(x)
    proj = pe.proj
    x = F.conv2d(x, _w(proj.weight, dt), _w(proj.bias, dt), proj.stride, proj.padding)
    x = x.flatten(2).transpose(1, 2)  # (B, N, C)
    pos = _w(model.pos_embed, dt)
    k = c.pos_embed_prefix
    x = x + pos[:, k:]
    prefix = [_w(t, dt) for t in (model.cls_token, model.dist_token, model.reg_token) if t is not None]
    if prefix:
        pre = torch.cat(prefix, dim=1)  # (1, P, C)
        if k:
            pre = torch.cat([pre[:, :k] + pos[:, :k], pre[:, k:]], dim=1)
        x = torch.cat([pre.expand(x.shape[0], -1, -1), x], dim=1)
    return _norm(model.norm_pre, x)


def _pool(model: VisionTransformer, xn: Tensor) -> Tensor:
    """VisionTransformer.pool without fc_norm: (B, T, C) -> (B, C) or (B, 2C)."""
    c = model.config
    P = c.num_prefix_tokens
    if c.global_pool == "avg":
        return xn[:, P:].mean(dim=1)
    if c.global_pool == "token_avg":
        return torch.cat([xn[:, 0], xn[:, P:].mean(dim=1)], dim=-1)
    return xn[:, 0]


def _readout_forward(model: VisionTransformer, x: Tensor) -> _ReadoutRecord:
    """VisionTransformer.readout, functionally: the last block's tokens -> logits and what led there."""
    xn = _norm(model.norm, x)
    pooled_raw = _pool(model, xn)
    pooled = _norm(model.fc_norm, pooled_raw)
    feats = torch.tanh(_linear(model.pre_logits, pooled)) if model.pre_logits is not None else pooled
    head = _linear(model.head, feats)
    head_dist = _linear(model.head_dist, xn[:, 1]) if model.head_dist is not None else None
    logits = head if head_dist is None else (head + head_dist) / 2
    return _ReadoutRecord(xn, pooled_raw, pooled, feats, head, head_dist, logits)


# ---- relevance back through the read-out and the blocks ---------------------------------------


def _readout_relevance(model: VisionTransformer, rec: _ReadoutRecord, target: Tensor) -> Tensor:
    """One-hot at the target logits -> relevance of the last block's output tokens (B, T, C).

    Head (and head_dist) by the linear rule, the two heads of a distilled DeiT split by the residual
    rule of their sum, pre-logits by the linear rule (tanh as identity), fc_norm and the encoder norm
    as identity, the pooling by the simple rule xn * d(pool)/d(xn) . r / pool (for 'token' the
    authors' IndexSelect rule: all into the class token)."""
    dt = rec.logits.dtype
    r = torch.zeros_like(rec.logits)
    r.scatter_(1, target[:, None], 1.0)
    if rec.head_dist is not None:
        r_head, r_dist = _add_rule(rec.head / 2, rec.head_dist / 2, rec.logits, r)
    else:
        r_head, r_dist = r, None
    r_pool = _linear_rule(rec.feats, _w(model.head.weight, dt), r_head)
    if model.pre_logits is not None:
        r_pool = _linear_rule(rec.pooled, _w(model.pre_logits.weight, dt), r_pool)
    s = _safe_div(r_pool, rec.pooled_raw)  # fc_norm as identity
    xn = rec.xn
    grad = torch.zeros_like(xn)  # d(pool)/d(xn)^T s
    c = model.config
    P, C = c.num_prefix_tokens, c.embed_dim
    if c.global_pool == "avg":
        grad[:, P:] = (s / (xn.shape[1] - P))[:, None]
    elif c.global_pool == "token_avg":
        grad[:, 0] = s[:, :C]
        grad[:, P:] = (s[:, C:] / (xn.shape[1] - P))[:, None]
    else:
        grad[:, 0] = s
    r_tokens = xn * grad
    if r_dist is not None:
        r_x1 = _linear_rule(xn[:, 1], _w(model.head_dist.weight, dt), r_dist)
        r_tokens[:, 1] += xn[:, 1] * _safe_div(r_x1, xn[:, 1])
    return r_tokens  # the encoder norm as identity


def _block_relevance(block: Block, rec: _BlockRecord, r_out: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of the block's output (B, T, C) -> (relevance of its attention probabilities
    (B, H, T, T), relevance of its input (B, T, C))."""
    dt = r_out.dtype
    attn_mod = block.attn
    B, T, C = r_out.shape
    H = attn_mod.num_heads
    D = C // H
    # second residual: x_out = x_mid + ls2(mlp(norm2(x_mid)))
    r_res, r_branch = _add_rule(rec.x_mid, rec.branch2, rec.x_out, r_out)
    r_hidden = _linear_rule(rec.hidden, _w(block.mlp.fc2.weight, dt), r_branch)  # ls2 as identity
    r_n2 = _linear_rule(rec.n2, _w(block.mlp.fc1.weight, dt), r_hidden)  # activation as identity
    r_mid = _copy_rule(rec.x_mid, r_res, r_n2)  # norm2 as identity
    # first residual: x_mid = x_in + ls1(attn(norm1(x_in)))
    r_res, r_branch = _add_rule(rec.x_in, rec.branch1, rec.x_mid, r_mid)
    r_heads = _linear_rule(rec.heads_flat, _w(attn_mod.proj.weight, dt), r_branch)  # ls1 as identity
    r_heads = r_heads.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    # heads = A v: half of the relevance to each factor
    s = _safe_div(r_heads, rec.heads)
    r_attn = rec.attn * (s @ rec.v.transpose(-1, -2)) / 2
    r_v = rec.v * (rec.attn.transpose(-1, -2) @ s) / 2
    # softmax as identity; the scores q k^T (unscaled): half to each factor
    s = _safe_div(r_attn, rec.q @ rec.k.transpose(-1, -2))
    r_q = rec.q * (s @ rec.k) / 2
    r_k = rec.k * (s.transpose(-1, -2) @ rec.q) / 2
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * C)  # (B, T, (3 H D))
    r_n1 = _linear_rule(rec.n1, _w(attn_mod.qkv.weight, dt), r_qkv)
    return r_attn, _copy_rule(rec.x_in, r_res, r_n1)  # norm1 as identity


# ---- public functions ---------------------------------------------------------------------------


def _check_logits(model: VisionTransformer, pixels: Tensor, ours: Tensor) -> None:
    """The functional forward pass must give the model's own logits (LOGIT_TOLERANCE)."""
    with torch.no_grad():
        theirs = model(pixels, output_attentions=False).logits.to(ours.dtype)
    ours = ours.detach()
    both = torch.isfinite(ours) & torch.isfinite(theirs)
    if not both.any():
        return
    share = LOGIT_TOLERANCE.get(model.precision, LOGIT_TOLERANCE["fp32"])
    scale = float(theirs[both].abs().max()) + 1e-3
    gap = float((ours - theirs)[both].abs().max())
    if gap > share * scale:
        raise RuntimeError(
            f"transformer_attribution's forward pass does not reproduce the model's logits (largest "
            f"difference {gap:.3g}, allowed {share * scale:.3g} for {model.precision}): the model has a "
            "part this analysis does not mirror"
        )


def lrp_trace(model: VisionTransformer, pixels: Tensor, target: Tensor, *, heads: bool = False) -> LRPTrace:
    """The LRP propagation of Transformer Attribution for the target classes, every layer.

    pixels (B, 3, H, W) on the model's device and dtype, target (B,) class indices. Computes in
    float32 (float64 for a float64 model) from the pixels on (relevance is not propagated into the
    patch embedding, but its tokens are computed in that precision too). heads: also keep the per-head attention
    probabilities, gradients and relevances (B, L, H, T, T) each. See LRPTrace.
    """
    if model.head is None:
        raise ValueError(
            "Transformer Attribution needs a model with a classifier head (num_classes > 0): "
            "relevance starts at a class logit"
        )
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    num_classes = model.head.out_features
    target = torch.as_tensor(target, device=pixels.device).long()
    if target.shape != (pixels.shape[0],) or (target < 0).any() or (target >= num_classes).any():
        raise ValueError(f"target classes must be (B,) = ({pixels.shape[0]},) in 0..{num_classes - 1}")
    dt = torch.float64 if model.pos_embed.dtype == torch.float64 else torch.float32
    L = len(model.blocks)
    # a caller in inference mode gets the same: the graph is built outside it, from copies
    with torch.inference_mode(False), model.kernel_precision():
        target = target.clone()
        with torch.no_grad():
            x = _embed(model, pixels, dt)
        # the graph starts at the tokens (not at the parameters: they are read detached), so that
        # autograd gives d logit / d A for every layer's A, through all the later layers
        x.requires_grad_(True)
        records, attns = [], []
        with torch.enable_grad():
            for block in model.blocks:
                x, attn, rec = _block_forward(block, x)
                records.append(rec)
                attns.append(attn)
            out = _readout_forward(model, x)
            chosen = out.logits.gather(1, target[:, None]).sum()
            grads = torch.autograd.grad(chosen, attns, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for g, a in zip(grads, attns)]
        attns = [a.detach() for a in attns]
        out = _ReadoutRecord(*(None if t is None else t.detach() for t in vars(out).values()))
        del chosen, x  # the graph is no longer needed
        _check_logits(model, pixels, out.logits)
        with torch.no_grad():
            r = _readout_relevance(model, out, target)
            mats: list[Tensor | None] = [None] * L
            rels: list[Tensor | None] = [None] * L
            for i in reversed(range(L)):
                r_attn, r = _block_relevance(model.blocks[i], records[i], r)
                records[i] = None  # free as we go
                mats[i] = (grads[i] * r_attn).clamp(min=0).mean(dim=1)
                if heads:
                    rels[i] = r_attn
    return LRPTrace(
        logits=out.logits,
        target=target,
        matrices=torch.stack(mats, dim=1),
        token_relevance=r,
        attentions=torch.stack(attns, dim=1) if heads else None,
        gradients=torch.stack(grads, dim=1) if heads else None,
        relevances=torch.stack(rels, dim=1) if heads else None,
    )


def attribution_rollout(
    matrices: Tensor,
    *,
    num_prefix: int,
    grid: tuple[int, int],
    readout_tokens: tuple[int, ...] = (0,),
    readout: str = "auto",
    start_layer: int = 0,
) -> Tensor:
    """(B, L, T, T) per-layer relevance matrices -> (B, gh, gw): the read-out row of
    (M[L-1] + I) @ ... @ (M[start_layer] + I) over the patches, no row normalisation (the
    authors' compute_rollout_attention of ViT_LRP.py). Only that row is carried, from the left."""
    if matrices.ndim != 4 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"matrices must be (B, L, T, T), got {tuple(matrices.shape)}")
    L, T = matrices.shape[1], matrices.shape[-1]
    if not 0 <= start_layer < L:
        raise ValueError(f"start_layer must be in 0..{L - 1}, got {start_layer}")
    eye = torch.eye(T, device=matrices.device, dtype=matrices.dtype)
    row = readout_rows(matrices[:, -1] + eye, num_prefix=num_prefix, readout_tokens=readout_tokens, readout=readout)
    for layer in reversed(range(start_layer, L - 1)):
        row = torch.bmm(row[:, None, :], matrices[:, layer] + eye)[:, 0]
    return row[:, num_prefix:].reshape(-1, *grid)


def transformer_attribution(
    model: VisionTransformer, pixels: Tensor, target: Tensor, *, start_layer: int = 0
) -> Tensor:
    """Transformer Attribution (Chefer et al., CVPR 2021) of the target classes, (B, gh, gw) float32.

    pixels (B, 3, H, W) on the model's device and dtype, target (B,) class indices. The raw values of
    the read-out row (class token; class and distillation tokens averaged for a distilled DeiT;
    mean of the patch rows for average pooling), as the authors return them, not normalised.
    start_layer: the first layer of the rollout. Each image's map is the one it gets alone."""
    c = model.config
    if not 0 <= start_layer < c.depth:
        raise ValueError(f"start_layer must be in 0..{c.depth - 1}, got {start_layer}")
    trace = lrp_trace(model, pixels, target)
    m = attribution_rollout(
        trace.matrices,
        num_prefix=c.num_prefix_tokens,
        grid=c.grid,
        readout_tokens=c.readout_tokens,
        start_layer=start_layer,
    )
    return m.float()
