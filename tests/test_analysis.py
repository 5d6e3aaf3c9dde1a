"""Property tests for every analysis defined in docs/DEFINITIONS.md."""

import math

import numpy as np
import pytest
import torch

from model import VisionTransformer, ViTConfig
from model.vit import sincos_2d_pos_embed
from viz_app import analysis as A
from viz_app.analysis.rollout import _residual_matrices, rollout_matrix
from viz_app.pipeline import run_forward


def random_attn(B=2, L=3, H=4, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, H, T, T, generator=g).mul(2).softmax(-1)


P, GRID = 1, (3, 3)  # T = 10


def test_identity_attention_gives_identity_rollout():
    eye = torch.eye(10).expand(2, 3, 4, 10, 10)
    torch.testing.assert_close(rollout_matrix(eye), torch.eye(10).expand(2, 10, 10))
    assert A.attention_rollout(eye, num_prefix=P, grid=GRID).abs().max() == 0


def test_uniform_attention_gives_flat_map():
    uni = torch.full((2, 3, 4, 10, 10), 0.1)
    m = A.attention_rollout(uni, num_prefix=P, grid=GRID)
    torch.testing.assert_close(m, torch.full_like(m, m[0, 0, 0].item()))
    for fusion in ("max", "min"):
        m = A.attention_rollout(uni, num_prefix=P, grid=GRID, head_fusion=fusion)
        assert torch.allclose(m, m.flatten()[0])


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_every_fused_matrix_is_row_stochastic(fusion, ratio):
    for a_hat in _residual_matrices(random_attn(), fusion=fusion, discard_ratio=ratio, start=0, end=None, protect=(0,)):
        torch.testing.assert_close(a_hat.sum(-1), torch.ones(2, 10))
        assert (a_hat >= 0).all()
    R = rollout_matrix(random_attn(), head_fusion=fusion, discard_ratio=ratio)
    torch.testing.assert_close(R.sum(-1), torch.ones(2, 10))


def test_discard_never_touches_the_readout_entry():
    attn = random_attn()
    attn[:, :, :, 0, 0] = 1e-9  # the smallest entry of all
    attn[:, :, :, 1, 1] = 1e-9
    from viz_app.analysis.rollout import _discard

    fused = A.fuse_heads(attn[:, 0])
    out = _discard(fused, 0.95, protect=(0,))
    assert (out[:, 0, 0] > 0).all()
    assert (out[:, 1, 1] == 0).all()  # not protected: discarded
    assert (out == 0).float().mean() > 0.9
    assert (fused[:, 0, 0] == attn[:, 0, :, 0, 0].mean(1)).all()  # input untouched


def test_discard_is_per_image_not_batch_item_zero():
    attn = random_attn(B=3)
    batch = A.attention_rollout(attn, num_prefix=P, grid=GRID, discard_ratio=0.7)
    for b in range(3):
        single = A.attention_rollout(attn[b : b + 1], num_prefix=P, grid=GRID, discard_ratio=0.7)
        torch.testing.assert_close(batch[b : b + 1], single)


def test_layer_range_and_per_layer_strip():
    attn = random_attn(L=4)
    strip = A.rollout_per_layer(attn, num_prefix=P, grid=GRID)
    assert strip.shape == (2, 4, 3, 3)
    torch.testing.assert_close(strip[:, -1], A.attention_rollout(attn, num_prefix=P, grid=GRID))
    torch.testing.assert_close(strip[:, 1], A.attention_rollout(attn, num_prefix=P, grid=GRID, end=1))
    one = A.attention_rollout(attn, num_prefix=P, grid=GRID, start=2, end=2)
    a_hat = 0.5 * attn[:, 2].mean(1) + 0.5 * torch.eye(10)
    a_hat = a_hat / a_hat.sum(-1, keepdim=True)
    torch.testing.assert_close(one, a_hat[:, 0, 1:].reshape(2, 3, 3))
    with pytest.raises(ValueError, match="layer range"):
        A.attention_rollout(attn, num_prefix=P, grid=GRID, start=3, end=1)


