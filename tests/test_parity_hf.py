"""Parity with Hugging Face transformers (eager attention) on random weights, loaded from
folders written by save_pretrained through load_checkpoint."""

import zlib

import pytest
import torch

from model import load_checkpoint

import hf_models

pytestmark = pytest.mark.parity

ATTN_TOL = 1e-5
OUT_TOL = 1e-4

CASES = [
    ("vit", dict(patch_size=16, image_size=64)),
    ("vit", dict(patch_size=16, image_size=96)),
    ("vit", dict(patch_size=32, image_size=64)),
    ("vit", dict(patch_size=32, image_size=128)),
    ("vit_model", dict(patch_size=16, image_size=64)),
    ("deit_distilled", dict(patch_size=16, image_size=64)),
    ("dinov2_reg", dict(patch_size=14, image_size=56)),
    ("dinov2_reg_cls", dict(patch_size=14, image_size=56)),
    ("clip", dict(patch_size=16, image_size=64)),
]


def _reference_output(kind, ref):
    if kind == "clip":
        return ref.image_embeds
    if kind in ("vit_model", "dinov2_reg"):
        return ref.pooler_output
    return ref.logits


def _our_output(kind, out):
    if kind == "clip":
        return out.embeds
    if kind in ("vit_model", "dinov2_reg"):
        return out.features
    return out.logits


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-p{kw['patch_size']}-{kw['image_size']}" for k, kw in CASES])
def test_matches_transformers(tmp_path, kind, kw):
    hf = hf_models.build(kind, seed=zlib.crc32(kind.encode()) % 1000, **kw)
    hf_models.save(hf, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.image_size == (kw["image_size"],) * 2
    x = torch.randn(3, 3, kw["image_size"], kw["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = loaded.model(x)
    assert len(out.attentions) == len(ref.attentions) == hf_models.SMALL["num_hidden_layers"]
    for ours, theirs in zip(out.attentions, ref.attentions):
        assert ours.shape == theirs.shape == (3, 4, loaded.config.num_tokens, loaded.config.num_tokens)
        torch.testing.assert_close(ours, theirs, atol=ATTN_TOL, rtol=0)
        torch.testing.assert_close(ours.sum(-1), torch.ones_like(ours[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(_our_output(kind, out), _reference_output(kind, ref), atol=OUT_TOL, rtol=0)


def test_token_layouts(tmp_path):
    expected = {
        "deit_distilled": (2, ("cls", "dist"), (0, 1)),
        "dinov2_reg": (5, ("cls", "reg0", "reg1", "reg2", "reg3"), (0,)),
        "clip": (1, ("cls",), (0,)),
    }
    for kind, (P, names, readout) in expected.items():
        folder = tmp_path / kind
        hf_models.save(hf_models.build(kind, patch_size=16, image_size=64), folder)
        cfg = load_checkpoint(folder).config
        assert (cfg.num_prefix_tokens, cfg.prefix_names, cfg.readout_tokens) == (P, names, readout)
    assert load_checkpoint(folder).config.pre_norm  # CLIP: LayerNorm before the encoder


def test_dinov2_at_another_resolution_matches_transformers_interpolation(tmp_path):
    """transformers resamples DINOv2 position embeddings on the fly; we resample at load time."""
    hf = hf_models.build("dinov2_reg", patch_size=14, image_size=56)
    hf_models.save(hf, tmp_path)
    loaded = load_checkpoint(tmp_path, image_size=(98, 70))  # 7 x 5 grid, non-square
    assert loaded.config.grid == (7, 5)
    x = torch.randn(2, 3, 98, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = loaded.model(x)
    for ours, theirs in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(ours, theirs, atol=ATTN_TOL, rtol=0)
    torch.testing.assert_close(out.features, ref.pooler_output, atol=OUT_TOL, rtol=0)
