"""Build a ViTConfig from tensor shapes plus whatever a config file states (the hints)."""

from __future__ import annotations

import math
import re

from torch import Tensor

from ..config import (
    MAX_DEPTH,
    MAX_STEM_LAYERS,
    MAX_TOKENS,
    VIT_FIELD_CHECKS,
    ConfigValueError,
    ViTConfig,
    check_vit_field,
    shown,
)
from ..errors import CheckpointError

# Widths whose heads are not width / 64 (ViT-H/14: 16 heads of 80; ViT-g/14: 16 of 88; ViT-G: 16 of 104).
HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def heads_for_width(width: int) -> int:
    return HEADS_BY_WIDTH.get(width, max(1, width // 64))


def _square_side(n: int) -> int | None:
    if n <= 0:
        return None
    s = math.isqrt(n)
    return s if s * s == n else None


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


# The fields the tensors' names and shapes fix exactly: a config file that says otherwise is wrong
# (mlp_dim only when blocks.0.mlp.fc1.weight is there to tell it).
FROM_TENSORS = (
    "patch_size",
    "in_chans",
    "conv_stem",
    "embed_dim",
    "depth",
    "mlp_dim",
    "qkv_bias",
    "patch_bias",
    "class_token",
    "distill_token",
    "num_registers",
    "pre_norm",
    "layer_scale",
    "fc_norm",
    "distilled_head",
    "representation_size",
    "num_classes",
    "projection_dim",
)
RGB_CHANNELS = 3  # prepare_image makes RGB inputs
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _shape(state: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...] | None:
    """The shape of state[key] (None when absent), which must have ndim dimensions."""
    t = state.get(key)
    if t is None:
        return None
    if t.ndim != ndim:
        raise CheckpointError(f"{key} has shape {shown(tuple(t.shape))}; expected {ndim} dimensions")
    return tuple(int(n) for n in t.shape)


def block_count(state: dict[str, Tensor]) -> int:
    """The number of transformer blocks, from the keys: blocks.0 ... blocks.{n-1}, every one there.
    A key numbered far beyond the others (blocks.300000.norm1.weight in a 99 kB file) is refused
    here, before any block is built."""
    digits = {m.group(1) for k in state if (m := _BLOCK.match(k))}
    if any(len(d) > 9 for d in digits):  # never int() a number of thousands of digits (Python refuses)
        raise CheckpointError(f"a transformer block is numbered {shown(max(digits, key=len))}; far beyond any depth")
    found = {int(d) for d in digits}
    if not found:
        raise CheckpointError("checkpoint has no transformer blocks")
    top = max(found)
    if top >= len(found):
        gap = next(i for i in range(len(found) + 1) if i not in found)
        raise CheckpointError(
            f"transformer blocks are numbered up to {top} but the checkpoint has {len(found)} of them "
            f"(blocks.{gap} is missing)"
        )
    if len(found) > MAX_DEPTH:
        raise CheckpointError(f"checkpoint has {len(found)} transformer blocks; at most {MAX_DEPTH} are supported")
    return len(found)


def _checked_hints(hints: dict, origin: dict[str, str]) -> dict:
    """Each hint on its own (type, bounds), the message naming the file and key it came from."""
    out = {}
    for k, v in hints.items():
        where = origin.get(k, "the given config")
        if k not in VIT_FIELD_CHECKS:
            raise CheckpointError(f"{where}: {shown(k)} is not a ViTConfig field")
        try:
            out[k] = check_vit_field(k, v)
        except ConfigValueError as e:
            raise CheckpointError(e.named(where)) from None
    return out


def infer_config(
    state: dict[str, Tensor],
    hints: dict,
    origin: dict[str, str] | None = None,
) -> tuple[ViTConfig, tuple[int, int]]:
    """-> (config at the checkpoint's own resolution, the stored position-embedding grid).

    hints: ViTConfig fields stated by a config file (or overrides); origin: where each was read, for
    messages. The sizes the tensors fix (FROM_TENSORS) are taken from them; a hint that disagrees
    is refused, naming its file and key, so that no size from a file can ask for parameters the
    checkpoint does not hold. Every size is bounded (model.config's MAX_*) before anything is built.
    """
    origin = origin or {}
    hints = _checked_hints(hints, origin)
    pw = _shape(state, "patch_embed.proj.weight", 4)
    if pw is None:
        raise CheckpointError("no patch embedding (patch_embed.proj.weight) in checkpoint")
    if pw[2] != pw[3]:
        raise CheckpointError(f"patch embedding has shape {pw}; expected (C, 3, p, p)")
    width, in_chans, p = pw[0], pw[1], pw[2]
    # an early-convolution stem: stride-2 layers before the projection (ViT Lens' conv_stem)
    stem: list[tuple[int, ...]] = []
    while len(stem) <= MAX_STEM_LAYERS and (s := _shape(state, f"patch_embed.stem.{len(stem)}.conv.weight", 4)):
        stem.append(s)
    if stem:
        in_chans, p = stem[0][1], p * 2 ** len(stem)
    depth = block_count(state)
    fc1 = _shape(state, "blocks.0.mlp.fc1.weight", 2)
    reg = _shape(state, "reg_token", 3)
    head = _shape(state, "head.weight", 2)
    derived: dict = {
        "patch_size": p,
        "in_chans": in_chans,
        "conv_stem": tuple(w[0] for w in stem),
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads_for_width(width),
        "mlp_dim": fc1[0] if fc1 is not None else 4 * width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "patch_bias": "patch_embed.proj.bias" in state,
        "class_token": "cls_token" in state,
        "distill_token": "dist_token" in state,
        "num_registers": reg[1] if reg is not None else 0,
        "pre_norm": "norm_pre.weight" in state,
        "layer_scale": "blocks.0.ls1.gamma" in state,
        "fc_norm": "fc_norm.weight" in state,
        "distilled_head": "head_dist.weight" in state,
        "representation_size": (_shape(state, "pre_logits.weight", 2) or (None,))[0],
        "num_classes": head[0] if head is not None else 0,
        "projection_dim": (_shape(state, "proj.weight", 2) or (None,))[0],
    }
    for k in FROM_TENSORS:  # sizes of the tensors themselves: bounded like any other
        if k != "mlp_dim" or fc1 is not None:
            try:
                check_vit_field(k, derived[k])
            except ConfigValueError as e:
                raise CheckpointError(
                    f"the checkpoint's tensors give {e.field} = {shown(e.value)}; it must be {e.requirement}"
                ) from None
    for k in FROM_TENSORS:
        if k in hints and hints[k] != derived[k] and (k != "mlp_dim" or fc1 is not None):
            raise CheckpointError(
                f"{origin.get(k, 'the given config')} says {k} = {shown(hints[k])}, "
                f"but the checkpoint's tensors give {shown(derived[k])}"
            )
    if derived["fc_norm"] or not derived["class_token"]:
        derived["global_pool"] = "avg"
    elif head is not None and head[1] == 2 * width and not derived["representation_size"]:
        derived["global_pool"] = "token_avg"
    cfg = {**derived, **{k: v for k, v in hints.items() if k not in ("image_size", "pos_embed_prefix")}}
    if cfg["in_chans"] != RGB_CHANNELS:
        raise CheckpointError(
            f"the checkpoint's patch embedding takes {cfg['in_chans']} input channels; "
            f"ViT Lens feeds RGB images ({RGB_CHANNELS} channels)"
        )
    if "num_heads" in hints and width % hints["num_heads"]:
        raise CheckpointError(
            f"{origin.get('num_heads', 'the given config')} says num_heads = {hints['num_heads']}, "
            f"which does not divide the checkpoint's width {width}"
        )
    num_prefix = int(cfg["class_token"]) + int(cfg["distill_token"]) + cfg["num_registers"]
    pe = _shape(state, "pos_embed", 3)
    if pe is None:
        raise CheckpointError("checkpoint has no position embedding (pos_embed)")
    if pe[0] != 1 or pe[2] != width:
        raise CheckpointError(f"position embedding has shape {shown(pe)}; expected (1, T, {width})")
    if pe[1] > MAX_TOKENS:
        raise CheckpointError(f"position embedding has {pe[1]} rows; at most {MAX_TOKENS} tokens are supported")
    k, grid = pos_layout(
        pe[1],
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


def param_count(config: ViTConfig) -> int:
    """The number of values in a VisionTransformer's state dict for this config, by arithmetic (no
    module is built): what the memory budget of model.weights.load counts before building one.
    tests/test_hostile_weights.py checks it against real models."""
    c = config
    C, M = c.embed_dim, c.mlp_dim
    widths = (c.in_chans, *c.conv_stem)
    n = sum(a * b * 9 + 4 * b + 1 for a, b in zip(widths, widths[1:]))  # conv + BatchNorm (4 x b) + counter
    k = c.patch_size // 2 ** len(c.conv_stem)
    n += C * widths[-1] * k * k + (C if c.patch_bias else 0)
    n += C * (c.num_prefix_tokens + c.pos_embed_prefix + c.num_patches)  # prefix tokens, position embedding
    n += 2 * C if c.pre_norm else 0
    block = 4 * C + 3 * C * C + (3 * C if c.qkv_bias else 0) + C * C + C + 2 * C * M + M + C
    n += c.depth * (block + (2 * C if c.layer_scale else 0))
    pooled = C * (2 if c.global_pool == "token_avg" else 1)
    n += 2 * pooled if c.fc_norm else 2 * C
    if c.representation_size:
        n += pooled * c.representation_size + c.representation_size
    feat = c.feature_dim
    if c.num_classes:
        n += (feat + 1) * c.num_classes * (2 if c.distilled_head else 1)
    if c.projection_dim:
        n += feat * c.projection_dim
    return n