def test_rollout_matches_numpy_reference():
    attn = random_attn(B=1, L=3)
    ref = np.eye(10)
    for layer in range(3):
        f = attn[0, layer].double().numpy().mean(0)
        a = 0.5 * f + 0.5 * np.eye(10)
        a = a / a.sum(axis=1, keepdims=True)
        ref = a @ ref
    got = A.attention_rollout(attn, num_prefix=P, grid=GRID)[0].double().numpy()
    np.testing.assert_allclose(got, ref[0, 1:].reshape(3, 3), atol=1e-6)


def test_readout_choices():
    attn = random_attn(T=11)  # cls + dist + 9 patches
    kw = dict(num_prefix=2, grid=GRID, readout_tokens=(0, 1))
    auto = A.attention_maps(attn[:, 0], **kw)
    cls = A.attention_maps(attn[:, 0], readout="cls", **kw)
    dist = A.attention_maps(attn[:, 0], readout="dist", **kw)
    torch.testing.assert_close(auto, (cls + dist) / 2)
    torch.testing.assert_close(A.attention_maps(attn[:, 0], readout="mean", **kw), auto)
    patches = A.attention_maps(attn[:, 0], readout="patches", **kw)
    torch.testing.assert_close(patches, attn[:, 0, :, 2:, 2:].mean(-2).reshape(2, 4, 3, 3))
    with pytest.raises(ValueError, match="distillation"):
        A.attention_maps(attn[:, 0], readout="dist", num_prefix=1, grid=(3, 3), readout_tokens=(0,))
    with pytest.raises(ValueError, match="readout must be"):
        A.attention_maps(attn[:, 0], readout="bogus", **kw)


def test_head_maps_query_reverse_and_renormalize():
    attn = random_attn()[:, 1]  # (B, H, T, T)
    q = P + 4
    m = A.attention_maps(attn, num_prefix=P, grid=GRID, query=q)
    torch.testing.assert_close(m, attn[:, :, q, 1:].reshape(2, 4, 3, 3))
    r = A.attention_maps(attn, num_prefix=P, grid=GRID, query=q, drop_prefix=True)
    torch.testing.assert_close(r.sum((-1, -2)), torch.ones(2, 4))
    rev = A.attention_to_patch(attn, num_prefix=P, grid=GRID, patch=4)
    torch.testing.assert_close(rev, attn[:, :, 1:, 5].reshape(2, 4, 3, 3))
    with pytest.raises(ValueError):
        A.attention_maps(attn, num_prefix=P, grid=GRID, query=10)
    with pytest.raises(ValueError):
        A.attention_to_patch(attn, num_prefix=P, grid=GRID, patch=9)


def test_mass_threshold():
    maps = torch.tensor([[[0.5, 0.2], [0.2, 0.1]], [[0.25, 0.25], [0.25, 0.25]]])
    mask = A.mass_threshold_mask(maps, 0.6)
    assert mask[0].tolist() == [[True, True], [False, False]] or mask[0].tolist() == [[True, False], [True, False]]
    assert mask[0].sum() == 2 and mask[1].sum() == 3
    assert A.mass_threshold_mask(maps, 1.0)[1].all()
    with pytest.raises(ValueError):
        A.mass_threshold_mask(maps, 0.0)


def test_entropy():
    uni = torch.full((1, 2, 5, 5), 0.2)
    torch.testing.assert_close(A.attention_entropy(uni), torch.full((1, 2), math.log(5)))
    assert A.attention_entropy(torch.eye(5).expand(1, 2, 5, 5)).abs().max() < 1e-6


