"""Google .npz and timm layouts load through load_checkpoint and reproduce the reference."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import IncompatibleCheckpointError, load_checkpoint
from model.errors import CheckpointError

import hf_models
import layouts

HEADS = 4


@pytest.fixture(scope="module")
def hf_vit():
    # Flax ViTs use the tanh GELU and LayerNorm eps 1e-6; make the reference match that.
    return hf_models.build("vit", patch_size=16, image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _pixels(size=64, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


def _assert_same(loaded, hf_model, x, *, logits=True):
    with torch.no_grad():
        ref = hf_model(pixel_values=x, output_attentions=True)
        out = loaded.model(x)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if logits:
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    return out


def test_google_npz(tmp_path, hf_vit):
    path = tmp_path / "ViT-T_16.npz"
    np.savez(path, **layouts.hf_vit_to_google_npz(hf_vit, heads=HEADS))
    loaded = load_checkpoint(path)
    c = loaded.config
    assert (c.num_heads, c.act, c.norm_eps, c.patch_size, c.grid) == (HEADS, "gelu_tanh", 1e-6, 16, (4, 4))
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert loaded.format == "google_npz"
    _assert_same(loaded, hf_vit, _pixels())


def test_google_npz_in21k_with_pre_logits(tmp_path):
    hf = hf_models.build("vit_model", patch_size=16, image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    path = tmp_path / "imagenet21k_ViT-T_16.npz"
    np.savez(path, **layouts.hf_vit_to_google_npz(hf, heads=HEADS))
    loaded = load_checkpoint(path)
    assert loaded.config.representation_size == 96 and loaded.config.num_classes == 0
    assert loaded.labels is None
    x = _pixels()
    out = _assert_same(loaded, hf, x, logits=False)
    with torch.no_grad():
        torch.testing.assert_close(out.features, hf(pixel_values=x).pooler_output, atol=1e-4, rtol=0)


def test_google_npz_fine_tuned_at_higher_resolution_runs_at_224_grid(tmp_path, hf_vit):
    """A checkpoint's own grid is kept unless another image size is asked for."""
    path = tmp_path / "ViT.npz"
    np.savez(path, **layouts.hf_vit_to_google_npz(hf_vit, heads=HEADS))
    loaded = load_checkpoint(path, image_size=96)
    assert loaded.config.grid == (6, 6)
    out = loaded.model(_pixels(96))
    assert out.attentions[0].shape[-1] == 37


def _timm_config(num_classes):
    return {
        "architecture": "vit_tiny_patch16_64",
        "num_classes": num_classes,
        "num_features": 96,
        "global_pool": "token",
        "model_args": {"num_heads": HEADS},
        "pretrained_cfg": {
            "input_size": [3, 64, 64],
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    }


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_with_config_beside(tmp_path, suffix):
    hf = hf_models.build("vit", patch_size=16, image_size=64, layer_norm_eps=1e-6)
    sd = layouts.hf_vit_to_timm(hf)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file(sd, str(path))
    (tmp_path / "config.json").write_text(json.dumps(_timm_config(5)))
    loaded = load_checkpoint(path)
    assert loaded.format == "timm" and loaded.config.num_heads == HEADS
    assert loaded.preprocessing.crop_pct == 0.9
    _assert_same(loaded, hf, _pixels())


def test_timm_state_dict_without_config_uses_shapes_and_overrides(tmp_path):
    hf = hf_models.build("vit", patch_size=16, image_size=64, layer_norm_eps=1e-6)
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in layouts.hf_vit_to_timm(hf).items()}, path)
    loaded = load_checkpoint(path, overrides={"num_heads": HEADS})
    assert loaded.config.image_size == (64, 64) and loaded.config.depth == 3
    _assert_same(loaded, hf, _pixels())


def test_npz_and_timm_give_the_same_weights(tmp_path, hf_vit):
    np.savez(tmp_path / "g.npz", **layouts.hf_vit_to_google_npz(hf_vit, heads=HEADS))
    torch.save(layouts.hf_vit_to_timm(hf_vit), tmp_path / "t.pth")
    a = load_checkpoint(tmp_path / "g.npz").model.state_dict()
    b = load_checkpoint(tmp_path / "t.pth", overrides={"num_heads": HEADS}).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_wrong_architecture_names_every_bad_key(tmp_path):
    hf = hf_models.build("vit", patch_size=16, image_size=64)
    sd = layouts.hf_vit_to_timm(hf)
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.0.attn.q_norm_extra"] = torch.zeros(3)
    sd["blocks.2.norm2.weight"] = torch.zeros(95)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(IncompatibleCheckpointError) as err:
        load_checkpoint(path, overrides={"num_heads": HEADS})
    e = err.value
    assert e.missing == ["blocks.1.mlp.fc1.bias"]
    assert e.unexpected == ["blocks.0.attn.q_norm_extra"]
    assert e.wrong_shape == [("blocks.2.norm2.weight", (95,), (96,))]
    for text in ("missing", "unexpected", "wrong-shape", "blocks.2.norm2.weight"):
        assert text in str(e)


