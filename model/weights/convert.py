"""Key tables that map every supported layout onto our (timm) parameter names.

Each converter is a pure function: flat dict of source tensors -> flat dict in our names.
Keys that are deliberately dropped are listed with the reason; anything else unknown is kept
so that the final strict load reports it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..config import MAX_DEPTH, shown
from ..errors import CheckpointError

# ---- format detection by sentinel keys -------------------------------------------------------

FORMATS = ("google_npz", "timm", "hf_vit", "hf_clip", "openai_clip")


def detect_format(sd: dict[str, Tensor]) -> str:
    keys = set(sd)
    if _any_endswith(keys, "embedding/kernel") or _any_endswith(keys, "Transformer/encoder_norm/scale"):
        return "google_npz"
    if _any_endswith(keys, "conv1.weight") and _any_endswith(keys, "class_embedding"):
        return "openai_clip"
    if _any_endswith(keys, "embeddings.patch_embedding.weight"):
        return "hf_clip"
    if _any_endswith(keys, "embeddings.patch_embeddings.projection.weight"):
        return "hf_vit"
    if _any_endswith(keys, "patch_embed.proj.weight"):
        return "timm"
    sample = ", ".join(shown(k) for k in sorted(keys)[:6])  # names cut short: they come from the file
    raise CheckpointError(
        "not a recognised Vision Transformer checkpoint (no patch-embedding weights found; "
        f"first keys: {sample or 'none'})"
    )


def _any_endswith(keys: set[str], suffix: str) -> bool:
    return any(k == suffix or k.endswith("/" + suffix) or k.endswith("." + suffix) for k in keys)


def strip_common_prefix(sd: dict[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Remove a wrapper prefix (e.g. 'module.') only where it starts every key."""
    changed = True
    while changed:
        changed = False
        for pre in prefixes:
            if sd and all(k.startswith(pre) for k in sd):
                sd = {k[len(pre) :]: v for k, v in sd.items()}
                changed = True
    return sd


# ---- Google / big_vision .npz ---------------------------------------------------------------