def test_mean_attention_distance_self_and_uniform():
    T = 5  # cls + 2x2 grid
    own = torch.eye(T).expand(1, 2, 3, T, T)
    assert A.mean_attention_distance(own, num_prefix=1, grid=(2, 2), patch_size=16).abs().max() == 0
    uni = torch.full((1, 2, 3, T, T), 1 / T)
    as_is = A.mean_attention_distance(uni, num_prefix=1, grid=(2, 2), patch_size=16)
    torch.testing.assert_close(as_is, torch.full((1, 2, 3), 16 * (2 + math.sqrt(2)) / 5))
    ren = A.mean_attention_distance(uni, num_prefix=1, grid=(2, 2), patch_size=16, convention="renormalized")
    torch.testing.assert_close(ren, torch.full((1, 2, 3), 16 * (2 + math.sqrt(2)) / 4))
    with pytest.raises(ValueError):
        A.mean_attention_distance(uni, num_prefix=1, grid=(2, 2), patch_size=16, convention="x")


def test_batch_equals_per_image_and_inputs_untouched():
    attn = random_attn(B=3)
    before = attn.clone()
    fns = [
        lambda a: A.attention_rollout(a, num_prefix=P, grid=GRID, head_fusion="max", discard_ratio=0.3),
        lambda a: A.rollout_per_layer(a, num_prefix=P, grid=GRID),
        lambda a: A.mean_attention_distance(a, num_prefix=P, grid=GRID, patch_size=8),
        lambda a: A.attention_entropy(a),
        lambda a: A.attention_maps(a[:, 2], num_prefix=P, grid=GRID, query=3),
        lambda a: A.mass_threshold_mask(A.attention_maps(a[:, 2], num_prefix=P, grid=GRID)),
        lambda a: A.gradient_rollout(a, a.flip(-1), num_prefix=P, grid=GRID),
    ]
    for fn in fns:
        batch = fn(attn)
        for b in range(3):
            torch.testing.assert_close(batch[b : b + 1], fn(attn[b : b + 1]))
    assert torch.equal(attn, before)


def test_gradient_rollout_hand_computation():
    attn, grads = (
        random_attn(B=1, L=2, H=2, T=4),
        torch.randn(1, 2, 2, 4, 4, generator=torch.Generator().manual_seed(4)),
    )
    R = np.eye(4)
    for layer in range(2):
        a = attn[0, layer].double().numpy()
        g = grads[0, layer].double().numpy()
        a_bar = np.maximum(g * a, 0).mean(0)
        R = R + a_bar @ R
    got = A.gradient_rollout(attn, grads, num_prefix=1, grid=(1, 3))
    np.testing.assert_allclose(got[0].double().numpy(), R[0, 1:].reshape(1, 3), atol=1e-6)


def test_gradient_rollout_of_input_independent_attention():
    """With q and k zeroed, attention is uniform whatever the input; the gradient map then is
    the hand computation R = I + sum-of-products of relu(G * A) with the autograd gradients."""
    cfg = ViTConfig(image_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3)
    m = VisionTransformer(cfg)
    m.init_weights(seed=1)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight[:64] = 0  # q and k rows
            blk.attn.qkv.bias[:64] = 0
    m.eval().requires_grad_(False)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    g = run_forward(m, x, gradients=True)
    attns, grads = g.attentions, g.grads
    torch.testing.assert_close(attns, torch.full_like(attns, 1 / 10))
    fwd = run_forward(m, x)
    torch.testing.assert_close(g.target, fwd.logits.argmax(-1))
    torch.testing.assert_close(g.logits, fwd.logits, atol=1e-5, rtol=0)
    # Hand computation, per image, by finite differences on the chosen logit is too coarse; use
    # the chain rule instead: dy/dA = dy/dO @ V^T per head, with O = A V, checked via autograd.
    got = A.gradient_rollout(attns, grads, num_prefix=1, grid=(3, 3))
    for b in range(2):
        R = np.eye(10)
        for layer in range(2):
            a_bar = np.maximum(grads[b, layer].double().numpy() / 10, 0).mean(0)
            R = R + a_bar @ R
        np.testing.assert_allclose(got[b].double().numpy(), R[0, 1:].reshape(3, 3), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in m.parameters())


