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
    MAX_IMAGE_SIDE,
    ConfigValueError,
    Preprocessing,
    check_image_size,
    check_vit_field,
    shown,
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
    """What a config file says: ViTConfig fields, family, labels, preprocessing, resampling method.

    origin: for each ViTConfig field in `config`, where it was read ("config.json (num_hidden_layers)"),
    so that a value the checkpoint's tensors contradict is reported by file and key."""

    config: dict = field(default_factory=dict)
    family: str | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    pos_resample: str | None = None
    input_size: tuple[int, int] | None = None  # the resolution to run at, when a file states it
    name: str | None = None
    origin: dict[str, str] = field(default_factory=dict)


def read_json(path: Path) -> dict:
    """A config file as a dict; anything else (too large, unreadable, not JSON, nested past Python's
    recursion limit, a number of thousands of digits) is one CheckpointError naming the file."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path.name} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config file")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path.name} cannot be read: {e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path.name} is not valid JSON: it is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number; [[[[... nested past the limit
        raise CheckpointError(f"{path.name} is not a usable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return data


_MISSING = object()


def _need(where: str, key: str, requirement: str, value) -> CheckpointError:
    return CheckpointError(f"{where}: {key} must be {requirement}, got {shown(value)}")


def _field(h: Hints, fld: str, value, *, where: str, key: str) -> None:
    """Set ViTConfig field `fld` from a file's value, checked as ViTConfig checks it, and remember
    where it came from (file and key)."""
    try:
        h.config[fld] = check_vit_field(fld, value)
    except ConfigValueError as e:
        raise CheckpointError(e.named(where, key)) from None
    h.origin[fld] = f"{where} ({key})"


def _implied(h: Hints, fld: str, value, *, where: str, why: str) -> None:
    """A field the file does not state but implies (e.g. by its model_type)."""
    h.config[fld] = value
    h.origin[fld] = f"{where} ({why})"


def _dict(d: dict, key: str, *, where: str) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _need(where, key, "a JSON object", v)
    return v


def _flag(d: dict, key: str, default: bool, *, where: str, prefix: str = "") -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _need(where, prefix + key, "true or false", v)
    return v


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


HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "clip")
MAX_MLP_RATIO = 64.0


def hf_hints(cfg: dict, where: str = "config.json") -> Hints:
    """transformers config.json -> hints. Sizes the weights' shapes determine (width, depth, MLP
    width, channels, patch) are hints only where the file states them; each value is checked for
    type and range here, and against the tensors when the model is inferred."""
    mt = cfg.get("model_type")
    kp = ""  # the keys' prefix in messages
    if mt == "clip" and cfg.get("vision_config") is not None:
        cfg, mt, kp = _dict(cfg, "vision_config", where=where), "clip_vision_model", "vision_config."
    if not isinstance(mt, str) or mt not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {shown(mt)} is not a supported Vision Transformer")
    act = cfg.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in HF_ACTS:
        raise _need(where, kp + "hidden_act", f"one of {', '.join(HF_ACTS)}", act)
    h = Hints(labels=_labels(cfg.get("id2label")), preprocessing=HF_DEFAULT_PREPROCESSING[mt])
    clip = mt in ("clip_vision_model", "clip")
    stated = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "depth",
        "num_channels": "in_chans",
        "patch_size": "patch_size",
        "intermediate_size": "mlp_dim",
    }
    for key, fld in stated.items():
        if key in cfg and not (key == "intermediate_size" and mt.startswith("dinov2")):
            _field(h, fld, cfg[key], where=where, key=kp + key)
    # not told by the weights: transformers' own defaults when the file leaves them out
    _field(h, "num_heads", cfg.get("num_attention_heads", 12), where=where, key=kp + "num_attention_heads")
    _field(h, "act", HF_ACTS[act], where=where, key=kp + "hidden_act")
    _field(h, "norm_eps", cfg.get("layer_norm_eps", 1e-5 if clip else 1e-12), where=where, key=kp + "layer_norm_eps")
    _field(h, "image_size", cfg.get("image_size", 224), where=where, key=kp + "image_size")
    # preprocessor_config.json, when the folder has one, replaces this (model.weights.load)
    why = f"model_type {mt!r}"
    if mt in ("vit", "deit"):
        if "qkv_bias" in cfg:
            _field(h, "qkv_bias", cfg["qkv_bias"], where=where, key=kp + "qkv_bias")
        h.family = "DeiT" if mt == "deit" else "ViT"
        if mt == "deit":
            _implied(h, "distill_token", True, where=where, why=why)
    elif mt.startswith("dinov2"):
        if _flag(cfg, "use_swiglu_ffn", False, where=where, prefix=kp):
            raise CheckpointError(f"{where}: SwiGLU MLPs (DINOv2-giant) are not supported yet")
        if "qkv_bias" in cfg:
            _field(h, "qkv_bias", cfg["qkv_bias"], where=where, key=kp + "qkv_bias")
        ratio = cfg.get("mlp_ratio", 4)
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= MAX_MLP_RATIO):
            raise _need(where, kp + "mlp_ratio", f"a number above 0 and at most {MAX_MLP_RATIO:g}", ratio)
        if "embed_dim" in h.config:
            _field(h, "mlp_dim", int(h.config["embed_dim"] * ratio), where=where, key=kp + "hidden_size x mlp_ratio")
        _implied(h, "layer_scale", True, where=where, why=why)
        if mt.endswith("registers") and "num_register_tokens" in cfg:
            _field(h, "num_registers", cfg["num_register_tokens"], where=where, key=kp + "num_register_tokens")
        elif not mt.endswith("registers"):
            _implied(h, "num_registers", 0, where=where, why=why)
        _implied(h, "pos_embed_prefix", 1, where=where, why=why)  # the class token has a position; registers not
        h.family = "DINOv2"
        # as transformers resamples at run time: antialiased for DINOv2 with registers, plain otherwise
        h.pos_resample = "bicubic" if mt.endswith("registers") else "bicubic_plain"
    else:
        _implied(h, "pre_norm", True, where=where, why=why)
        _implied(h, "patch_bias", False, where=where, why=why)
        _implied(h, "qkv_bias", True, where=where, why=why)
        h.family = "CLIP"
        h.labels = None
    return h


def _hf_size(v, *, where: str, key: str) -> tuple[int, int]:
    """An int or {"height", "width"} of a preprocessor_config.json, each 1..MAX_IMAGE_SIDE."""
    if isinstance(v, dict) and set(v) >= {"height", "width"}:
        v = (v["height"], v["width"])
    try:
        return check_image_size("preprocessing", key, v)
    except ConfigValueError as e:
        raise CheckpointError(e.named(where, key)) from None


# Preprocessing fields -> what preprocessor_config.json calls them
HF_PREPROCESSING_KEYS = {
    "mean": "image_mean",
    "std": "image_std",
    "crop_pct": "crop_size / size (their ratio)",
    "input_size": "crop_size",
    "interpolation": "resample",
}


def hf_preprocessing(pp: dict, where: str) -> Preprocessing:
    """preprocessor_config.json -> Preprocessing, its input size included. Every value read is
    checked (type, range); a failure names the file and the key."""
    resample = pp.get("resample", 3)
    if not (isinstance(resample, int) and not isinstance(resample, bool) and resample in PIL_RESAMPLE):
        accepted = ", ".join(f"{k} ({v})" for k, v in PIL_RESAMPLE.items())
        raise _need(where, "resample", f"one of {accepted}", resample)
    mean, std = pp.get("image_mean", IMAGENET_MEAN), pp.get("image_std", IMAGENET_STD)
    size, crop = pp.get("size"), pp.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = size["shortest_edge"]
        if not (isinstance(shortest, int) and not isinstance(shortest, bool) and 1 <= shortest <= MAX_IMAGE_SIDE):
            raise _need(where, "size.shortest_edge", f"a whole number of pixels from 1 to {MAX_IMAGE_SIDE}", shortest)
        if _flag(pp, "do_center_crop", True, where=where) and crop is not None:
            crop_hw = _hf_size(crop, where=where, key="crop_size")
        else:
            crop_hw = (shortest, shortest)
        kw = {"input_size": crop_hw, "mode": "crop", "crop_pct": min(1.0, min(crop_hw) / shortest)}
    elif size is None or isinstance(size, (int, dict)):
        hw = (224, 224) if size is None else _hf_size(size, where=where, key="size")
        kw = {"input_size": hw, "mode": "squash", "crop_pct": 1.0}
    else:
        raise _need(where, "size", "a number or {shortest_edge} or {height, width}", size)
    try:
        return Preprocessing(**kw, interpolation=PIL_RESAMPLE[resample], mean=mean, std=std)
    except ConfigValueError as e:
        raise CheckpointError(e.named(where, HF_PREPROCESSING_KEYS.get(e.field))) from None


TIMM_ARCH = re.compile(r"(?P<family>vit|deit|deit3|eva02|samvit)_\w*?patch(?P<patch>\d+)")
TIMM_ACTS = ("quick_gelu", "gelu_tanh", "gelu")
TIMM_POOLS = ("token", "avg")


def timm_hints(cfg: dict, where: str = "config.json") -> Hints:
    """timm config.json (architecture, num_classes, pretrained_cfg, model_args) -> hints; every
    value read is checked (type, range) and a failure names the file and the key."""
    arch = cfg.get("architecture", "")
    m = TIMM_ARCH.match(arch) if isinstance(arch, str) else None
    if not m or m.group("family") not in ("vit", "deit"):
        raise CheckpointError(f"{where}: timm architecture {shown(arch)} is not a supported plain ViT")
    pc = _dict(cfg, "pretrained_cfg", where=where)
    args = _dict(cfg, "model_args", where=where)
    h = Hints()
    tag = pc.get("tag", "")
    if not isinstance(tag, str):
        raise _need(where, "pretrained_cfg.tag", "a string", tag)
    if "clip" in arch:
        _implied(h, "norm_eps", 1e-5, where=where, why=f"architecture {shown(arch)}")
        act = "quick_gelu" if ("quickgelu" in arch or tag.startswith("openai")) else "gelu"
        _implied(h, "act", act, where=where, why=f"architecture {shown(arch)}")
    if args.get("act_layer") is not None:
        if args["act_layer"] not in TIMM_ACTS:
            raise _need(where, "model_args.act_layer", f"one of {', '.join(TIMM_ACTS)}", args["act_layer"])
        _field(h, "act", args["act_layer"], where=where, key="model_args.act_layer")
    if "num_heads" in args:
        _field(h, "num_heads", args["num_heads"], where=where, key="model_args.num_heads")
    gp, gpk = (
        (args["global_pool"], "model_args.global_pool")
        if "global_pool" in args
        else (cfg.get("global_pool"), "global_pool")
    )
    if gp is not None and gp != "":
        if gp not in TIMM_POOLS:
            raise _need(where, gpk, f"one of {', '.join(TIMM_POOLS)}", gp)
        _field(h, "global_pool", gp, where=where, key=gpk)
    if _flag(args, "no_embed_class", False, where=where, prefix="model_args."):
        _implied(h, "pos_embed_prefix", 0, where=where, why="model_args.no_embed_class")
    if pc.get("input_size") is not None:
        size = pc["input_size"]
        if not (isinstance(size, list) and len(size) == 3):
            raise _need(where, "pretrained_cfg.input_size", "[channels, height, width]", size)
        _field(h, "image_size", size[1:], where=where, key="pretrained_cfg.input_size")
    elif args.get("img_size") is not None:
        _field(h, "image_size", args["img_size"], where=where, key="model_args.img_size")
    family = (
        "DeiT"
        if arch.startswith("deit")
        else "CLIP"
        if "clip" in arch
        else ("DINOv2" if "dinov2" in arch else "DINO" if tag.startswith("dino") else "ViT")
    )
    pre = None
    if pc.get("mean") is not None and pc.get("std") is not None:
        crop_mode = pc.get("crop_mode", "center")
        if crop_mode not in ("center", "squash", "border"):
            raise _need(where, "pretrained_cfg.crop_mode", "one of center, squash, border", crop_mode)
        try:
            pre = Preprocessing(
                input_size=h.config.get("image_size", (224, 224)),
                mode="squash" if crop_mode == "squash" else "crop",
                crop_pct=pc.get("crop_pct", 0.875),
                interpolation=pc.get("interpolation", "bicubic"),
                mean=pc["mean"],
                std=pc["std"],
            )
        except ConfigValueError as e:
            key = "crop_mode" if e.field == "mode" else e.field
            raise CheckpointError(e.named(where, f"pretrained_cfg.{key}")) from None
    labels = cfg.get("label_names")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
        raise _need(where, "label_names", "a list of strings", labels)
    h.family, h.labels, h.preprocessing = family, labels or None, pre
    h.input_size = h.config.get("image_size")
    return h
