"""Read the config files that sit beside weights: transformers, timm and our own."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
)
from ..errors import CheckpointError

HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Per-family defaults when a checkpoint brings no preprocessing of its own.
DEFAULT_PREPROCESSING = {
    "ViT": Preprocessing(crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD),
    "DeiT": Preprocessing(crop_pct=0.875),
    "DINO": Preprocessing(crop_pct=0.875),
    "DINOv2": Preprocessing(crop_pct=224 / 256),
    "CLIP": Preprocessing(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD),
}
# A transformers folder without preprocessor_config.json, by model_type (transformers' own
# AutoImageProcessor refuses such a folder). "vit": ViTImageProcessor's defaults, which are also what
# Google's hub configs state: resize straight to the input size, bilinear (PIL resample 2), mean =
# std = 0.5. "clip": CLIPImageProcessor's defaults (shorter side to the input size, centre crop,
# bicubic, OpenAI mean/std) are the CLIP family defaults. DeiT and DINOv2 keep their family defaults
# (ImageNet mean/std, 256 -> 224, bicubic), as the official facebook/* preprocessor configs state:
# the class defaults of DeiTImageProcessor (mean = std = 0.5) and BitImageProcessor (CLIP mean/std,
# no margin before the crop) are not what those weights were trained with.
HF_DEFAULT_PREPROCESSING = {
    "vit": Preprocessing(mode="squash", crop_pct=1.0, interpolation="bilinear", mean=INCEPTION_MEAN, std=INCEPTION_STD),
    "deit": DEFAULT_PREPROCESSING["DeiT"],
    "dinov2": DEFAULT_PREPROCESSING["DINOv2"],
    "dinov2_with_registers": DEFAULT_PREPROCESSING["DINOv2"],
    "clip_vision_model": DEFAULT_PREPROCESSING["CLIP"],
    "clip": DEFAULT_PREPROCESSING["CLIP"],
}


@dataclass
class Hints:
    """What a config file says: ViTConfig fields, family, labels, preprocessing, resampling method."""

    config: dict = field(default_factory=dict)
    family: str | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    pos_resample: str | None = None
    input_size: tuple[int, int] | None = None  # the resolution to run at, when a file states it
    name: str | None = None


def read_json(path: Path) -> dict:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path.name} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return data


def _int(d: dict, key: str, default=None, *, where: str) -> int | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 1_000_000:
        raise CheckpointError(f"{where}: {key} = {v!r} is not a sensible size")
    return v


def _size2(v, *, where: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    raise CheckpointError(f"{where}: image size {v!r} is not an int or (H, W) pair")


def _labels(id2label) -> list[str] | None:
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    labels = [v for _, v in items]
    if [k for k, _ in items] != list(range(len(items))) or all(re.fullmatch(r"LABEL_\d+", v) for v in labels):
        return None
    return labels


def hf_hints(cfg: dict, where: str = "config.json") -> Hints:
    """transformers config.json -> hints."""
    mt = cfg.get("model_type")
    if mt == "clip" and isinstance(cfg.get("vision_config"), dict):
        cfg, mt = cfg["vision_config"], "clip_vision_model"
    if mt not in ("vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "clip"):
        raise CheckpointError(f"{where}: model_type {mt!r} is not a supported Vision Transformer")
    width = _int(cfg, "hidden_size", 768, where=where)
    act = cfg.get("hidden_act", "gelu")
    if act not in HF_ACTS:
        raise CheckpointError(f"{where}: activation {act!r} is not supported")
    out: dict = {
        "embed_dim": width,
        "depth": _int(cfg, "num_hidden_layers", 12, where=where),
        "num_heads": _int(cfg, "num_attention_heads", 12, where=where),
        "in_chans": _int(cfg, "num_channels", 3, where=where),
        "patch_size": _int(cfg, "patch_size", 16, where=where),
        "act": HF_ACTS[act],
        "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "image_size": _size2(cfg.get("image_size", 224), where=where),
    }
    # preprocessor_config.json, when the folder has one, replaces this (model.weights.load)
    h = Hints(config=out, labels=_labels(cfg.get("id2label")), preprocessing=HF_DEFAULT_PREPROCESSING[mt])
    if mt in ("vit", "deit"):
        out["qkv_bias"] = bool(cfg.get("qkv_bias", True))
        out["mlp_dim"] = _int(cfg, "intermediate_size", 4 * width, where=where)
        h.family = "DeiT" if mt == "deit" else "ViT"
        if mt == "deit":
            out["distill_token"] = True
    elif mt.startswith("dinov2"):
        if cfg.get("use_swiglu_ffn"):
            raise CheckpointError(f"{where}: SwiGLU MLPs (DINOv2-giant) are not supported yet")
        out["qkv_bias"] = bool(cfg.get("qkv_bias", True))
        out["mlp_dim"] = int(width * float(cfg.get("mlp_ratio", 4)))
        out["layer_scale"] = True
        out["num_registers"] = _int(cfg, "num_register_tokens", 0, where=where) if mt.endswith("registers") else 0
        out["pos_embed_prefix"] = 1  # the class token has a position; registers do not
        h.family = "DINOv2"
        # as transformers resamples at run time: antialiased for DINOv2 with registers, plain otherwise
        h.pos_resample = "bicubic" if mt.endswith("registers") else "bicubic_plain"
    else:
        out["mlp_dim"] = _int(cfg, "intermediate_size", 4 * width, where=where)
        out["pre_norm"] = True
        out["patch_bias"] = False
        out["qkv_bias"] = True
        out["norm_eps"] = float(cfg.get("layer_norm_eps", 1e-5))
        h.family = "CLIP"
        h.labels = None
    return h


def hf_preprocessing(pp: dict, where: str) -> Preprocessing:
    """preprocessor_config.json -> Preprocessing, its input size included."""
    mean, std = pp.get("image_mean"), pp.get("image_std")
    size, crop = pp.get("size"), pp.get("crop_size")
    resample = PIL_RESAMPLE.get(pp.get("resample", 3), "bicubic")
    try:
        mean = tuple(float(v) for v in mean) if mean else IMAGENET_MEAN
        std = tuple(float(v) for v in std) if std else IMAGENET_STD
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
            if pp.get("do_center_crop", True) and crop:
                crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop),) * 2
            else:
                crop_hw = (shortest, shortest)
            pct = min(1.0, min(crop_hw) / shortest)
            return Preprocessing(
                input_size=crop_hw, mode="crop", crop_pct=pct, interpolation=resample, mean=mean, std=std
            )
        if isinstance(size, dict):
            hw = (int(size["height"]), int(size["width"]))
        else:
            hw = (int(size),) * 2 if size else (224, 224)
        return Preprocessing(input_size=hw, mode="squash", crop_pct=1.0, interpolation=resample, mean=mean, std=std)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: cannot read preprocessing ({e})") from None


TIMM_ARCH = re.compile(r"(?P<family>vit|deit|deit3|eva02|samvit)_\w*?patch(?P<patch>\d+)")


def timm_hints(cfg: dict, where: str = "config.json") -> Hints:
    """timm config.json (architecture, num_classes, pretrained_cfg, model_args) -> hints."""
    arch = str(cfg.get("architecture", ""))
    m = TIMM_ARCH.match(arch)
    if not m or m.group("family") not in ("vit", "deit"):
        raise CheckpointError(f"{where}: timm architecture {arch!r} is not a supported plain ViT")
    pc = cfg.get("pretrained_cfg") or {}
    args = cfg.get("model_args") or {}
    out: dict = {}
    tag = str(pc.get("tag", ""))
    if "clip" in arch:
        out["norm_eps"] = 1e-5
        out["act"] = "quick_gelu" if ("quickgelu" in arch or tag.startswith("openai")) else "gelu"
    if args.get("act_layer") in ("quick_gelu", "gelu_tanh", "gelu"):
        out["act"] = args["act_layer"]
    if "num_heads" in args:
        out["num_heads"] = int(args["num_heads"])
    if "global_pool" in cfg or "global_pool" in args:
        gp = args.get("global_pool", cfg.get("global_pool"))
        if gp in ("token", "avg"):
            out["global_pool"] = gp
        elif gp:
            raise CheckpointError(f"{where}: global_pool {gp!r} is not supported")
    if args.get("no_embed_class"):
        out["pos_embed_prefix"] = 0
    size = pc.get("input_size") or args.get("img_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        out["image_size"] = (int(size[1]), int(size[2]))
    elif size is not None:
        out["image_size"] = _size2(size, where=where)
    family = (
        "DeiT"
        if arch.startswith("deit")
        else "CLIP"
        if "clip" in arch
        else ("DINOv2" if "dinov2" in arch else "DINO" if tag.startswith("dino") else "ViT")
    )
    pre = None
    if pc.get("mean") and pc.get("std"):
        try:
            pre = Preprocessing(
                input_size=out.get("image_size", (224, 224)),
                mode="squash" if pc.get("crop_mode") == "squash" else "crop",
                crop_pct=float(pc.get("crop_pct", 0.875)),
                interpolation=str(pc.get("interpolation", "bicubic")),
                mean=tuple(pc["mean"]),
                std=tuple(pc["std"]),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: cannot read pretrained_cfg preprocessing ({e})") from None
    labels = cfg.get("label_names")
    labels = [str(v) for v in labels] if isinstance(labels, list) and labels else None
    return Hints(config=out, family=family, labels=labels, preprocessing=pre, input_size=out.get("image_size"))