def test_gradient_rollout_batch_independence_through_model():
    cfg = ViTConfig(image_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3)
    m = VisionTransformer(cfg)
    m.init_weights(seed=2)
    m.eval()
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2])
    grads = run_forward(m, x, gradients=True, target=t).grads
    for b in range(3):
        g1 = run_forward(m, x[b : b + 1], gradients=True, target=t[b : b + 1]).grads
        torch.testing.assert_close(grads[b : b + 1], g1, atol=1e-6, rtol=1e-5)


def test_sincos_similarity_decays_with_distance():
    grid = (8, 8)
    sim = A.position_similarity(sincos_2d_pos_embed(64, grid))
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(64))
    dists, means = A.similarity_decay(sim, grid)
    assert dists[:5].tolist() == [1, 2, 3, 4, 5]
    assert (means[1:5] < means[:4]).all()
    assert A.neighbour_contrast(sim, grid) > 0.1
    tiles = A.similarity_tiles(sim, grid)
    assert tiles.shape == (8, 8, 8, 8) and tiles[2, 3, 2, 3] == pytest.approx(1.0)
    rows, cols = A.similarity_by_offset(sim, grid)
    assert rows.shape == (7,) and cols.shape == (7,)
    torch.testing.assert_close(rows, cols, atol=1e-5, rtol=0)  # x and y treated alike


def test_compare_position_embeddings_on_common_grid():
    a = sincos_2d_pos_embed(32, (4, 4))
    b = sincos_2d_pos_embed(32, (6, 6))
    cmp = A.compare_position_embeddings(a, (4, 4), b, (6, 6), method="bilinear")
    assert cmp.grid == (6, 6) and cmp.sim_a.shape == (36, 36)
    torch.testing.assert_close(cmp.difference, cmp.sim_a - cmp.sim_b)
    same = A.compare_position_embeddings(b, (6, 6), b, (6, 6))
    assert same.difference.abs().max() == 0
    with pytest.raises(ValueError, match="unknown resampling"):
        A.compare_position_embeddings(a, (4, 4), b, (6, 6), method="cubic")


def test_filter_pca_recovers_known_components():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(48, 3, generator=g, dtype=torch.float64))  # orthonormal (48, 3)
    coeffs = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    coeffs = coeffs - coeffs.mean(0)
    W = (coeffs @ basis.T + torch.randn(48, generator=g, dtype=torch.float64)).float().reshape(200, 3, 4, 4)
    pca = A.filter_pca(W, k=28)
    assert pca.components.shape == (28, 3, 4, 4)
    for i in range(3):
        got = pca.components[i].flatten().double()
        assert abs(float(got @ basis[:, i])) > 0.999
        assert got[got.abs().argmax()] > 0  # sign fixed
    assert pca.explained_variance_ratio[:3].sum() > 0.999
    torch.testing.assert_close(A.filter_pca(-W).components[:3], pca.components[:3], atol=1e-4, rtol=0)


def test_token_norm_outliers():
    norms = torch.ones(2, 3, 10)
    norms[1, 2, 7] = 50
    out = A.token_norm_outliers(norms, num_prefix=1)
    assert out.shape == (2, 3, 9) and out.sum() == 1 and out[1, 2, 6]


def test_chunked_analyses_equal_the_whole_computation(monkeypatch):
    from viz_app.analysis import chunks

    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 4, 10, 10, generator=g).softmax(-1)  # (B, L, H, T, T)
    stacked = attn.transpose(0, 1).contiguous().transpose(0, 1)  # the model's (L, B, ...) layout
    kw = dict(num_prefix=1, grid=(3, 3), patch_size=16)
    whole = (A.mean_attention_distance(attn, **kw), A.attention_entropy(attn))
    monkeypatch.setattr(chunks, "CHUNK_VALUES", 150)  # one 10x10 map per chunk
    for x in (attn, stacked):
        torch.testing.assert_close(A.mean_attention_distance(x, **kw), whole[0])
        torch.testing.assert_close(A.attention_entropy(x), whole[1])


