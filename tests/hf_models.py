"""Small random transformers models (the test oracle), saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160)  # head dim 24


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm scales, biases, tokens), not the identity-ish init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if p.ndim > 1 else 0.1
            base = 1.0 if ("norm" in name and name.endswith("weight")) or "lambda1" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


def build(kind: str, *, image_size=32, patch_size=8, seed=0, **extra):
    import transformers as T

    torch.manual_seed(seed)
    kw = dict(SMALL, image_size=image_size, patch_size=patch_size, **extra)
    if kind == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**kw, num_labels=5))
    elif kind == "vit_model":
        model = T.ViTModel(T.ViTConfig(**kw), add_pooling_layer=True)
    elif kind == "deit_distilled":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**kw, num_labels=5))
    elif kind == "dinov2_reg":
        kw.pop("intermediate_size")
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**kw, num_register_tokens=4))
    elif kind == "dinov2_reg_cls":
        kw.pop("intermediate_size")
        model = T.Dinov2WithRegistersForImageClassification(
            T.Dinov2WithRegistersConfig(**kw, num_register_tokens=4, num_labels=5)
        )
    elif kind == "clip":
        model = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**kw, projection_dim=24))
    else:
        raise ValueError(kind)
    _randomize(model, seed)
    model.set_attn_implementation("eager")
    return model.eval()


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder
