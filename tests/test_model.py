"""The ViT itself: attention as values, gradients through attention, resampling, precision."""

import threading

import pytest
import torch

from model import VisionTransformer, ViTConfig, load_checkpoint, resample_grid, resample_pos_embed
from model.linear import pack_linears
from model.weights import load_strict

TINY = dict(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96)


def _model(seed=0, **kw):
    m = VisionTransformer(ViTConfig(**{**TINY, "num_classes": 7, **kw}))
    m.init_weights(seed=seed)
    with torch.no_grad():  # non-trivial prefix tokens and position embeddings
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            if "token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def _x(batch=2, size=(32, 32), seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_attentions_are_probabilities_for_every_layout():
    for kw in (
        {},
        {"distill_token": True, "distilled_head": True},
        {"num_registers": 4, "pos_embed_prefix": 1, "layer_scale": True},
        {"class_token": False, "global_pool": "avg", "fc_norm": True},
        {"pre_norm": True, "act": "quick_gelu", "patch_bias": False, "projection_dim": 5},
        {"image_size": (32, 48), "qkv_bias": False},
    ):
        m = _model(**kw)
        c = m.config
        out = m(_x(size=c.image_size), output_token_norms=True)
        assert len(out.attentions) == c.depth
        for a in out.attentions:
            assert a.shape == (2, c.num_heads, c.num_tokens, c.num_tokens)
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-6, rtol=0)
            assert (a >= 0).all()
        assert out.token_norms.shape == (2, c.depth + 1, c.num_tokens)
        assert out.logits.shape == (2, 7)


def test_skip_attentions():
    m = _model()
    out = m(_x(), output_attentions=False)
    assert out.attentions is None and out.logits is not None
    torch.testing.assert_close(out.logits, m(_x()).logits, atol=1e-6, rtol=0)


def test_gradient_through_attentions_without_touching_parameters():
    m = _model().requires_grad_(False)
    x = _x().requires_grad_(True)
    with torch.enable_grad():
        out = m(x)
        y = out.logits[torch.arange(2), out.logits.argmax(-1)].sum()
        grads = torch.autograd.grad(y, out.attentions)
    assert len(grads) == 2 and all(g.shape == a.shape for g, a in zip(grads, out.attentions))
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in m.parameters())
    # images in a batch do not mix: image 0's logit has no gradient on image 1's attention
    with torch.enable_grad():
        out = m(_x().requires_grad_(True))
        g = torch.autograd.grad(out.logits[0, 0], out.attentions[-1])[0]
    assert g[1].abs().max() == 0