def from_google_npz(w: dict[str, Tensor]) -> dict[str, Tensor]:
    """Google ViT / AugReg / big_vision npz -> our names.

    Kernels are stored as Flax Dense (in, out) and Conv (kh, kw, in, out): transposed by rank.
    q, k and v are separate (C, H, D) kernels here and fused into one qkv matrix.
    Original releases use pre-Linen names (MultiHeadDotProductAttention_1, LayerNorm_2,
    MlpBlock_3) and Transformer/posembed_input with a class slot; big_vision uses Linen names
    (..._0, LayerNorm_1, MlpBlock_0), a top-level pos_embedding without one, may stack all
    blocks in one scanned 'encoderblock', and pools by average ('gap') when it has no 'cls'.
    """
    prefix = next((p for p in ("opt/target/", "params/img/", "params/") if f"{p}embedding/kernel" in w), "")
    w = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
    if any(k.startswith("MAPHead_0/") for k in w):
        raise CheckpointError("this npz pools with a MAP head (attention pooling), which ViT Lens does not support yet")
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    first = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    bv = f"{first}MultiHeadDotProductAttention_0/query/kernel" in w
    mha, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if bv
        else (
            "MultiHeadDotProductAttention_1",
            "MlpBlock_3",
            "LayerNorm_2",
        )
    )
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str, layer: int | None = None) -> Tensor:
        used.add(key)
        return w[key] if layer is None or not scanned else w[key][layer]

    def dense(src: str, dst: str, layer: int | None = None) -> None:
        if f"{src}/kernel" in w:
            out[f"{dst}.weight"] = take(f"{src}/kernel", layer).T.contiguous()
        if f"{src}/bias" in w:
            out[f"{dst}.bias"] = take(f"{src}/bias", layer)

    def norm(src: str, dst: str, layer: int | None = None) -> None:
        out[f"{dst}.weight"] = take(f"{src}/scale", layer)
        out[f"{dst}.bias"] = take(f"{src}/bias", layer)

    k = take("embedding/kernel")  # (kh, kw, in, C)
    if k.ndim != 4:
        raise CheckpointError(f"embedding/kernel has shape {tuple(k.shape)}; hybrid (ResNet) ViTs are not supported")
    out["patch_embed.proj.weight"] = k.permute(3, 2, 0, 1).contiguous()  # (C, in, kh, kw)
    if "embedding/bias" in w:
        out["patch_embed.proj.bias"] = take("embedding/bias")
    if "cls" in w:
        out["cls_token"] = take("cls")
    for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding", "Transformer/pos_embedding"):
        if key in w:
            out["pos_embed"] = take(key)
            break
    norm("Transformer/encoder_norm", "norm")
    dense("pre_logits", "pre_logits")
    dense("head", "head")
    if scanned:
        # one stacked tensor per parameter, the blocks on axis 0: every one must have the same count
        depth = int(w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
        if not 1 <= depth <= MAX_DEPTH:
            raise CheckpointError(f"the scanned encoder block stacks {depth} layers; 1 to {MAX_DEPTH} are supported")
        uneven = [
            k for k, v in w.items() if k.startswith("Transformer/encoderblock/") and (v.ndim < 1 or v.shape[0] != depth)
        ]
        if uneven:
            raise CheckpointError(
                f"the scanned encoder block's {shown(uneven[0])} does not stack {depth} layers like LayerNorm_0/scale"
            )
        blocks = [("Transformer/encoderblock/", i) for i in range(depth)]
    else:
        depth = 0
        while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
            depth += 1
        blocks = [(f"Transformer/encoderblock_{i}/", None) for i in range(depth)]
    if not blocks:
        raise CheckpointError("npz has no Transformer/encoderblock_0: not a ViT checkpoint")
    for i, (src, layer) in enumerate(blocks):
        dst = f"blocks.{i}."
        norm(src + "LayerNorm_0", dst + "norm1", layer)
        norm(src + ln2, dst + "norm2", layer)
        a = src + mha + "/"
        qkv_w = [take(a + f"{n}/kernel", layer).flatten(1).T for n in ("query", "key", "value")]  # (H*D, C)
        out[dst + "attn.qkv.weight"] = torch.cat(qkv_w, dim=0)
        if a + "query/bias" in w:
            out[dst + "attn.qkv.bias"] = torch.cat(
                [take(a + f"{n}/bias", layer).flatten() for n in ("query", "key", "value")]
            )
        out[dst + "attn.proj.weight"] = take(a + "out/kernel", layer).flatten(0, 1).T.contiguous()  # (C, H*D)
        out[dst + "attn.proj.bias"] = take(a + "out/bias", layer)
        dense(src + mlp + "/Dense_0", dst + "mlp.fc1", layer)
        dense(src + mlp + "/Dense_1", dst + "mlp.fc2", layer)
    for key in sorted(set(w) - used):  # keep for the strict load's report
        out["npz:" + key] = w[key]
    return out


def google_num_heads(w: dict[str, Tensor]) -> int | None:
    for key, v in w.items():
        if re.search(r"encoderblock(_0)?/MultiHeadDotProductAttention_[01]/query/kernel$", key) and v.ndim >= 3:
            return int(v.shape[-2])  # (C, H, D), or (L, C, H, D) when scanned
    return None


# ---- Hugging Face transformers ----------------------------------------------------------------

HF_MODEL_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "vision_model.", "model.")

# (regex over the key after the model prefix, our name). Legacy (v4) and v5 names both appear.
HF_VIT_TABLE: tuple[tuple[str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (
        r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
        r"blocks.\1.attn.proj.\2",
    ),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pre_logits.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
)
HF_VIT_QKV = re.compile(
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)"
)

HF_CLIP_TABLE: tuple[tuple[str, str], ...] = (
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight"),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"visual_projection\.weight", "proj.weight"),
)
HF_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")

# Dropped on purpose, with the reason.
HF_DROPPED = (
    (re.compile(r"(.*\.)?embeddings\.mask_token$"), "mask token: used only in masked-image pre-training"),
    (re.compile(r"^text_model\..*|^text_projection\..*|^logit_scale$"), "CLIP text tower: not part of the image model"),
    (re.compile(r".*\.position_ids$"), "buffer of indices, not a weight"),
)


def _dropped(key: str) -> bool:
    return any(p.match(key) for p, _ in HF_DROPPED)