def test_map_chunks_follows_memory_order_of_a_block_view(monkeypatch):
    from viz_app.analysis import chunks

    monkeypatch.setattr(chunks, "CHUNK_VALUES", 3 * 7 * 7)  # several chunks, each across images
    block = torch.rand(4, 3, 5, 7, 7, generator=torch.Generator().manual_seed(0))  # (L, B, H, T, T)
    maps = block.transpose(0, 1)[..., 1:, 1:]  # (B, L, H, 6, 6) as the pipeline hands it on
    for fn in (lambda a: a.sum(-1), lambda a: a.amax(dim=(-2, -1))):
        want = torch.stack([torch.stack([fn(maps[b, layer]) for layer in range(4)]) for b in range(3)])
        torch.testing.assert_close(chunks.map_chunks(maps, fn), want, atol=0, rtol=0)


@pytest.mark.parametrize("readout", ["auto", "cls", "dist", "mean", "patches"])
def test_rollout_row_equals_row_of_the_full_product(readout):
    """attention_rollout carries only the read-out row; it must equal that row of R."""
    from viz_app.analysis.attention import readout_rows

    attn = random_attn(L=5)
    kw = dict(head_fusion="max", discard_ratio=0.3, start=1, end=4)
    R = rollout_matrix(attn, protect=(0, 1), **kw)
    want = readout_rows(R, num_prefix=2, readout_tokens=(0, 1), readout=readout)[..., 2:].reshape(2, 2, 4)
    got = A.attention_rollout(attn, num_prefix=2, grid=(2, 4), readout_tokens=(0, 1), readout=readout, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _prefix_share_by_loops(attn: torch.Tensor, P: int) -> torch.Tensor:
    """Written independently: for every map, the mean over patch queries i = P .. T-1 of the
    mass row i puts on keys 0 .. P-1 divided by the row's total mass."""
    a = attn.double()
    *lead, H, T, _ = a.shape
    flat = a.reshape(-1, H, T, T)
    out = torch.zeros(flat.shape[0], H, dtype=torch.float64)
    for m in range(flat.shape[0]):
        for h in range(H):
            shares = []
            for i in range(P, T):
                row = flat[m, h, i]
                prefix = sum(float(row[j]) for j in range(P))
                shares.append(prefix / float(row.sum()))
            out[m, h] = sum(shares) / len(shares)
    return out.reshape(*lead, H)


@pytest.mark.parametrize("P,grid", [(1, (3, 3)), (3, (2, 3)), (5, (1, 5))])
def test_prefix_mass_share_matches_loop_definition(P, grid):
    T = P + grid[0] * grid[1]
    attn = random_attn(B=2, L=3, H=4, T=T, seed=P)
    before = attn.clone()
    got = A.prefix_mass_share(attn, P)
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got.double(), _prefix_share_by_loops(attn, P))
    # a share: rows that do not sum to 1 (low-precision softmax) give the same value after scaling
    scale = torch.rand(2, 3, 4, T, 1, generator=torch.Generator().manual_seed(1)) + 0.5
    torch.testing.assert_close(A.prefix_mass_share(attn * scale, P), got)
    torch.testing.assert_close(got.double(), _prefix_share_by_loops(attn * scale, P))
    # prefix queries do not count: changing their rows changes nothing
    other = attn.clone()
    other[..., :P, :] = torch.eye(T)[:P]
    torch.testing.assert_close(A.prefix_mass_share(other, P), got)
    assert torch.equal(attn, before)
    for b in range(2):  # batch-aware: each image on its own gives the same
        torch.testing.assert_close(A.prefix_mass_share(attn[b : b + 1], P), got[b : b + 1])


