"""ViT Lens model package: our Vision Transformer, its configs and checkpoint loading."""

from .config import PRETRAINED, Preprocessing, PretrainedSource, ViTConfig
from .device import (
    PRECISIONS,
    TF32,
    available_devices,
    precisions_for,
    resolve_device,
    resolve_dtype,
    resolve_precision,
    to_precision,
)
from .errors import CheckpointError, DownloadError, IncompatibleCheckpointError, ViTLensError
from .pos_embed import resample_grid, resample_pos_embed
from .preprocess import PreparedImage, load_image, prepare_image
from .vit import VisionTransformer, ViTOutput, attention_memory_bytes
from .weights import LoadedModel, load_checkpoint

__all__ = [
    "PRECISIONS",
    "PRETRAINED",
    "CheckpointError",
    "DownloadError",
    "IncompatibleCheckpointError",
    "LoadedModel",
    "PreparedImage",
    "Preprocessing",
    "PretrainedSource",
    "TF32",
    "ViTConfig",
    "ViTLensError",
    "ViTOutput",
    "VisionTransformer",
    "attention_memory_bytes",
    "available_devices",
    "load_checkpoint",
    "load_image",
    "precisions_for",
    "prepare_image",
    "resample_grid",
    "resample_pos_embed",
    "resolve_device",
    "resolve_dtype",
    "resolve_precision",
    "to_precision",
]