def from_hf(sd: dict[str, Tensor], *, clip: bool) -> dict[str, Tensor]:
    """transformers ViT / DeiT / DINOv2 (with registers) / CLIP vision -> our names."""
    table = HF_CLIP_TABLE if clip else HF_VIT_TABLE
    qkv_re = HF_CLIP_QKV if clip else HF_VIT_QKV
    compiled = [(re.compile(src + "$"), dst) for src, dst in table]
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, v in sd.items():
        if _dropped(key):
            continue
        k = _strip_hf_prefix(key)
        m = qkv_re.fullmatch(k)
        if m:
            layer, which, kind = int(m.group(1)), m.group(2)[0], m.group(3)  # which: q | k | v
            qkv.setdefault((layer, kind), {})[which] = v
            continue
        for pat, dst in compiled:
            if pat.fullmatch(k):
                out[pat.sub(dst, k)] = v
                break
        else:
            out["hf:" + key] = v  # unknown: reported by the strict load
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"layer {layer}: attention {kind} has only {sorted(parts)} of q, k, v")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if clip:
        if "cls_token" in out:
            out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
        if "pos_embed" in out:
            out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return out


def _strip_hf_prefix(key: str) -> str:
    for pre in HF_MODEL_PREFIXES:
        if key.startswith(pre):
            return key[len(pre) :]
    return key


# ---- timm -----------------------------------------------------------------------------------

TIMM_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")
# Names of the original DINOv2 / DeiT-3 code that differ from timm's.
TIMM_RENAMES = (
    (re.compile(r"^register_tokens$"), "reg_token"),
    (re.compile(r"^blocks\.(\d+)\.gamma_1$"), r"blocks.\1.ls1.gamma"),
    (re.compile(r"^blocks\.(\d+)\.gamma_2$"), r"blocks.\1.ls2.gamma"),
)
TIMM_DROPPED = ((re.compile(r"^mask_token$"), "mask token: used only in masked-image pre-training"),)
TIMM_UNSUPPORTED = (
    (re.compile(r".*attn\.(q_norm|k_norm)\..*"), "QK-norm attention"),
    (re.compile(r"^attn_pool\..*"), "attention-pool (MAP) heads"),
    (re.compile(r".*mlp\.(fc1_g|fc1_x|w12|w3)\..*"), "SwiGLU MLPs"),
    (re.compile(r"^patch_embed\.backbone\..*"), "hybrid (CNN stem) ViTs"),
)


def from_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    sd = strip_common_prefix(sd, TIMM_WRAPPER_PREFIXES)
    for pat, what in TIMM_UNSUPPORTED:
        if any(pat.match(k) for k in sd):
            raise CheckpointError(f"this checkpoint uses {what}, which ViT Lens does not support yet")
    out = {}
    for k, v in sd.items():
        if any(p.match(k) for p, _ in TIMM_DROPPED):
            continue
        for pat, dst in TIMM_RENAMES:
            if pat.match(k):
                k = pat.sub(dst, k)
                break
        out[k] = v
    return out


# ---- OpenAI CLIP (and open_clip) image tower ----------------------------------------------------

OPENAI_CLIP_TABLE: tuple[tuple[str, str], ...] = (
    (r"conv1\.weight", "patch_embed.proj.weight"),
    (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    (r"ln_post\.(weight|bias)", r"norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
)


def from_openai_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI CLIP / open_clip state dict -> our names. A full CLIP file also holds the text tower:
    only the keys under 'visual.' are kept (the text tower is not part of the image model)."""
    sd = strip_common_prefix(sd, ("module.",))
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    compiled = [(re.compile(src), dst) for src, dst in OPENAI_CLIP_TABLE]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["proj.weight"] = v.T.contiguous()  # stored (C, E) for x @ proj
        else:
            for pat, dst in compiled:
                if pat.fullmatch(k):
                    out[pat.sub(dst, k)] = v
                    break
            else:
                out["clip:" + k] = v
    return out


def to_ours(sd: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    if fmt == "google_npz":
        return from_google_npz(sd)
    if fmt == "hf_vit":
        return from_hf(sd, clip=False)
    if fmt == "hf_clip":
        return from_hf(sd, clip=True)
    if fmt == "timm":
        return from_timm(sd)
    if fmt == "openai_clip":
        return from_openai_clip(sd)
    raise ValueError(f"unknown format {fmt!r}")
