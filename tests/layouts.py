"""Writers for foreign checkpoint layouts, used as test inputs. Key names follow the released
files: Google's vit_models .npz (Flax kernels, q/k/v separate) and timm state dicts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


def saved_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """The tensors exactly as save_pretrained writes them (the names released files use)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return {k.removeprefix("vit."): v for k, v in load_file(str(Path(d) / "model.safetensors")).items()}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def hf_vit_to_google_npz(hf_model, *, heads: int) -> dict[str, np.ndarray]:
    """A transformers ViT (ViTForImageClassification or ViTModel with pooler) -> Google npz arrays."""
    sd = saved_state_dict(hf_model)
    D = sd["embeddings.cls_token"].shape[-1]
    Dh = D // heads
    w = {
        "embedding/kernel": _np(sd["embeddings.patch_embeddings.projection.weight"].permute(2, 3, 1, 0)),
        "embedding/bias": _np(sd["embeddings.patch_embeddings.projection.bias"]),
        "cls": _np(sd["embeddings.cls_token"]),
        "Transformer/posembed_input/pos_embedding": _np(sd["embeddings.position_embeddings"]),
        "Transformer/encoder_norm/scale": _np(sd["layernorm.weight"]),
        "Transformer/encoder_norm/bias": _np(sd["layernorm.bias"]),
    }
    if "classifier.weight" in sd:
        w["head/kernel"] = _np(sd["classifier.weight"].T)
        w["head/bias"] = _np(sd["classifier.bias"])
    if "pooler.dense.weight" in sd:
        w["pre_logits/kernel"] = _np(sd["pooler.dense.weight"].T)
        w["pre_logits/bias"] = _np(sd["pooler.dense.bias"])
    i = 0
    while f"encoder.layer.{i}.layernorm_before.weight" in sd:
        s, b = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
        w[b + "LayerNorm_0/scale"] = _np(sd[s + "layernorm_before.weight"])
        w[b + "LayerNorm_0/bias"] = _np(sd[s + "layernorm_before.bias"])
        for hf_name, g_name in (("query", "query"), ("key", "key"), ("value", "value")):
            wt = sd[s + f"attention.attention.{hf_name}.weight"]  # (out, in)
            w[b + f"MultiHeadDotProductAttention_1/{g_name}/kernel"] = _np(wt.T.reshape(D, heads, Dh))
            w[b + f"MultiHeadDotProductAttention_1/{g_name}/bias"] = _np(
                sd[s + f"attention.attention.{hf_name}.bias"].reshape(heads, Dh)
            )
        wo = sd[s + "attention.output.dense.weight"]
        w[b + "MultiHeadDotProductAttention_1/out/kernel"] = _np(wo.T.reshape(heads, Dh, D))
        w[b + "MultiHeadDotProductAttention_1/out/bias"] = _np(sd[s + "attention.output.dense.bias"])
        w[b + "LayerNorm_2/scale"] = _np(sd[s + "layernorm_after.weight"])
        w[b + "LayerNorm_2/bias"] = _np(sd[s + "layernorm_after.bias"])
        w[b + "MlpBlock_3/Dense_0/kernel"] = _np(sd[s + "intermediate.dense.weight"].T)
        w[b + "MlpBlock_3/Dense_0/bias"] = _np(sd[s + "intermediate.dense.bias"])
        w[b + "MlpBlock_3/Dense_1/kernel"] = _np(sd[s + "output.dense.weight"].T)
        w[b + "MlpBlock_3/Dense_1/bias"] = _np(sd[s + "output.dense.bias"])
        i += 1
    return w


def hf_vit_to_timm(hf_model) -> dict[str, torch.Tensor]:
    """A transformers ViTForImageClassification -> a timm VisionTransformer state dict."""
    sd = saved_state_dict(hf_model)
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    i = 0
    while f"encoder.layer.{i}.layernorm_before.weight" in sd:
        s, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"norm1.{kind}"] = sd[s + f"layernorm_before.{kind}"]
            out[b + f"norm2.{kind}"] = sd[s + f"layernorm_after.{kind}"]
            out[b + f"attn.qkv.{kind}"] = torch.cat(
                [sd[s + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[b + f"attn.proj.{kind}"] = sd[s + f"attention.output.dense.{kind}"]
            out[b + f"mlp.fc1.{kind}"] = sd[s + f"intermediate.dense.{kind}"]
            out[b + f"mlp.fc2.{kind}"] = sd[s + f"output.dense.{kind}"]
        i += 1
    return out
