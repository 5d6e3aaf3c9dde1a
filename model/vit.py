"""A Vision Transformer (Dosovitskiy et al., ICLR 2021) that returns its attention probabilities.

Attention is computed explicitly as softmax(q k^T / sqrt(D)) and handed back as a value: no hooks,
no module state written during forward, so one model object can serve many threads at once.
Parameter names follow timm (patch_embed.proj, cls_token, pos_embed, blocks.i.attn.qkv, ...).

Dims: B batch, L layers, H heads, T tokens, P prefix tokens, N patches, D head dim,
C channels (embed dim), (gh, gw) patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ViTConfig
from .device import kernel_precision, precision_name
from .linear import ACTIVATIONS, Linear

HEAD_FILLS = ("zero", "mean")  # what an ablated head leaves (VisionTransformer.forward)


@dataclass
class ViTOutput:
    """What one forward pass returns.

    logits: (B, num_classes) or None for models without a classifier.
    features: (B, F) pooled representation (after pre-logits where the model has one).
    embeds: (B, projection_dim) CLIP image embeddings, or None.
    attentions: tuple of L tensors (B, H, T, T), post-softmax, rows sum to 1; None if not asked.
    attention_stack: the same maps as one (B, L, H, T, T) view without a copy, when they were
        computed without autograd; None otherwise.
    token_norms: (B, L + 1, T) L2 norm of every token of the residual stream after the
        embedding and after each block; None if not asked.
    tokens: (B, T, C) the final tokens (after the encoder's final norm where the model has one);
        None if not asked.
    """

    logits: Tensor | None
    features: Tensor
    embeds: Tensor | None = None
    attentions: tuple[Tensor, ...] | None = None
    attention_stack: Tensor | None = None
    token_norms: Tensor | None = None
    tokens: Tensor | None = None


class StemLayer(nn.Module):
    """3x3 convolution with stride 2, BatchNorm, ReLU (one layer of an early-convolution stem)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each linearly (a strided convolution).
    With `stem` widths, stride-2 conv layers come first and the projection covers what is left
    of the patch (Xiao et al. 2021); each token then sees its own patch plus a rim of a few pixels."""

    def __init__(
        self, *, patch_size: int, in_chans: int, embed_dim: int, bias: bool, stem: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        widths = (in_chans, *stem)
        self.stem = nn.Sequential(*(StemLayer(a, b) for a, b in zip(widths, widths[1:]))) if stem else None
        k = patch_size // 2 ** len(stem)
        self.proj = nn.Conv2d(widths[-1], embed_dim, k, stride=k, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
        x = self.proj(x)  # (B, C, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), row-major patch order


# How the attention probabilities are computed when they are written into a caller's block
# (Attention.sequence; VisionTransformer.set_attention_sequence):
#   "direct"  the scores go straight into the block (one baddbmm with the 1/sqrt(D) scale folded in)
#             and the softmax runs in place there: no temporary of T^2 values, no scaling pass
#   "padded"  q, k, v are laid out with the token count rounded up to a multiple of 8 (zero rows),
#             the scores and probabilities in a (T, T8) buffer whose rows are 16-byte aligned for
#             bf16/fp16 GEMM kernels (T = 197 or 577 is odd), then copied into the block: one more
#             copy of the maps, in exchange for aligned matrices. A candidate for GPUs, where
#             benchmarks/bench_gpu.py measures both; the same values within rounding.
ATTENTION_SEQUENCES = ("direct", "padded")
# Devices whose softmax is run in place (out= the input): torch's own native multi-head attention
# does so on the CPU and CUDA (_softmax_out(scores, scores)); elsewhere (MPS) a copy is made.
INPLACE_SOFTMAX_DEVICES = frozenset({"cpu", "cuda", "meta"})


class Attention(nn.Module):
    sequence: str = "direct"  # one of ATTENTION_SEQUENCES

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(
        self, x: Tensor, attn_out: Tensor | None = None, head_mask: Tensor | None = None, head_fill: str = "zero"
    ) -> tuple[Tensor, Tensor]:
        """x: (B, T, C) -> (output (B, T, C), attention probabilities (B, H, T, T)).

        attn_out: a contiguous (B, H, T, T) tensor of the scores' dtype to write the
        probabilities into (no autograd), so that a caller can keep every layer's maps in one
        block of memory without a copy.
        head_mask: (B, H) or (1, H) weights of each head's output before the projection: 1 keeps
        the head, 0 removes it (see VisionTransformer.forward); the probabilities are returned
        as computed. head_fill: what a removed head leaves, "zero" or "mean" (its output
        averaged over the tokens of the same image).

        The scores are scale * (q k^T), the scale applied by the product itself (baddbmm's alpha),
        on every path (with or without autograd or a block), so all paths give the same maps.
        """
        B, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        y = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D), a view
        if attn_out is not None and torch.is_grad_enabled():
            attn_out = None  # out= has no autograd; the caller's block is only for no-grad runs
        into_block = attn_out is not None and attn_out.dtype == y.dtype
        if into_block and self.sequence == "padded" and T % 8:
            out = self._padded(y, attn_out)
            attn = attn_out
        else:
            # one copy into (3, B*H, T, D): q, k, v are then contiguous batches for bmm
            qkv = y.reshape(3, B * H, T, D)
            q, k, v = qkv[0], qkv[1], qkv[2]
            if into_block and attn_out.device.type in INPLACE_SOFTMAX_DEVICES:
                flat = attn_out.view(B * H, T, T)
                torch.baddbmm(flat, q, k.transpose(1, 2), beta=0, alpha=self.scale, out=flat)
                attn = torch.softmax(attn_out, dim=-1, out=attn_out)
            else:  # beta=0 ignores the first argument; zeros in case a backend multiplies it anyway
                scores = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=self.scale)
                attn = scores.view(B, H, T, T).softmax(dim=-1)  # the tensor the caller gets is the graph's
                if attn_out is not None:
                    attn_out.copy_(attn)
            out = torch.bmm(attn.view(B * H, T, T), v)
        out = out.view(B, H, T, D)
        if head_mask is not None:
            m = head_mask.to(out.dtype)[:, :, None, None]  # (B, H, 1, 1)
            fill = out.mean(dim=2, keepdim=True) if head_fill == "mean" else None
            out = out * m if fill is None else out * m + fill * (1 - m)
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.proj(out), attn

    def _padded(self, y: Tensor, attn_out: Tensor) -> Tensor:
        """The "padded" sequence (ATTENTION_SEQUENCES): y (3, B, H, T, D) -> head outputs
        (B*H, T, D), the probabilities written into attn_out (B, H, T, T)."""
        _, B, H, T, D = y.shape
        Tp = -(-T // 8) * 8
        qkv = y.new_zeros(3, B * H, Tp, D)  # keys and values beyond T are zero rows
        qkv.view(3, B, H, Tp, D)[:, :, :, :T].copy_(y)
        q, k, v = qkv[0, :, :T], qkv[1], qkv[2]
        probs = torch.baddbmm(q.new_zeros(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=self.scale)  # (BH, T, Tp)
        probs[:, :, T:] = float("-inf")  # the padded keys get no mass: exp(-inf) = 0 exactly
        torch.softmax(probs, dim=-1, out=probs)
        attn_out.view(B * H, T, T).copy_(probs[:, :, :T])
        return torch.bmm(probs, v)  # padded rows of v are zero and their probabilities 0


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}")
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x, activation=self.act))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, num_heads=config.num_heads, qkv_bias=config.qkv_bias)
        self.ls1 = LayerScale(dim) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden=config.mlp_dim, act=config.act)
        self.ls2 = LayerScale(dim) if config.layer_scale else nn.Identity()

    def forward(
        self, x: Tensor, attn_out: Tensor | None = None, head_mask: Tensor | None = None, head_fill: str = "zero"
    ) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x), attn_out, head_mask, head_fill)
        x = x + self.ls1(y)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, attn


class VisionTransformer(nn.Module):
    allow_tf32: bool = False  # see __init__

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        dim = c.embed_dim
        self.patch_embed = PatchEmbed(
            patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=dim, bias=c.patch_bias, stem=c.conv_stem
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if c.distill_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.num_registers, dim)) if c.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.pos_embed_prefix + c.num_patches, dim))
        self.norm_pre = nn.LayerNorm(dim, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.Identity() if c.fc_norm else nn.LayerNorm(dim, eps=c.norm_eps)
        pooled_dim = dim * (2 if c.global_pool == "token_avg" else 1)
        self.fc_norm = nn.LayerNorm(pooled_dim, eps=c.norm_eps) if c.fc_norm else nn.Identity()
        self.pre_logits = Linear(pooled_dim, c.representation_size) if c.representation_size else None
        feat = c.feature_dim
        self.head = Linear(feat, c.num_classes) if c.num_classes else None
        self.head_dist = Linear(feat, c.num_classes) if c.distilled_head and c.num_classes else None
        self.proj = Linear(feat, c.projection_dim, bias=False) if c.projection_dim else None
        # float32 products and convolutions may run in TF32 (the "tf32" precision, CUDA only);
        # False keeps them IEEE float32 on every device (model/device.py: to_precision, TF32_GATE)
        self.allow_tf32 = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Truncated-normal init (std 0.02) as in timm/big_vision; zeros for biases."""
        if any(p.is_meta for p in self.parameters()):
            return  # built on the meta device: the weights come from a checkpoint
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0 if self.config.layer_scale else 0.0)
            elif p.ndim == 1 and ("norm" in name):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # drawn on the CPU (the generator's device): the same weights on every device
                t = torch.empty(p.shape, device="cpu").normal_(0.0, 0.02, generator=gen).clamp_(-0.04, 0.04)
                p.copy_(t)

    @property
    def precision(self) -> str:
        """ "fp32", "tf32", "bf16" or "fp16": the weights' dtype, and for float32 whether TF32 is allowed."""
        return precision_name(self.pos_embed.dtype, self.allow_tf32)

    def kernel_precision(self):
        """The context every forward (and backward) pass of this model launches its kernels in: for
        a float32 model on CUDA, the TF32 flags set to its precision (model/device.py, TF32_GATE),
        so that fp32 is IEEE float32 even where the process allows TF32. forward() enters it; a
        caller that runs the blocks itself (or a backward pass) enters it around them."""
        return kernel_precision(self.pos_embed.device, self.pos_embed.dtype, self.allow_tf32)

    def embed(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        """pixels (B, 3, H, W), normalized -> tokens (B, T, C) in [prefix, patches] order.

        keep: (B, K) patch indices (row-major, 0..N-1) to keep, after the position embeddings
        are added; the prefix tokens are always kept, so T = P + K."""
        c = self.config
        B, _, Hh, Ww = pixels.shape
        if (Hh, Ww) != c.image_size:
            raise ValueError(
                f"input is {Hh}x{Ww} but the model is configured for "
                f"{c.image_size[0]}x{c.image_size[1]}; resample the position embeddings "
                "(load_checkpoint(..., image_size=...)) to run at another size"
            )
        x = self.patch_embed(pixels)  # (B, N, C)
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        k = c.pos_embed_prefix
        x = x + self.pos_embed[:, k:]
        if keep is not None:
            x = x.gather(1, keep[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        if prefix:
            pre = torch.cat(prefix, dim=1)  # (1, P, C)
            if k:
                pre = torch.cat([pre[:, :k] + self.pos_embed[:, :k], pre[:, k:]], dim=1)
            x = torch.cat([pre.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, T, C)
        return self.norm_pre(x)

    def readout(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The last block's tokens (B, T, C) -> (final tokens after the encoder norm, pooled
        features (B, F), logits (B, classes) or None, CLIP embeddings or None)."""
        x = self.norm(x)
        feats = self.pool(x)
        if self.pre_logits is not None:
            feats = torch.tanh(self.pre_logits(feats))
        logits = None
        if self.head is not None:
            if self.head_dist is not None:
                # Distilled DeiT: class-token and distillation-token heads, averaged at inference.
                logits = (self.head(feats) + self.head_dist(x[:, 1])) / 2
            else:
                logits = self.head(feats)
        embeds = self.proj(feats) if self.proj is not None else None
        return x, feats, logits, embeds

    def pool(self, x: Tensor) -> Tensor:
        """Final tokens (B, T, C) -> pooled (B, C) or (B, 2C) for token_avg."""
        c = self.config
        P = c.num_prefix_tokens
        if c.global_pool == "avg":
            pooled = x[:, P:].mean(dim=1)
        elif c.global_pool == "token_avg":
            pooled = torch.cat([x[:, 0], x[:, P:].mean(dim=1)], dim=-1)
        else:
            pooled = x[:, 0]
        return self.fc_norm(pooled)

    def forward(
        self,
        pixels: Tensor,
        *,
        output_attentions: bool = True,
        output_token_norms: bool = False,
        output_tokens: bool = False,
        attention_out: Tensor | None = None,
        keep: Tensor | None = None,
        head_mask: Tensor | None = None,
        head_fill: str = "zero",
    ) -> ViTOutput:
        """pixels: (B, 3, H, W) normalized. Attentions stay in the autograd graph when grad is on.

        Causal probes, as arguments (values: nothing is stored on the model). Both None runs the
        plain model, bit for bit.
        keep: (K,) or (B, K) integer patch indices (row-major, 0..N-1, distinct) of the patches to
        keep in the sequence; the others are dropped after the position embeddings are added,
        the prefix tokens (class, distillation, registers) always stay. The maps are then
        (B, H, P + K, P + K), token order [prefix, keep[0], keep[1], ...].
        head_mask: (L, H) or (B, L, H) weight of each head's output before the block's output
        projection: 1 keeps it, 0 removes it (head ablation). A removed head leaves zeros
        (head_fill="zero") or its output averaged over the tokens of the same image ("mean",
        a per-image mean ablation); the projection's bias is not any head's and stays. The maps
        returned are those the heads compute, ablated or not.

        attention_out: an (L, B, H, T, T) tensor of the model's dtype and device, each layer's
        (B, H, T, T) slice contiguous and apart from the others, to write the maps into instead
        of a new block (runs without autograd or autocast only; ValueError otherwise). A caller
        analysing many batches can reuse one block (new_attention_block): a fresh block of
        hundreds of MB costs a page fault per 4 KB every time it is allocated.
        """
        with self.kernel_precision():
            return self._forward(
                pixels,
                output_attentions=output_attentions,
                output_token_norms=output_token_norms,
                output_tokens=output_tokens,
                attention_out=attention_out,
                keep=keep,
                head_mask=head_mask,
                head_fill=head_fill,
            )

    def _forward(
        self,
        pixels: Tensor,
        *,
        output_attentions: bool,
        output_token_norms: bool,
        output_tokens: bool,
        attention_out: Tensor | None,
        keep: Tensor | None,
        head_mask: Tensor | None,
        head_fill: str,
    ) -> ViTOutput:
        keep, head_mask = self._probe_arguments(pixels, keep, head_mask, head_fill)
        x = self.embed(pixels, keep)
        attentions = []
        norms = [x.norm(dim=-1)] if output_token_norms else None
        # Without autograd, every layer writes its maps into one (L, B, H, T, T) block, so that
        # callers get them stacked without another copy (a tensor made here, not module state).
        stack = None
        plain = not torch.is_grad_enabled() and not _autocast_enabled(x.device)
        if attention_out is not None and not (plain and output_attentions):
            raise ValueError("attention_out is for runs with output_attentions, without autograd or autocast")
        if output_attentions and plain:
            shape = self._attention_block_shape(x.shape[0], x.shape[1])
            if attention_out is None:
                stack = x.new_empty(shape)
            elif (
                tuple(attention_out.shape) != shape
                or attention_out.dtype != x.dtype
                or attention_out.device != x.device
                or not attention_out[0].is_contiguous()
                or attention_out.stride(0) < attention_out[0].numel()  # layers must not overlap
            ):
                raise ValueError(
                    f"attention_out must be {shape}, {x.dtype} on {x.device}, its layers contiguous and "
                    f"apart; got {tuple(attention_out.shape)}, {attention_out.dtype} on {attention_out.device}, "
                    f"strides {attention_out.stride()}"
                )
            else:
                stack = attention_out
        for i, block in enumerate(self.blocks):
            mask_i = None if head_mask is None else head_mask[:, i]
            x, attn = block(x, None if stack is None else stack[i], mask_i, head_fill)
            if output_attentions:
                attentions.append(attn)
            if norms is not None:
                norms.append(x.norm(dim=-1))
        x, feats, logits, embeds = self.readout(x)
        return ViTOutput(
            logits=logits,
            features=feats,
            embeds=embeds,
            attentions=tuple(attentions) if output_attentions else None,
            attention_stack=stack.transpose(0, 1) if stack is not None else None,
            token_norms=torch.stack(norms, dim=1) if norms is not None else None,
            tokens=x if output_tokens else None,
        )

    def _probe_arguments(
        self, pixels: Tensor, keep: Tensor | None, head_mask: Tensor | None, head_fill: str
    ) -> tuple[Tensor | None, Tensor | None]:
        """Check keep and head_mask (see forward) and bring both to a batch dimension."""
        c = self.config
        B = pixels.shape[0]
        if keep is not None:
            if keep.dtype not in (torch.int64, torch.int32) or keep.ndim not in (1, 2):
                raise ValueError(
                    f"keep must be (K,) or (B, K) integer patch indices, got {keep.dtype} {tuple(keep.shape)}"
                )
            keep = keep.to(device=pixels.device, dtype=torch.int64)
            keep = keep.expand(B, -1) if keep.ndim == 1 else keep
            if keep.shape[0] != B or keep.shape[1] > c.num_patches:
                raise ValueError(f"keep {tuple(keep.shape)} does not fit a batch of {B} with {c.num_patches} patches")
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= c.num_patches):
                raise ValueError(f"keep indices must be in 0..{c.num_patches - 1}")
            if keep.shape[1] > 1 and bool((keep.sort(dim=1).values.diff(dim=1) == 0).any()):
                raise ValueError("keep indices must be distinct")
            if keep.shape[1] == c.num_patches and bool((keep == torch.arange(c.num_patches, device=keep.device)).all()):
                keep = None  # every patch in order: the plain path, bit for bit
            elif keep.shape[1] < self.min_kept_patches:
                raise ValueError(f"this model needs at least {self.min_kept_patches} patch(es) kept (it pools patches)")
        if head_mask is not None:
            want = (c.depth, c.num_heads)
            if head_mask.ndim not in (2, 3) or tuple(head_mask.shape[-2:]) != want:
                raise ValueError(f"head_mask must be (L, H) = {want} or (B, L, H), got {tuple(head_mask.shape)}")
            head_mask = head_mask.to(pixels.device)
            head_mask = head_mask[None] if head_mask.ndim == 2 else head_mask
            if head_mask.shape[0] not in (1, B):
                raise ValueError(f"head_mask batch {head_mask.shape[0]} does not match the input's {B}")
        if head_fill not in HEAD_FILLS:
            raise ValueError(f"head_fill must be one of {HEAD_FILLS}, got {head_fill!r}")
        return keep, head_mask

    @property
    def min_kept_patches(self) -> int:
        """The fewest patches forward(keep=...) accepts: 1 where the pooled feature averages
        patches (or there is no prefix token), else 0."""
        c = self.config
        return 1 if c.global_pool in ("avg", "token_avg") or c.num_prefix_tokens == 0 else 0

    def _attention_block_shape(self, batch: int, tokens: int | None = None) -> tuple[int, ...]:
        c = self.config
        T = c.num_tokens if tokens is None else tokens
        return (c.depth, batch, c.num_heads, T, T)  # (L, B, H, T, T)

    def new_attention_block(self, batch: int, *, device=None, dtype=None, tokens: int | None = None) -> Tensor:
        """An empty (L, B, H, T, T) block for forward(attention_out=...); tokens: T when patches
        are dropped (forward's keep), P + K."""
        return torch.empty(
            self._attention_block_shape(batch, tokens),
            device=self.pos_embed.device if device is None else device,
            dtype=self.pos_embed.dtype if dtype is None else dtype,
        )

    def set_attention_sequence(self, name: str) -> None:
        """How every block computes the maps it writes into a block (ATTENTION_SEQUENCES); set once
        after loading, before the model is shared (it is read by each forward)."""
        if name not in ATTENTION_SEQUENCES:
            raise ValueError(f"attention sequence must be one of {ATTENTION_SEQUENCES}, got {name!r}")
        for block in self.blocks:
            block.attn.sequence = name

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Multiply-adds x 2 of one forward pass (matmuls only)."""
        c = self.config
        T, C, M = c.num_tokens, c.embed_dim, c.mlp_dim
        per_block = 2 * T * (3 * C * C + C * C + 2 * C * M) + 2 * 2 * T * T * C
        if c.conv_stem:  # 3x3 stride-2 layers, then the projection over what is left of a patch
            h, w = c.image_size
            widths, patch = (c.in_chans, *c.conv_stem), 0
            for a, b in zip(widths, widths[1:]):
                h, w = (h + 1) // 2, (w + 1) // 2
                patch += 2 * h * w * b * a * 9
            k = c.patch_size // 2 ** len(c.conv_stem)
            patch += 2 * c.num_patches * C * widths[-1] * k * k
        else:
            patch = 2 * c.num_patches * C * c.in_chans * c.patch_size**2
        return float(c.depth * per_block + patch)


def _autocast_enabled(device: torch.device) -> bool:
    """torch.is_autocast_enabled for the device's type; False for types without autocast (meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def attention_memory_bytes(config: ViTConfig, *, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes needed to keep every attention map: B * L * H * T^2 values."""
    return batch * config.depth * config.num_heads * config.num_tokens**2 * bytes_per_value


def _sincos_1d(dim: int, pos: Tensor, temperature: float) -> Tensor:
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_pos_embed(dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision style), shape (N, dim)."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb_y = _sincos_1d(dim // 2, yy.flatten(), temperature)
    emb_x = _sincos_1d(dim // 2, xx.flatten(), temperature)
    return torch.cat([emb_x, emb_y], dim=1).float()


__all__ = [
    "ATTENTION_SEQUENCES",
    "HEAD_FILLS",
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "ViTOutput",
    "VisionTransformer",
    "attention_memory_bytes",
    "sincos_2d_pos_embed",
]