def test_not_a_vit(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match="not a recognised Vision Transformer"):
        load_checkpoint(path)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from model.errors import DownloadError

    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE|local cache"):
        load_checkpoint("google/vit-base-patch16-224", cache_dir=tmp_path)


@pytest.mark.parametrize("scanned,bf16", [(False, False), (True, False), (True, True)])
def test_big_vision_npz(tmp_path, hf_vit, scanned, bf16):
    path = tmp_path / "bv.npz"
    np.savez(path, **layouts.hf_vit_to_big_vision_npz(hf_vit, heads=HEADS, scanned=scanned, bf16=bf16))
    loaded = load_checkpoint(path)
    assert loaded.config.pos_embed_prefix == 0 and loaded.config.depth == 3
    x = _pixels()
    if not bf16:
        _assert_same(loaded, hf_vit, x)
    else:  # weights rounded to bfloat16: close, not equal
        with torch.no_grad():
            ref, out = hf_vit(pixel_values=x).logits, loaded.model(x).logits
        assert (ref - out).abs().max() < 0.1 * ref.abs().max()


def test_openai_clip_state_dict(tmp_path):
    hf = hf_models.build("clip", patch_size=16, image_size=64)
    path = tmp_path / "ViT-B-16.pt"
    torch.save(layouts.hf_clip_to_openai(hf), path)
    loaded = load_checkpoint(path, overrides={"num_heads": 4})
    assert loaded.family == "CLIP" and loaded.config.act == "quick_gelu" and loaded.config.pre_norm
    x = _pixels()
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = loaded.model(x)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.embeds, ref.image_embeds, atol=1e-4, rtol=0)


def test_dinov2_original_layout(tmp_path):
    hf = hf_models.build("dinov2_reg", patch_size=14, image_size=56)
    path = tmp_path / "dinov2_vits14_reg4.pth"
    torch.save(layouts.hf_dinov2_to_original(hf), path)
    loaded = load_checkpoint(path, overrides={"num_heads": 4})
    c = loaded.config
    assert (c.num_registers, c.pos_embed_prefix, c.layer_scale) == (4, 1, True)
    x = _pixels(56)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = loaded.model(x)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, ref.pooler_output, atol=1e-4, rtol=0)


def _odd_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 90, 3), dtype=np.uint8))


def test_transformers_vit_folder_without_preprocessor_config_gets_vit_image_processor_defaults(tmp_path, hf_vit):
    """transformers refuses such a folder; a ViTImageProcessor built without arguments resizes straight
    to the input size (no crop), bilinear, mean = std = 0.5. We apply the same, pixel for pixel."""
    import transformers as T

    from model import prepare_image
    from model.weights.configs import PIL_RESAMPLE

    hf_models.save(hf_vit, tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    loaded = load_checkpoint(tmp_path)
    proc = T.ViTImageProcessorPil
    pre = loaded.preprocessing
    assert (pre.mode, pre.input_size) == ("squash", (64, 64))
    assert pre.interpolation == PIL_RESAMPLE[int(proc.resample)] == "bilinear"
    assert pre.mean == tuple(proc.image_mean) and pre.std == tuple(proc.image_std) == (0.5, 0.5, 0.5)
    img = _odd_image()
    theirs = proc(size={"height": 64, "width": 64})(img, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(prepare_image(img, pre).pixels, theirs, atol=1e-6, rtol=0)
    # run at another size: still resized straight to it
    pre96 = load_checkpoint(tmp_path, image_size=96).preprocessing
    assert (pre96.mode, pre96.input_size, pre96.interpolation) == ("squash", (96, 96), "bilinear")


def test_transformers_folder_with_preprocessor_config_follows_it(tmp_path, hf_vit):
    import transformers as T

    hf_models.save(hf_vit, tmp_path)
    T.ViTImageProcessorPil(size={"height": 64, "width": 64}, resample=3, image_mean=[0.1, 0.2, 0.3]).save_pretrained(
        tmp_path
    )
    pre = load_checkpoint(tmp_path).preprocessing
    assert (pre.mode, pre.interpolation, pre.mean, pre.std) == ("squash", "bicubic", (0.1, 0.2, 0.3), (0.5,) * 3)


def test_google_npz_at_another_size_resamples_like_scipy_zoom(tmp_path, hf_vit):
    """vit_jax / big_vision: scipy.ndimage.zoom(grid, zoom, order=1) on the (gh, gw, D) grid."""
    from test_pos_embed import zoom_order1

    path = tmp_path / "ViT.npz"
    np.savez(path, **layouts.hf_vit_to_google_npz(hf_vit, heads=HEADS))
    loaded = load_checkpoint(path, image_size=112)  # grid 4x4 -> 7x7
    src = hf_vit.vit.embeddings.position_embeddings.detach()[0]
    ref = zoom_order1(src[1:].numpy().reshape(4, 4, -1), (7, 7)).reshape(49, -1)
    ours = loaded.model.pos_embed.detach()[0]
    assert torch.equal(ours[0], src[0])
    np.testing.assert_allclose(ours[1:].numpy(), ref, atol=1e-5, rtol=0)
