"""Causal probes and the checks of which map to believe (issue 13), against definitions written
here by hand: token dropping, head ablation, perturbation curves, model randomization."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import VisionTransformer, ViTConfig
from viz_app import probes
from viz_app.analysis import faithfulness as FA

TINY = dict(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_dim=96, num_classes=7)
LAYOUTS = (
    {},
    {"distill_token": True, "distilled_head": True},
    {"num_registers": 2, "pos_embed_prefix": 1, "layer_scale": True},
    {"class_token": False, "global_pool": "avg", "fc_norm": True},
)


def _model(seed=0, biases=False, **kw):
    m = VisionTransformer(ViTConfig(**{**TINY, **kw}))
    m.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif biases and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval().requires_grad_(False)


def _x(batch=2, seed=0, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _head(m, x):
    """Final norm, pooling, pre-logits and classifier, written out."""
    x = m.norm(x)
    f = m.pool(x)
    if m.head_dist is not None:
        return (m.head(f) + m.head_dist(x[:, 1])) / 2
    return m.head(f)


# --- the forward's probe arguments ------------------------------------------------------------


@pytest.mark.parametrize("kw", LAYOUTS)
def test_no_probe_is_bit_identical_to_the_plain_forward(kw):
    m = _model(**kw)
    x = _x()
    c = m.config
    with torch.inference_mode():  # as the app runs it: the maps are written into one block
        plain = m(x, output_token_norms=True)
    for probe in (
        dict(keep=torch.arange(c.num_patches)),
        dict(head_mask=torch.ones(c.depth, c.num_heads)),
        dict(head_mask=torch.ones(2, c.depth, c.num_heads), head_fill="mean"),
    ):
        with torch.inference_mode():
            out = m(x, output_token_norms=True, **probe)
        assert torch.equal(out.logits, plain.logits)
        assert torch.equal(out.attention_stack, plain.attention_stack)
        assert torch.equal(out.token_norms, plain.token_norms)


@pytest.mark.parametrize("kw", LAYOUTS)
def test_token_dropping_equals_the_sub_sequence_built_by_hand(kw):
    m = _model(**kw)
    c = m.config
    x = _x()
    keep = torch.tensor([[0, 5, 6, 15], [3, 1, 12, 9]])  # per image, in any order
    out = m(x, keep=keep)
    # by hand: every token of the full sequence, then the prefix and the kept patches
    full = m.embed(x)
    P = c.num_prefix_tokens
    seq = torch.stack([torch.cat([full[b, :P], full[b, P + keep[b]]]) for b in range(2)])
    attns = []
    for blk in m.blocks:
        h = blk.norm1(seq)
        qkv = blk.attn.qkv(h).reshape(2, seq.shape[1], 3, c.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] @ qkv[1].transpose(-1, -2)) * (c.embed_dim // c.num_heads) ** -0.5).softmax(-1)
        attns.append(a)
        y = (a @ qkv[2]).transpose(1, 2).reshape(seq.shape)
        seq = seq + blk.ls1(blk.attn.proj(y))
        seq = seq + blk.ls2(blk.mlp(blk.norm2(seq)))
    torch.testing.assert_close(out.logits, _head(m, seq), atol=1e-5, rtol=1e-5)
    for got, want in zip(out.attentions, attns):
        assert got.shape == (2, c.num_heads, P + 4, P + 4)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_dropping_every_patch_keeps_the_prefix_and_is_refused_where_patches_are_pooled():
    m = _model()
    out = m(_x(), keep=torch.zeros(2, 0, dtype=torch.long))
    assert out.attentions[0].shape[-1] == 1
    pooled = _model(class_token=False, global_pool="avg", fc_norm=True)
    assert pooled.min_kept_patches == 1
    with pytest.raises(ValueError, match="at least 1"):
        pooled(_x(), keep=torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize(
    "bad",
    [
        dict(keep=torch.tensor([0, 0, 1])),
        dict(keep=torch.tensor([16])),
        dict(keep=torch.tensor([-1])),
        dict(keep=torch.tensor([0.5])),
        dict(keep=torch.zeros(3, 2, dtype=torch.long)),
        dict(head_mask=torch.ones(3, 3)),
        dict(head_mask=torch.ones(3, 2, 3)),
        dict(head_fill="median"),
    ],
)
def test_bad_probe_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        _model()(_x(), **bad)


@pytest.mark.parametrize("biases", [False, True])
def test_removing_every_head_of_a_block_skips_its_attention_branch_but_the_bias(biases):
    m = _model(biases=biases, layer_scale=True)
    c = m.config
    x = _x()
    mask = torch.ones(c.depth, c.num_heads)
    mask[1] = 0
    got = m(x, head_mask=mask).logits
    seq = m.embed(x)
    seq, _ = m.blocks[0](seq)
    blk = m.blocks[1]
    seq = seq + blk.ls1(blk.attn.proj.bias)  # nothing of any head; the projection's bias stays
    seq = seq + blk.ls2(blk.mlp(blk.norm2(seq)))
    torch.testing.assert_close(got, _head(m, seq), atol=1e-5, rtol=1e-5)
    if not biases:  # with no bias, exactly skipping the branch
        seq2 = m.embed(x)
        seq2, _ = m.blocks[0](seq2)
        seq2 = seq2 + blk.ls2(blk.mlp(blk.norm2(seq2)))
        torch.testing.assert_close(got, _head(m, seq2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_one_head_removed_by_hand(fill):
    m = _model(biases=True)
    c = m.config
    x = _x()
    layer, head = 0, 1
    mask = torch.ones(c.depth, c.num_heads)
    mask[layer, head] = 0
    got = m(x, head_mask=mask, head_fill=fill)
    seq = m.embed(x)
    blk = m.blocks[0]
    B, T, C = seq.shape
    D = C // c.num_heads
    qkv = blk.attn.qkv(blk.norm1(seq)).reshape(B, T, 3, c.num_heads, D).permute(2, 0, 3, 1, 4)
    a = ((qkv[0] @ qkv[1].transpose(-1, -2)) * D**-0.5).softmax(-1)
    per_head = a @ qkv[2]  # (B, H, T, D)
    per_head[:, head] = 0 if fill == "zero" else per_head[:, head].mean(dim=1, keepdim=True)
    seq = seq + blk.attn.proj(per_head.transpose(1, 2).reshape(B, T, C))
    seq = seq + blk.mlp(blk.norm2(seq))
    seq, _ = m.blocks[1](seq)
    torch.testing.assert_close(got.logits, _head(m, seq), atol=1e-5, rtol=1e-5)
    # the maps are those the heads compute, the removed head's included
    torch.testing.assert_close(got.attentions[0], a, atol=1e-6, rtol=1e-5)


def test_a_batch_of_head_masks_equals_one_run_per_mask():
    m = _model(biases=True)
    c = m.config
    x = _x(batch=1)
    masks = torch.ones(3, c.depth, c.num_heads)
    masks[0, 0, 0] = 0
    masks[1, 1, 2] = 0
    masks[2] = 0
    batched = m(x.expand(3, -1, -1, -1), head_mask=masks, head_fill="mean").logits
    for i in range(3):
        torch.testing.assert_close(batched[i], m(x, head_mask=masks[i], head_fill="mean").logits[0], atol=1e-5, rtol=0)


def test_probes_write_nothing_to_the_model():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(_x(), keep=torch.tensor([1, 2]), head_mask=torch.zeros(2, 3), head_fill="mean")
    probes.randomized_model(m, ["block 0", "head", "embedding"])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# --- perturbation curves ------------------------------------------------------------------------


def test_removal_counts_and_orders_by_hand():
    assert FA.removal_counts(16, 10).tolist() == [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16]
    assert FA.removal_counts(16, 4, min_kept=1).tolist() == [0, 4, 8, 12, 15]
    heat = np.array([[0.1, 0.5], [0.5, np.nan]])
    assert FA.removal_order(heat, "deletion").tolist() == [1, 2, 0, 3]  # ties row-major, NaN last
    assert FA.removal_order(heat, "insertion").tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError):
        FA.removal_order(heat, "sideways")


def test_auc_is_the_normalized_trapezoid():
    f = np.linspace(0, 1, 5)
    v = np.array([1.0, 0.5, 0.25, 0.0, 0.0])
    assert FA.curve_auc(v, f) == pytest.approx((v.sum() - v[0] / 2 - v[-1] / 2) / 4)
    assert FA.curve_auc(np.ones(11), np.linspace(0, 1, 11)) == pytest.approx(1.0)


def _curve_by_hand(m, x, order, mode, steps, target):
    """The target probability after each step, each input run on its own."""
    c = m.config
    N, p = c.num_patches, c.patch_size
    gw = c.grid[1]
    out = []
    for k in FA.removal_counts(N, steps, min_kept=m.min_kept_patches):
        removed = order[:k]
        if mode == "drop":
            kept = torch.tensor(sorted(set(range(N)) - set(removed.tolist())), dtype=torch.long)
            logits = m(x, keep=kept, output_attentions=False).logits
        else:
            y = x.clone()
            for i in removed:
                r, col = divmod(int(i), gw)
                y[:, :, r * p : (r + 1) * p, col * p : (col + 1) * p] = 0
            logits = m(y, output_attentions=False).logits
        out.append(float(F.softmax(logits, -1)[0, target]))
    return np.array(out)


@pytest.mark.parametrize("mode", ["drop", "pixels"])
@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg", "fc_norm": True}])
def test_curves_equal_the_ones_computed_by_hand(mode, kw):
    m = _model(**kw)
    x = _x(batch=1)
    heat = np.random.default_rng(0).random(m.config.grid)
    steps, target = 5, 3
    cv = probes.faithfulness_curves(
        m, x, {"mine": heat}, mode=mode, steps=steps, target=[target], random_orders=2, batch_size=7
    )
    for d in ("deletion", "insertion"):
        want = _curve_by_hand(m, x, FA.removal_order(heat, d), mode, steps, target)
        np.testing.assert_allclose(cv.scores[("mine", d)][0], want, atol=1e-6)
        assert cv.auc(("mine", d))[0] == pytest.approx(FA.curve_auc(want, np.linspace(0, 1, steps + 1)))
    # the random baseline: the mean of the seeded permutations' curves
    perms = probes._random_orders(m.config.num_patches, 2, 0, 0)
    want = np.mean([_curve_by_hand(m, x, p, mode, steps, target) for p in perms], axis=0)
    np.testing.assert_allclose(cv.scores[("random", "deletion")][0], want, atol=1e-6)
    # the centre prior is a map like any other
    want = _curve_by_hand(m, x, FA.removal_order(FA.centre_prior(m.config.grid), "deletion"), mode, steps, target)
    np.testing.assert_allclose(cv.scores[("centre_prior", "deletion")][0], want, atol=1e-6)
    # step 0 is the unperturbed image, shared by every curve; the same inputs run once
    assert len({float(v[0, 0]) for v in cv.scores.values()}) == 1
    assert cv.forwards < len(cv.scores) * (steps + 1)


def test_curves_batch_images_and_default_to_each_images_top1():
    m = _model()
    x = _x(batch=3)
    heat = np.random.default_rng(1).random((3, *m.config.grid))
    cv = probes.faithfulness_curves(m, x, {"mine": heat}, mode="drop", steps=4, baselines=False)
    top = m(x).logits.argmax(-1).numpy()
    assert cv.target.tolist() == top.tolist()
    for b in range(3):
        one = probes.faithfulness_curves(m, x[b : b + 1], {"mine": heat[b]}, mode="drop", steps=4, baselines=False)
        np.testing.assert_allclose(cv.scores[("mine", "deletion")][b], one.scores[("mine", "deletion")][0], atol=1e-6)
        assert cv.agree[("mine", "deletion")][b, 0] == 1.0


def test_curves_follow_the_ablated_model_when_heads_are_removed():
    m = _model(biases=True)
    x = _x(batch=1)
    heat = np.random.default_rng(2).random(m.config.grid)
    mask = probes.head_mask_for(m.config, [(1, 2), (2, 1)])
    cv = probes.faithfulness_curves(m, x, {"mine": heat}, steps=2, target=[0], baselines=False, head_mask=mask)
    logits = m(x, head_mask=mask).logits
    assert cv.scores[("mine", "deletion")][0, 0] == pytest.approx(float(F.softmax(logits, -1)[0, 0]), abs=1e-6)


def test_curves_without_a_classifier_follow_the_features():
    m = _model(num_classes=0)
    cv = probes.faithfulness_curves(m, _x(batch=1), {"mine": np.ones(m.config.grid)}, steps=2, baselines=False)
    assert cv.agree is None and cv.scores[("mine", "deletion")][0, 0] == pytest.approx(1.0)
    assert "cosine" in cv.score_name


# --- randomization --------------------------------------------------------------------------------


def _maps(m):
    def fn(fwd):
        c = m.config
        from viz_app import analysis as A

        kw = dict(num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens)
        out = {"rollout": A.attention_rollout(fwd.attentions, **kw)}
        if fwd.grads is not None:
            out["grad_rollout"] = A.gradient_rollout(fwd.attentions, fwd.grads, **kw)
        return {k: v.numpy() for k, v in out.items()}

    return fn


def test_randomizing_nothing_gives_correlation_one_and_shares_every_tensor():
    m = _model()
    same = probes.randomized_model(m, [])
    for (k, a), b in zip(m.state_dict().items(), same.state_dict().values()):
        assert a.data_ptr() == b.data_ptr(), k
    x = _x()
    torch.testing.assert_close(same(x).logits, m(x).logits, atol=0, rtol=0)
    r = probes.randomization(m, x, _maps(m))
    assert r.labels[0] == "original"
    for name in r.spearman:
        np.testing.assert_allclose(r.spearman[name][0], 1.0)
        np.testing.assert_allclose(r.ssim[name][0], 1.0)


def test_randomized_parts_are_fresh_and_the_rest_shared():
    m = _model(num_registers=1, layer_scale=True)
    r = probes.randomized_model(m, ["block 1", "head"], seed=3)
    ms, rs = m.state_dict(), r.state_dict()
    for k in ms:
        part = probes.part_of(k)
        if part in ("block 1", "head"):
            assert rs[k].data_ptr() != ms[k].data_ptr()
            if k.endswith("attn.qkv.weight"):
                assert not torch.equal(rs[k], ms[k]) and rs[k].std() == pytest.approx(0.02, rel=0.2)
            if k.endswith("norm1.weight"):
                assert torch.equal(rs[k], torch.ones_like(rs[k]))
        else:
            assert rs[k].data_ptr() == ms[k].data_ptr(), k
    again = probes.randomized_model(m, ["block 1", "head"], seed=3)  # seeded: the same weights
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), again.state_dict().values()))


def test_cascade_and_independent_steps():
    assert probes.cascade_steps(2) == [
        ("head", ("head",)),
        ("block 2", ("head", "block 1")),
        ("block 1", ("head", "block 1", "block 0")),
        ("embedding", ("head", "block 1", "block 0", "embedding")),
    ]
    assert [lab for lab, _ in probes.independent_steps(2)] == ["head", "block 1", "block 2", "embedding"]


def test_randomization_compares_each_step_with_the_original_by_spearman_and_ssim():
    m = _model()
    x = _x()
    r = probes.randomization(m, x, _maps(m), kind="cascade", seed=1)
    assert r.maps["rollout"].shape == (len(r.labels), 2, *m.config.grid)
    # the head does not change attention: rollout unchanged after the first step, gradients do
    np.testing.assert_allclose(r.maps["rollout"][1], r.maps["rollout"][0], atol=1e-6)
    for s, lab in enumerate(r.labels):
        parts = dict(probes.cascade_steps(2)).get(lab, ())
        rm = probes.randomized_model(m, parts, seed=1)
        fwd_maps = _maps(m)(probes.run_forward(rm, x, gradients=True, target=r_target(m, x)))
        np.testing.assert_allclose(r.maps["grad_rollout"][s], fwd_maps["grad_rollout"], atol=1e-6)
        np.testing.assert_allclose(r.spearman["rollout"][s], FA.spearman(r.maps["rollout"][s], r.maps["rollout"][0]))


def r_target(m, x):
    return m(x).logits.argmax(-1)


# --- head effects, keeping the top of a map -------------------------------------------------------


def test_head_effects_equal_one_run_per_head():
    m = _model(biases=True)
    x = _x(batch=1)
    target = 2
    base = m(x).logits[0, target]
    drops = probes.head_effects(m, x, target)
    assert drops.shape == (2, 3)
    for layer in range(2):
        for h in range(3):
            got = m(x, head_mask=probes.head_mask_for(m.config, [(layer + 1, h + 1)])).logits[0, target]
            assert drops[layer, h] == pytest.approx(float(base - got), abs=1e-5)
    # on top of heads already removed, and for a list of heads
    base_mask = probes.head_mask_for(m.config, [(1, 1)])
    some = probes.head_effects(m, x, target, heads=[(2, 3)], base_mask=base_mask, head_fill="mean", batch_size=1)
    both = probes.head_mask_for(m.config, [(1, 1), (2, 3)])
    want = (
        m(x, head_mask=base_mask, head_fill="mean").logits[0, target]
        - m(x, head_mask=both, head_fill="mean").logits[0, target]
    )
    assert some[0] == pytest.approx(float(want), abs=1e-5)
    with pytest.raises(ValueError):
        probes.head_mask_for(m.config, [(3, 1)])


def test_top_share_keep_and_scatter():
    heat = np.arange(16.0).reshape(4, 4)
    assert probes.top_share_keep(heat, 0.25).tolist() == [12, 13, 14, 15]
    assert probes.top_share_keep(heat, 0.01).tolist() == [15]
    assert len(probes.top_share_keep(heat, 1.0)) == 16
    grid = probes.scatter_kept(np.array([1.0, 2.0]), np.array([3, 0]), (2, 2))
    assert grid[0, 0] == 2.0 and grid[1, 1] == 1.0 and np.isnan(grid[0, 1])


# --- Spearman and SSIM against independent implementations -------------------------------------


def test_spearman_and_ssim_match_scipy_and_scikit_image():
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    for shape in [(12, 12), (14, 14), (5, 9), (3, 4)]:
        a = rng.random(shape)
        b = a + 0.3 * rng.random(shape)
        b[0, :2] = b[0, 0]  # a tie
        assert FA.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
        w = min(7, *shape)
        w = w if w % 2 else w - 1
        want = metrics.structural_similarity(FA.minmax(a), FA.minmax(b), data_range=1, win_size=w)
        assert FA.ssim(a, b) == pytest.approx(want, abs=1e-12)
    assert np.isnan(FA.spearman(np.ones((3, 3)), rng.random((3, 3))))
    assert FA.spearman(rng.random((4, 2, 5, 5)), rng.random((5, 5))).shape == (4, 2)


def test_mean_ci():
    m, lo, hi = FA.mean_ci(np.array([1.0, 2.0, 3.0, np.nan]))
    assert m == 2.0 and hi - m == pytest.approx(1.959963984540054 * 1.0 / np.sqrt(3))
    assert np.isnan(FA.mean_ci(np.array([1.0]))[1])


def test_probe_batches_keep_one_layers_scores_bounded():
    assert probes.probe_batch_size(ViTConfig()) == 32  # ViT-B/16 at 224 px
    large = ViTConfig(image_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)
    assert probes.probe_batch_size(large) == 2
    c = large
    assert probes.probe_batch_size(large) * c.num_heads * c.num_tokens**2 * 4 <= probes.PROBE_BATCH_BYTES


def test_the_favoured_map_is_never_a_baseline():
    fr = np.linspace(0, 1, 3)

    def curves(**rows):
        scores = {(k, "deletion"): np.array([v]) for k, v in rows.items()}
        return probes.Curves("drop", 2, fr, np.array([0, 1, 2]), np.array([0]), scores, None, "p", maps=tuple(rows))

    f = probes.favoured(curves(rollout=[1, 0.5, 0], centre_prior=[1, 0, 0], random=[1, 1, 0]))
    assert f["map"] == "rollout" and f["auc"] == pytest.approx(0.5)
    assert f["margin_vs_random"] == pytest.approx(0.25) and f["margin_vs_centre"] == pytest.approx(-0.25)
    with pytest.raises(ValueError):
        probes.favoured(curves(centre_prior=[1, 0, 0], random=[1, 1, 0]))
