"""Model and preprocessing configuration.

Token order everywhere: [class?, distillation?, registers..., patches in row-major order].
P = number of prefix tokens, N = gh * gw patch tokens, T = P + N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# The activation names ViTConfig.act accepts are the keys of linear.ACTIVATIONS, their one list
# (it maps each to its function). This brings in torch, as the package's __init__ does anyway.
from .linear import ACTIVATIONS

POOLS = ("token", "avg", "token_avg")
POS_RESAMPLE_METHODS = ("bicubic", "bicubic_plain", "bilinear", "bicubic_dino", "nearest")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


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
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        if self.pos_embed_prefix is None:
            object.__setattr__(self, "pos_embed_prefix", self.num_prefix_tokens)
        problems = []
        h, w = self.image_size
        p = self.patch_size
        if p <= 0 or h <= 0 or w <= 0:
            problems.append(f"image_size {self.image_size} and patch_size {p} must be positive")
        elif h % p or w % p:
            problems.append(f"image_size {self.image_size} is not divisible by patch_size {p}")
        if self.conv_stem and (p % 2 ** len(self.conv_stem) or min(self.conv_stem) <= 0):
            problems.append(
                f"a conv stem of {len(self.conv_stem)} stride-2 layers needs patch_size divisible by "
                f"{2 ** len(self.conv_stem)} and positive widths, got {p} and {self.conv_stem}"
            )
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.act not in ACTIVATIONS:
            problems.append(f"act must be one of {tuple(ACTIVATIONS)}, got {self.act!r}")
        if self.global_pool not in POOLS:
            problems.append(f"global_pool must be one of {POOLS}, got {self.global_pool!r}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            problems.append(f"global_pool={self.global_pool!r} needs a class token")
        if not 0 <= self.pos_embed_prefix <= self.num_prefix_tokens:
            problems.append(f"pos_embed_prefix {self.pos_embed_prefix} must be in [0, {self.num_prefix_tokens}]")
        if self.distilled_head and not self.distill_token:
            problems.append("distilled_head needs distill_token")
        if self.distill_token and not self.class_token:
            problems.append("a distillation token needs a class token")
        if min(self.depth, self.num_heads, self.embed_dim, self.mlp_dim, self.in_chans) <= 0:
            problems.append("depth, num_heads, embed_dim, mlp_dim and in_chans must be positive")
        if self.num_registers < 0 or self.num_classes < 0:
            problems.append("num_registers and num_classes must be >= 0")
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
        return replace(self, image_size=_pair(image_size))

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
        object.__setattr__(self, "input_size", _pair(self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.mode not in ("crop", "squash"):
            raise ValueError(f"preprocessing mode must be 'crop' or 'squash', got {self.mode!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest", "lanczos"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")

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