def test_prefix_mass_share_limits_and_the_cls_sink_head():
    T, grid = 10, (3, 3)
    attn = random_attn(B=1, L=2, H=3, T=T)
    assert torch.equal(A.prefix_mass_share(attn, 0), torch.zeros(1, 2, 3))  # no prefix tokens: 0
    cls_only = attn.clone()
    cls_only[0, 1, 2] = 0.0
    cls_only[0, 1, 2, :, 0] = 1.0  # head (1, 2): every query attends only to the class token
    share = A.prefix_mass_share(cls_only, 1)
    assert share[0, 1, 2] == 1.0 and (share[0, :, :2] < 0.5).all() and (share[0, 0] < 0.5).all()
    # a head sending 99 % of each query's mass to the class token (rest uniform over patches)
    sink = attn.clone()
    sink[0, 1, 2, :, 0] = 0.99
    sink[0, 1, 2, :, 1:] = 0.01 / 9
    mad = A.mean_attention_distance(sink, num_prefix=1, grid=grid, patch_size=16)
    assert mad[0, 1, 2] == mad.min()  # "as_is" reads it as the most local head ...
    torch.testing.assert_close(A.prefix_mass_share(sink, 1)[0, 1, 2], torch.tensor(0.99))  # ... the share says why
    ren = A.mean_attention_distance(sink, num_prefix=1, grid=grid, patch_size=16, convention="renormalized")
    assert ren[0, 1, 2] > 50 * mad[0, 1, 2]  # renormalized: spread evenly over the patches, far


@pytest.mark.parametrize("P", [1, 4])
def test_as_is_is_renormalized_times_patch_share_per_query(P):
    from viz_app.analysis.distance import attention_distance_per_query, prefix_mass_per_query

    grid, ps = (3, 4), 16
    T = P + 12
    attn = random_attn(B=2, L=2, H=3, T=T, seed=5)
    # head (0, 0, 0): patch 0 puts 0.9 on the prefix and 0.1 on the far corner patch 11, every other
    # patch only on itself, so the share and the renormalized distance go together over the queries
    attn[0, 0, 0] = torch.eye(T)
    attn[0, 0, 0, P, :P] = 0.9 / P
    attn[0, 0, 0, P, P] = 0.0
    attn[0, 0, 0, P, P + 11] = 0.1
    kw = dict(num_prefix=P, grid=grid, patch_size=ps)
    as_is = attention_distance_per_query(attn, **kw)
    ren = attention_distance_per_query(attn, convention="renormalized", **kw)
    s = prefix_mass_per_query(attn, num_prefix=P)
    assert as_is.shape == ren.shape == s.shape == (2, 2, 3, 12)
    # per-query values against the definitions, by loops
    d = A.patch_distances(grid, ps).double()
    a = attn.double()
    for i in range(12):
        row = a[0, 1, 2, P + i]
        want = sum(float(row[P + j]) * float(d[i, j]) for j in range(12))
        assert abs(float(as_is[0, 1, 2, i]) - want) < 1e-3
        assert abs(float(ren[0, 1, 2, i]) - want / float(row[P:].sum())) < 1e-3
        assert abs(float(s[0, 1, 2, i]) - float(row[:P].sum())) < 1e-6
    # exactly, per query: as_is = renormalized * (1 - share)
    torch.testing.assert_close(as_is, ren * (1 - s))
    assert (as_is <= ren + 1e-5).all()
    # the means: the per-query relation becomes a product of means minus the covariance over queries
    mad = A.mean_attention_distance(attn, **kw)
    mad_r = A.mean_attention_distance(attn, convention="renormalized", **kw)
    share = A.prefix_mass_share(attn, P)
    torch.testing.assert_close(mad, as_is.mean(-1))
    torch.testing.assert_close(mad_r, ren.mean(-1))
    cov = ((ren - ren.mean(-1, keepdim=True)) * (s - s.mean(-1, keepdim=True))).mean(-1)
    torch.testing.assert_close(mad, mad_r * (1 - share) - cov, atol=1e-4, rtol=1e-5)
    assert (mad <= mad_r + 1e-5).all()
    # ... so the plain product of the means is off where the share varies over queries
    corner = float(A.patch_distances(grid, ps)[0, 11])
    torch.testing.assert_close(mad[0, 0, 0], torch.tensor(0.1 * corner / 12))
    torch.testing.assert_close(mad_r[0, 0, 0], torch.tensor(corner / 12))
    torch.testing.assert_close(share[0, 0, 0], torch.tensor(0.9 / 12))
    assert float(mad_r[0, 0, 0] * (1 - share[0, 0, 0])) > 9 * float(mad[0, 0, 0])
    # and exact where every query sends the same share to the prefix
    even = attn.double().clone()
    even[..., P:, :P] = 0.3 / P
    even[..., P:, P:] *= 0.7 / even[..., P:, P:].sum(-1, keepdim=True)
    even = even.float()
    torch.testing.assert_close(
        A.mean_attention_distance(even, **kw),
        A.mean_attention_distance(even, convention="renormalized", **kw) * (1 - A.prefix_mass_share(even, P)),
    )


