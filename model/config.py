"""Model and preprocessing configuration.

Token order everywhere: [class?, distillation?, registers..., patches in row-major order].
P = number of prefix tokens, N = gh * gw patch tokens, T = P + N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real

# The activation names ViTConfig.act accepts are the keys of linear.ACTIVATIONS, their one list
# (it maps each to its function). This brings in torch, as the package's __init__ does anyway.
from .linear import ACTIVATIONS

POOLS = ("token", "avg", "token_avg")
POS_RESAMPLE_METHODS = ("bicubic", "bicubic_plain", "bilinear", "bicubic_dino", "nearest")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ---- bounds on every size a file can state ------------------------------------------------------
# A checkpoint or config file is data from anywhere: each size it states is checked against these
# before anything is built from it, so that a few bytes cannot ask for a model of a million blocks.
# Each bound is several times the largest released plain ViT (ViT-22B: width 6144, 48 blocks, 48
# heads, MLP 24576; ViT-e: 56 blocks); the memory a model at these sizes needs is checked on top
# (model.weights.load) and, for the analysis, by viz_app.pipeline.memory_shortfall.
MAX_IMAGE_SIDE = 4096  # pixels; a ViT-B/16 at 4096 px has 65536 tokens, already beyond any memory here
MAX_DEPTH = 256
MAX_EMBED_DIM = 16384
MAX_HEADS = 256
MAX_MLP_DIM = 65536
MAX_IN_CHANS = 16
MAX_STEM_LAYERS = 8  # a conv stem of 8 stride-2 layers already needs patches of 256 px
MAX_REGISTERS = 1024  # DINOv2 uses 4, later work up to 16
MAX_CLASSES = 1 << 20  # ImageNet-21k has 21843, JFT 18291
MAX_TOKENS = 1 << 18  # prefix + patch tokens: a 4096 px image at patch 8
# LayerNorm adds eps to a variance that can be exactly 0: below ~1e-12 (transformers' ViT default,
# the smallest any released ViT uses) it rounds away in float32 and a constant token becomes NaN.
MIN_NORM_EPS, MAX_NORM_EPS = 1e-12, 1.0
# Preprocessing works on pixels in [0, 1]. With |mean| <= 10 and std >= 1e-3, (x - mean) / std stays
# within about +-1.1e4, finite even in float16 (largest 65504), the narrowest dtype the model runs in;
# released stds are 0.2-0.5, and a model trained on 0-255 inputs (std 1/255 on this scale) still fits.
# A std of 1e-45 (seen in a hostile config) made every pixel infinite.
MAX_ABS_MEAN = 10.0
MIN_STD, MAX_STD = 1e-3, 1e3
# The centre crop keeps crop_pct of the resized side: below 0.1 it keeps under 1% of the image (no
# released model uses less than 0.75) and the resize before the crop grows by 1 / crop_pct.
MIN_CROP_PCT = 0.1
SHOWN_CHARS = 40  # an echoed value in a message is cut to this many characters


def shown(value) -> str:
    """repr(value) cut to SHOWN_CHARS characters: what a message may quote of a value from a file."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class ConfigValueError(ValueError):
    """A configuration value of the wrong type or out of its accepted range. `field` names the
    dataclass field; named() says the same in the words of the file the value came from."""

    def __init__(self, owner: str, field: str, requirement: str, value) -> None:
        self.owner, self.field, self.requirement, self.value = owner, field, requirement, value
        super().__init__(f"invalid {owner}: {field} must be {requirement}, got {shown(value)}")

    def named(self, where: str, key: str | None = None) -> str:
        """'<file>: <key> must be <requirement>, got <value>' (one line, the value cut short)."""
        return f"{where}: {key or self.field} must be {self.requirement}, got {shown(self.value)}"


