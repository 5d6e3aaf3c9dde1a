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


def hf_vit_to_big_vision_npz(
    hf_model, *, heads: int, scanned: bool = False, bf16: bool = False
) -> dict[str, np.ndarray]:
    """big_vision layout: 'params/' prefix, Linen names, top-level pos_embedding without a class
    slot (its row folded into 'cls', as big_vision's own fix_old_checkpoints does), optionally
    all blocks stacked on axis 0 ('scan') and bfloat16 stored as 2-byte void."""
    old = hf_vit_to_google_npz(hf_model, heads=heads)
    pe = old.pop("Transformer/posembed_input/pos_embedding")
    w = {"pos_embedding": pe[:, 1:], "cls": old.pop("cls") + pe[:, :1]}
    rename = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    blocks: dict[str, list[np.ndarray]] = {}
    for k, v in old.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        if k.startswith("Transformer/encoderblock_") and scanned:
            rest = k.split("/", 2)[2]
            blocks.setdefault(rest, []).append(v)
        else:
            w[k] = v
    for rest, vs in blocks.items():
        w[f"Transformer/encoderblock/{rest}"] = np.stack(vs)
    if bf16:
        w = {k: (torch.from_numpy(v).bfloat16().view(torch.int16).numpy().view("V2")) for k, v in w.items()}
    return {f"params/{k}": v for k, v in w.items()}


def hf_clip_to_openai(hf_model) -> dict[str, torch.Tensor]:
    """A transformers CLIPVisionModelWithProjection -> OpenAI CLIP names (with a stand-in text key)."""
    sd = saved_state_dict(hf_model)
    v = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    out = {
        "visual.conv1.weight": v["embeddings.patch_embedding.weight"],
        "visual.class_embedding": v["embeddings.class_embedding"],
        "visual.positional_embedding": v["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": v["pre_layrnorm.weight"],
        "visual.ln_pre.bias": v["pre_layrnorm.bias"],
        "visual.ln_post.weight": v["post_layernorm.weight"],
        "visual.ln_post.bias": v["post_layernorm.bias"],
        "visual.proj": v["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": torch.zeros(10, 4),  # the text tower is ignored
        "logit_scale": torch.tensor(4.6),
    }
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in v:
        s, b = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"ln_1.{kind}"] = v[s + f"layer_norm1.{kind}"]
            out[b + f"ln_2.{kind}"] = v[s + f"layer_norm2.{kind}"]
            out[b + f"attn.in_proj_{kind}"] = torch.cat([v[s + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[b + f"attn.out_proj.{kind}"] = v[s + f"self_attn.out_proj.{kind}"]
            out[b + f"mlp.c_fc.{kind}"] = v[s + f"mlp.fc1.{kind}"]
            out[b + f"mlp.c_proj.{kind}"] = v[s + f"mlp.fc2.{kind}"]
        i += 1
    return out


def hf_dinov2_to_original(hf_model) -> dict[str, torch.Tensor]:
    """A transformers Dinov2WithRegistersModel -> the facebookresearch/dinov2 state dict names."""
    sd = {k.removeprefix("dinov2_with_registers."): t for k, t in saved_state_dict(hf_model).items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "register_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        s, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"norm1.{kind}"] = sd[s + f"norm1.{kind}"]
            out[b + f"norm2.{kind}"] = sd[s + f"norm2.{kind}"]
            out[b + f"attn.qkv.{kind}"] = torch.cat(
                [sd[s + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[b + f"attn.proj.{kind}"] = sd[s + f"attention.output.dense.{kind}"]
            out[b + f"mlp.fc1.{kind}"] = sd[s + f"mlp.fc1.{kind}"]
            out[b + f"mlp.fc2.{kind}"] = sd[s + f"mlp.fc2.{kind}"]
        out[b + "ls1.gamma"] = sd[s + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[s + "layer_scale2.lambda1"]
        i += 1
    return out
