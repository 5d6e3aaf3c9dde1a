"""Build a ViTConfig from tensor shapes plus whatever a config file states (the hints)."""

from __future__ import annotations

import math
import re

from torch import Tensor

from ..config import ViTConfig
from ..errors import CheckpointError

# Widths whose heads are not width / 64 (ViT-H/14: 16 heads of 80; ViT-g/14: 16 of 88; ViT-G: 16 of 104).
HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def heads_for_width(width: int) -> int:
    return HEADS_BY_WIDTH.get(width, max(1, width // 64))


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n and n > 0 else None


def pos_layout(
    pos_tokens: int,
    *,
    num_prefix: int,
    patch_size: int,
    image_size: tuple[int, int] | None,
    pos_embed_prefix: int | None,
) -> tuple[int, tuple[int, int]]:
    """-> (how many prefix tokens the stored position embedding covers, its patch grid)."""
    ks = [pos_embed_prefix] if pos_embed_prefix is not None else [num_prefix, 0, *range(1, num_prefix)]
    for k in ks:
        n = pos_tokens - k
        if image_size is not None:
            grid = (image_size[0] // patch_size, image_size[1] // patch_size)
            if grid[0] * grid[1] == n:
                return k, grid
        side = _square_side(n)
        if side:
            return k, (side, side)
    raise CheckpointError(
        f"cannot tell the patch grid of a position embedding with {pos_tokens} rows "
        f"({num_prefix} prefix tokens); give the model's image size"
    )


def infer_config(
    state: dict[str, Tensor],
    hints: dict,
) -> tuple[ViTConfig, tuple[int, int]]:
    """-> (config at the checkpoint's own resolution, the stored position-embedding grid).

    hints: ViTConfig fields stated by a config file; they win over what shapes suggest.
    """
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("no patch embedding (patch_embed.proj.weight) in checkpoint")
    pw = state["patch_embed.proj.weight"]
    if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise CheckpointError(f"patch embedding has shape {tuple(pw.shape)}; expected (C, 3, p, p)")
    width, in_chans, p = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    # an early-convolution stem: stride-2 layers before the projection (ViT Lens' conv_stem)
    stem = []
    while (conv := state.get(f"patch_embed.stem.{len(stem)}.conv.weight")) is not None:
        stem.append(conv)
    if stem:
        in_chans, p = int(stem[0].shape[1]), p * 2 ** len(stem)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("checkpoint has no transformer blocks")
    depth = max(blocks) + 1
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    cfg: dict = {
        "patch_size": p,
        "in_chans": in_chans,
        "conv_stem": tuple(int(w.shape[0]) for w in stem),
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads_for_width(width),
        "mlp_dim": int(fc1.shape[0]) if fc1 is not None else 4 * width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "patch_bias": "patch_embed.proj.bias" in state,
        "class_token": "cls_token" in state,
        "distill_token": "dist_token" in state,
        "num_registers": int(state["reg_token"].shape[1]) if "reg_token" in state else 0,
        "pre_norm": "norm_pre.weight" in state,
        "layer_scale": "blocks.0.ls1.gamma" in state,
        "fc_norm": "fc_norm.weight" in state,
        "distilled_head": "head_dist.weight" in state,
    }
    if "pre_logits.weight" in state:
        cfg["representation_size"] = int(state["pre_logits.weight"].shape[0])
    if "head.weight" in state:
        cfg["num_classes"] = int(state["head.weight"].shape[0])
    if "proj.weight" in state:
        cfg["projection_dim"] = int(state["proj.weight"].shape[0])
    head_in = state["head.weight"].shape[1] if "head.weight" in state else None
    if cfg["fc_norm"] or not cfg["class_token"]:
        cfg["global_pool"] = "avg"
    elif head_in == 2 * width and not cfg.get("representation_size"):
        cfg["global_pool"] = "token_avg"
    cfg.update({k: v for k, v in hints.items() if k not in ("image_size", "pos_embed_prefix")})
    num_prefix = int(cfg["class_token"]) + int(cfg["distill_token"]) + cfg["num_registers"]
    if "pos_embed" not in state:
        raise CheckpointError("checkpoint has no position embedding (pos_embed)")
    pe = state["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != width:
        raise CheckpointError(f"position embedding has shape {tuple(pe.shape)}; expected (1, T, {width})")
    p = cfg["patch_size"]
    k, grid = pos_layout(
        int(pe.shape[1]),
        num_prefix=num_prefix,
        patch_size=p,
        image_size=hints.get("image_size"),
        pos_embed_prefix=hints.get("pos_embed_prefix"),
    )
    cfg["pos_embed_prefix"] = k
    cfg["image_size"] = (grid[0] * p, grid[1] * p)
    try:
        return ViTConfig(**cfg), grid
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not describe a valid ViT: {e}") from None