def _is_whole(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def check_whole(owner: str, field: str, v, lo: int, hi: int) -> int:
    if not (_is_whole(v) and lo <= v <= hi):
        raise ConfigValueError(owner, field, f"a whole number from {lo} to {hi}", v)
    return int(v)


def check_real(owner: str, field: str, v, lo: float, hi: float) -> float:
    if not (_is_real(v) and math.isfinite(v) and lo <= v <= hi):
        raise ConfigValueError(owner, field, f"a finite number from {lo:g} to {hi:g}", v)
    return float(v)


def check_flag(owner: str, field: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigValueError(owner, field, "true or false", v)
    return v


def check_choice(owner: str, field: str, v, choices) -> str:
    if not (isinstance(v, str) and v in choices):
        raise ConfigValueError(owner, field, f"one of {', '.join(choices)}", v)
    return v


def check_image_size(owner: str, field: str, v) -> tuple[int, int]:
    """A side or (height, width), each a whole number of pixels from 1 to MAX_IMAGE_SIDE."""
    sides = (v, v) if _is_whole(v) else v
    if (
        isinstance(sides, (tuple, list))
        and len(sides) == 2
        and all(_is_whole(s) and 1 <= s <= MAX_IMAGE_SIDE for s in sides)
    ):
        return (int(sides[0]), int(sides[1]))
    raise ConfigValueError(owner, field, f"a side or (height, width) in pixels, each from 1 to {MAX_IMAGE_SIDE}", v)


def check_triple(owner: str, field: str, v, lo: float, hi: float) -> tuple[float, float, float]:
    """Exactly three finite numbers (one per RGB channel), each in [lo, hi]."""
    if not (
        isinstance(v, (tuple, list))
        and len(v) == 3
        and all(_is_real(x) and math.isfinite(x) and lo <= x <= hi for x in v)
    ):
        raise ConfigValueError(owner, field, f"3 finite numbers from {lo:g} to {hi:g} (one per RGB channel)", v)
    return tuple(float(x) for x in v)


def _optional(check):
    return lambda owner, field, v: None if v is None else check(owner, field, v)


def _check_stem(owner: str, field: str, v) -> tuple[int, ...]:
    if not (
        isinstance(v, (tuple, list))
        and len(v) <= MAX_STEM_LAYERS
        and all(_is_whole(c) and 1 <= c <= MAX_EMBED_DIM for c in v)
    ):
        raise ConfigValueError(
            owner, field, f"a list of at most {MAX_STEM_LAYERS} widths, each from 1 to {MAX_EMBED_DIM}", v
        )
    return tuple(int(c) for c in v)


def _whole(lo: int, hi: int):
    return lambda owner, field, v: check_whole(owner, field, v, lo, hi)


# The check of each ViTConfig field on its own: type and range. ViTConfig applies them all; the
# config-file readers apply them to each value they read, to name the file and key on a failure.
VIT_FIELD_CHECKS = {
    "image_size": check_image_size,
    "patch_size": _whole(1, MAX_IMAGE_SIDE),
    "in_chans": _whole(1, MAX_IN_CHANS),
    "embed_dim": _whole(1, MAX_EMBED_DIM),
    "depth": _whole(1, MAX_DEPTH),
    "num_heads": _whole(1, MAX_HEADS),
    "mlp_dim": _whole(1, MAX_MLP_DIM),
    "qkv_bias": check_flag,
    "patch_bias": check_flag,
    "conv_stem": _check_stem,
    "class_token": check_flag,
    "distill_token": check_flag,
    "num_registers": _whole(0, MAX_REGISTERS),
    "pos_embed_prefix": _optional(_whole(0, MAX_REGISTERS + 2)),
    "pre_norm": check_flag,
    "act": lambda owner, field, v: check_choice(owner, field, v, tuple(ACTIVATIONS)),
    "norm_eps": lambda owner, field, v: check_real(owner, field, v, MIN_NORM_EPS, MAX_NORM_EPS),
    "layer_scale": check_flag,
    "global_pool": lambda owner, field, v: check_choice(owner, field, v, POOLS),
    "fc_norm": check_flag,
    "representation_size": _optional(_whole(1, MAX_EMBED_DIM)),
    "num_classes": _whole(0, MAX_CLASSES),
    "distilled_head": check_flag,
    "projection_dim": _optional(_whole(1, MAX_EMBED_DIM)),
}


def check_vit_field(field: str, value):
    """One ViTConfig field's value, checked (ConfigValueError) and normalised (tuples, ints)."""
    return VIT_FIELD_CHECKS[field]("ViTConfig", field, value)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a Vision Transformer (hashable: usable as a cache key)."""

    image_size: tuple[int, int] = (224, 224)  # (H, W) the model sees
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    patch_bias: bool = True  # CLIP's patch projection has no bias
    # Widths of 3x3 stride-2 convolutions (BatchNorm + ReLU) before the patch projection, the
    # "early convolutions" stem of Xiao et al. 2021. Empty: the paper's linear patch embedding.
    conv_stem: tuple[int, ...] = ()
    class_token: bool = True
    distill_token: bool = False  # DeiT distilled
    num_registers: int = 0  # DINOv2 with registers
    # How many leading prefix tokens carry a position embedding: P (ViT, DeiT),
    # 1 (DINOv2 with registers: only the class token), or 0 (timm no_embed_class).
    pos_embed_prefix: int | None = None  # None means all prefix tokens
    pre_norm: bool = False  # LayerNorm before the encoder (CLIP)
    act: str = "gelu"  # gelu (exact erf), gelu_tanh (JAX default), quick_gelu (CLIP)
    norm_eps: float = 1e-6
    layer_scale: bool = False  # LayerScale (DINOv2, CaiT style)
    global_pool: str = "token"  # token | avg (mean of patches) | token_avg (concat, DINOv2 head)
    fc_norm: bool = False  # LayerNorm after pooling instead of on all tokens (timm avg pool)
    representation_size: int | None = None  # pre-logits Dense + tanh (ImageNet-21k ViT)
    num_classes: int = 0  # 0: no classifier, the model returns pooled features
    distilled_head: bool = False  # second head on the distillation token, averaged at inference
    projection_dim: int | None = None  # CLIP visual projection (no bias), gives image embeddings

    def __post_init__(self) -> None:
        # each field on its own first (type and bounds), so that the relations below compare numbers
        for name in VIT_FIELD_CHECKS:
            object.__setattr__(self, name, check_vit_field(name, getattr(self, name)))
        if self.pos_embed_prefix is None:
            object.__setattr__(self, "pos_embed_prefix", self.num_prefix_tokens)
        problems = []
        h, w = self.image_size
        p = self.patch_size
        if h % p or w % p:
            problems.append(f"image_size {self.image_size} is not divisible by patch_size {p}")
        elif self.num_tokens > MAX_TOKENS:
            problems.append(f"{self.num_tokens} tokens (image_size {self.image_size}, patch {p}) exceed {MAX_TOKENS}")
        if self.conv_stem and p % 2 ** len(self.conv_stem):
            problems.append(
                f"a conv stem of {len(self.conv_stem)} stride-2 layers needs patch_size divisible by "
                f"{2 ** len(self.conv_stem)}, got {p}"
            )
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            problems.append(f"global_pool={self.global_pool!r} needs a class token")
        if not 0 <= self.pos_embed_prefix <= self.num_prefix_tokens:
            problems.append(f"pos_embed_prefix {self.pos_embed_prefix} must be in [0, {self.num_prefix_tokens}]")
        if self.distilled_head and not self.distill_token:
            problems.append("distilled_head needs distill_token")
        if self.distill_token and not self.class_token:
            problems.append("a distillation token needs a class token")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw)."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def linear_patch_embed(self) -> bool:
        """True for the paper's linear patch embedding (its filters are meaningful in pixel space)."""
        return not self.conv_stem

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def readout_tokens(self) -> tuple[int, ...]:
        """Indices of the tokens the classifier reads (empty for average pooling)."""
        if self.global_pool == "avg":
            return ()
        if self.distilled_head:
            return (0, 1)
        return (0,)

    @property
    def prefix_names(self) -> tuple[str, ...]:
        names = []
        if self.class_token:
            names.append("cls")
        if self.distill_token:
            names.append("dist")
        names += [f"reg{i}" for i in range(self.num_registers)]
        return tuple(names)

    @property
    def feature_dim(self) -> int:
        if self.representation_size:
            return self.representation_size
        return self.embed_dim * (2 if self.global_pool == "token_avg" else 1)

    def with_image_size(self, image_size: int | tuple[int, int]) -> ViTConfig:
        return replace(self, image_size=image_size)  # checked by __post_init__

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["conv_stem"] = list(self.conv_stem)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor; travels with the weights.

    mode "crop": resize the shorter side to int(input_size / crop_pct) (floored, as timm does), then
    center-crop.
    mode "squash": resize straight to input_size (Hugging Face ViTImageProcessor).
    """

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    mode: str = "crop"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"  # bicubic | bilinear | nearest | lanczos
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Every path that makes one (config files, the curated table, code) goes through these
        # checks, so that no bad value reaches prepare_image: see the bounds at the top of the module.
        owner = "preprocessing"
        object.__setattr__(self, "input_size", check_image_size(owner, "input_size", self.input_size))
        check_choice(owner, "mode", self.mode, ("crop", "squash"))
        object.__setattr__(self, "crop_pct", check_real(owner, "crop_pct", self.crop_pct, MIN_CROP_PCT, 1.0))
        check_choice(owner, "interpolation", self.interpolation, INTERPOLATIONS)
        object.__setattr__(self, "mean", check_triple(owner, "mean", self.mean, -MAX_ABS_MEAN, MAX_ABS_MEAN))
        object.__setattr__(self, "std", check_triple(owner, "std", self.std, MIN_STD, MAX_STD))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class PretrainedSource:
    """A well-known checkpoint on the Hugging Face hub (downloaded only when asked)."""

    key: str
    title: str
    source: str  # anything load_checkpoint accepts
    family: str
    size_mb: int
    notes: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


PRETRAINED: dict[str, PretrainedSource] = {
    s.key: s
    for s in (
        PretrainedSource(
            key="vit_b16_augreg",
            title="ViT-B/16 AugReg (IN-21k -> IN-1k)",
            source="hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
            family="ViT",
            size_mb=346,
            preprocessing=Preprocessing(crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD),
        ),
        PretrainedSource(
            key="vit_b32_augreg",
            title="ViT-B/32 AugReg (IN-21k -> IN-1k)",
            source="hf-hub:timm/vit_base_patch32_224.augreg_in21k_ft_in1k",
            family="ViT",
            size_mb=353,
            preprocessing=Preprocessing(crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD),
        ),
        PretrainedSource(
            key="vit_l16_augreg",
            title="ViT-L/16 AugReg (IN-21k -> IN-1k)",
            source="hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
            family="ViT",
            size_mb=1217,
            preprocessing=Preprocessing(crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD),
        ),
        PretrainedSource(
            key="deit_s_distilled",
            title="DeiT-S distilled",
            source="hf-hub:timm/deit_small_distilled_patch16_224.fb_in1k",
            family="DeiT",
            size_mb=89,
        ),
        PretrainedSource(
            key="deit_b_distilled",
            title="DeiT-B distilled",
            source="hf-hub:timm/deit_base_distilled_patch16_224.fb_in1k",
            family="DeiT",
            size_mb=349,
        ),
        PretrainedSource(
            key="dino_s16",
            title="DINO ViT-S/16 (self-supervised, no classifier)",
            source="hf-hub:timm/vit_small_patch16_224.dino",
            family="DINO",
            size_mb=87,
        ),
        PretrainedSource(
            key="dinov2_s14_reg",
            title="DINOv2 ViT-S/14 with 4 registers (no classifier)",
            source="facebook/dinov2-with-registers-small",
            family="DINOv2",
            size_mb=88,
            preprocessing=Preprocessing(crop_pct=224 / 256),
        ),
        PretrainedSource(
            key="clip_b16",
            title="CLIP ViT-B/16 image tower (OpenAI)",
            source="hf-hub:timm/vit_base_patch16_clip_224.openai",
            family="CLIP",
            size_mb=346,
            preprocessing=Preprocessing(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD),
        ),
    )
}