@pytest.mark.parametrize(
    "P, grid, dtype", [(1, (3, 3), torch.float32), (0, (2, 5), torch.float32), (5, (3, 4), torch.bfloat16)]
)
def test_distance_statistics_equal_the_three_functions_bit_for_bit_and_the_definitions(monkeypatch, P, grid, dtype):
    from viz_app.analysis import chunks

    T = P + grid[0] * grid[1]
    # the model's block layout (L outermost), viewed batch first, with rows that do not sum to 1 in bf16
    attn = random_attn(B=3, L=2, H=4, T=T, seed=11).transpose(0, 1).contiguous().transpose(0, 1).to(dtype)
    monkeypatch.setattr(chunks, "CHUNK_VALUES", 3 * T * T)  # several chunks, one ending mid-head
    kw = dict(num_prefix=P, grid=grid, patch_size=16)
    got = A.distance_statistics(attn, **kw)
    assert torch.equal(got["as_is"], A.mean_attention_distance(attn, **kw))
    assert torch.equal(got["renormalized"], A.mean_attention_distance(attn, convention="renormalized", **kw))
    assert torch.equal(got["prefix_mass_share"], A.prefix_mass_share(attn, P))
    # mean_attention_distance shares distance_statistics' pass, prefix_mass_share does not: all
    # three against the definitions, in float64
    a, d = attn.double(), A.patch_distances(grid, 16).double()
    patches = a[..., P:, P:]
    torch.testing.assert_close(got["as_is"].double(), (patches * d).sum(-1).mean(-1), rtol=1e-5, atol=1e-4)
    renorm = ((patches * d).sum(-1) / patches.sum(-1)).mean(-1)
    torch.testing.assert_close(got["renormalized"].double(), renorm, rtol=1e-5, atol=1e-4)
    share = (a[..., P:, :P].sum(-1) / a[..., P:, :].sum(-1)).mean(-1)
    torch.testing.assert_close(got["prefix_mass_share"].double(), share, rtol=1e-5, atol=1e-6)
    if P == 0:
        assert not got["prefix_mass_share"].any()


def test_prefix_mass_share_chunked_and_on_the_models_layout(monkeypatch):
    from viz_app.analysis import chunks

    attn = random_attn(B=2, L=3, H=4, T=10, seed=3)
    stacked = attn.transpose(0, 1).contiguous().transpose(0, 1)  # the model's (L, B, ...) layout
    whole = A.prefix_mass_share(attn, 2)
    monkeypatch.setattr(chunks, "CHUNK_VALUES", 80)  # one 8x10 block of patch rows per chunk
    for x in (attn, stacked, attn.bfloat16()):
        torch.testing.assert_close(
            A.prefix_mass_share(x, 2), whole, atol=1e-2 if x.dtype == torch.bfloat16 else 0, rtol=0
        )