@pytest.mark.parametrize("packed", [False, True])
def test_forward_writes_no_state_and_is_thread_safe(packed):
    m = _model()
    if packed:
        pack_linears(m)  # at load time, before the model is shared
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = {k: id(v) for k, v in vars(m).items()}
    inputs = [_x(seed=i) for i in range(6)]
    with torch.no_grad():
        alone = [m(x).attentions[-1] for x in inputs]
    results = [None] * len(inputs)

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = m(inputs[i]).attentions[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert {k: id(v) for k, v in vars(m).items()} == attrs
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_bf16_attention_close_to_fp32(tmp_path):
    m = _model(embed_dim=96, num_heads=4, mlp_dim=192, depth=4)
    from safetensors.torch import save_file

    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    fp32 = load_checkpoint(tmp_path / "m.safetensors", overrides={"num_heads": 4})
    bf16 = load_checkpoint(tmp_path / "m.safetensors", overrides={"num_heads": 4}, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    x = _x()
    with torch.no_grad():
        a = fp32.model(x).attentions
        b = bf16.model(x.bfloat16()).attentions
    for p, q in zip(a, b):
        assert (p - q.float()).abs().max() < 2e-2


def test_resample_unchanged_grid_returns_input():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, src_grid=(4, 4), dst_grid=(4, 4), num_prefix=1) is pe


@pytest.mark.parametrize("method", ["bicubic", "bicubic_plain", "bilinear", "bicubic_dino", "nearest"])
def test_resample_methods_keep_prefix_and_smooth_fields(method):
    gh, gw = 6, 6
    yy, xx = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    field = torch.stack([xx, yy], -1).reshape(-1, 2)  # a linear ramp
    pe = torch.cat([torch.full((1, 2), 7.0), field])[None]
    out = resample_pos_embed(pe, src_grid=(gh, gw), dst_grid=(9, 12), num_prefix=1, method=method)
    assert out.shape == (1, 1 + 9 * 12, 2)
    assert torch.equal(out[0, 0], pe[0, 0])
    grid = out[0, 1:].reshape(9, 12, 2)
    assert (grid[:, 1:, 0] - grid[:, :-1, 0] >= -1e-4).all()  # still increasing along x
    assert (grid[1:, :, 1] - grid[:-1, :, 1] >= -1e-4).all()  # and along y


def test_resample_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown resampling method"):
        resample_grid(torch.zeros(4, 2), src_grid=(2, 2), dst_grid=(3, 3), method="magic")


@pytest.mark.parametrize("size", [(384, 384), (224, 320)])
def test_224_model_runs_at_other_sizes(tmp_path, size):
    m = VisionTransformer(ViTConfig(image_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=1, mlp_dim=64))
    torch.save(m.state_dict(), tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth", image_size=size)
    assert loaded.config.grid == (size[0] // 16, size[1] // 16)
    assert loaded.preprocessing.input_size == size
    with torch.no_grad():
        out = loaded.model(torch.randn(1, 3, *size))
    assert out.attentions[0].shape[-1] == 1 + (size[0] // 16) * (size[1] // 16)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="configured for 32x32"):
        _model()(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"image_size": 30}, "not divisible"),
        ({"num_heads": 5}, "not divisible by num_heads"),
        ({"act": "relu"}, "act must be"),
        ({"class_token": False}, "needs a class token"),
        ({"num_registers": 2, "pos_embed_prefix": 4}, "pos_embed_prefix"),
        ({"conv_stem": (8, 8, 8, 8)}, "conv stem of 4 stride-2 layers"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ViTConfig(**{**TINY, **kw})


def test_config_is_hashable_and_round_trips():
    c = ViTConfig(**TINY)
    assert hash(c) == hash(ViTConfig.from_dict(c.to_dict()))
    assert c.grid == (4, 4) and c.num_tokens == 17 and c.head_dim == 16


@pytest.mark.parametrize("with_config", [True, False])
def test_conv_stem_checkpoint_at_the_demo_sizes_loads(tmp_path, with_config):
    """96 px, patch 8, three stride-2 layers: the projection kernel is 1, the grid 12 x 12."""
    from safetensors.torch import save_file

    c = ViTConfig(
        image_size=96, patch_size=8, embed_dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes=8, conv_stem=(4, 8, 12)
    )
    m = VisionTransformer(c)
    m.init_weights(seed=2)
    m.eval()
    save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    if with_config:
        import json

        (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": c.to_dict()}))
    lm = load_checkpoint(tmp_path if with_config else tmp_path / "model.safetensors")
    assert lm.config.conv_stem == (4, 8, 12) and lm.config.grid == (12, 12) and lm.config.image_size == (96, 96)
    if with_config:  # without it the head count is a guess from the width
        x = _x(size=(96, 96))
        torch.testing.assert_close(lm.model(x).logits, m(x).logits)


def test_conv_stem_model_round_trips_and_keeps_the_patch_grid(tmp_path):
    from safetensors.torch import save_file

    from viz_app.cli import model_arrays

    c = ViTConfig(**{**TINY, "conv_stem": [8, 16], "num_classes": 3})
    assert c.conv_stem == (8, 16) and not c.linear_patch_embed and ViTConfig.from_dict(c.to_dict()) == c
    m = VisionTransformer(c)
    m.init_weights(seed=1)
    assert m.patch_embed.proj.weight.shape == (48, 16, 2, 2)  # 32 px -> 16 -> 8 -> 2x2 projection -> 4x4 grid
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that loading must restore them
        m.patch_embed.stem[0].norm.running_mean.uniform_(-1, 1)
        m.patch_embed.stem[0].norm.running_var.uniform_(0.5, 2)
    m.eval()
    out = m(_x())
    assert out.logits.shape == (2, 3) and out.attentions[0].shape == (2, 3, 17, 17)
    save_file({k: v.float().contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    import json

    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": c.to_dict()}))
    lm = load_checkpoint(tmp_path)
    assert not lm.model.training
    torch.testing.assert_close(lm.model(_x()).logits, out.logits)
    arrays, _ = model_arrays(lm)
    assert "position_similarity" in arrays and "filter_components" not in arrays  # no linear filters to show


def test_load_strict_accepts_exact_state():
    m = _model()
    load_strict(_model(seed=5), m.state_dict())


def test_attention_stack_holds_every_map_in_one_block():
    m = _model()
    with torch.inference_mode():
        out = m(_x(batch=3))
    assert out.attention_stack.shape == (3, 2, 3, 17, 17)
    with torch.enable_grad():  # the autograd path computes each map on its own
        separate = torch.stack(m(_x(batch=3)).attentions, 1)
    torch.testing.assert_close(out.attention_stack, separate, rtol=0, atol=1e-6)
    assert out.attentions[0].data_ptr() == out.attention_stack.data_ptr()  # no copy
    with torch.enable_grad():
        assert m(_x()).attention_stack is None  # maps in the autograd graph stay separate tensors


def test_attention_out_block_is_written_in_place_and_checked():
    m = _model()
    x = _x(batch=3)
    c = m.config
    with torch.inference_mode():
        fresh = m(x).attention_stack
        block = m.new_attention_block(4)  # bigger than the batch: its first 3 images are used
        out = m(x, attention_out=block[:, :3])
        assert out.attention_stack.data_ptr() == block.data_ptr()
        torch.testing.assert_close(out.attention_stack, fresh, atol=0, rtol=0)
        shape = (c.depth, 3, c.num_heads, c.num_tokens, c.num_tokens)
        for bad in (
            torch.empty(shape[:-1] + (c.num_tokens + 1,)),  # wrong shape
            torch.empty(shape, dtype=torch.float64),  # wrong dtype
            torch.empty((1, *shape[1:])).expand(shape),  # every layer on the same memory
        ):
            with pytest.raises(ValueError, match="attention_out"):
                m(x, attention_out=bad)
    with torch.enable_grad(), pytest.raises(ValueError, match="without autograd"):
        m(x, attention_out=torch.empty(shape))
