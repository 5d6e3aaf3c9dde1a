"""Mass-threshold masks at pixel level, their IoU with a target (viz_app.analysis.masks), and the demo
model's mask IoUs (viz_app.demo.evaluate, assets/demo/scores.json and MODEL_CARD.md), each checked
against a definition written here: pixel loops, np.kron, a numpy mass threshold."""

import json
import warnings

import numpy as np
import pytest
import torch

from model import load_checkpoint
from model.resources import DEMO_DIR
from viz_app import analysis as A
from viz_app.analysis.faithfulness import centre_prior
from viz_app.analysis.masks import DEFAULT_TAU, mask_iou, mask_ious, patch_mask_pixels
from viz_app.demo import evaluate as ev
from viz_app.demo.scenes import make_batch, patch_shares
from viz_app.demo.train import to_pixels
from viz_app.pipeline import run_forward

# ---------------------------------------------------------------- definitions written independently


def ref_iou(pmask: np.ndarray, target: np.ndarray, p: int) -> float:
    """One (gh, gw) patch mask against one (gh * p, gw * p) target, pixel by pixel."""
    inter = union = 0
    for y in range(target.shape[0]):
        for x in range(target.shape[1]):
            a, b = bool(pmask[y // p, x // p]), bool(target[y, x])
            inter += a and b
            union += a or b
    return inter / union if union else float("nan")


def ref_mass_mask(m: np.ndarray, tau: float) -> np.ndarray:
    """DINO's threshold on one (gh, gw) map: patches by decreasing value (ties: row-major order), kept
    while the mass of the patches kept so far is below tau."""
    v = m.astype(np.float64).ravel()
    v = v / v.sum()
    keep = np.zeros(v.size, bool)
    acc = 0.0
    for i in np.argsort(-v, kind="stable"):
        if acc >= tau:
            break
        keep[i] = True
        acc += v[i]
    return keep.reshape(m.shape)


def random_masks(g: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    return g.random(shape) < density


# ---------------------------------------------------------------- patch_mask_pixels


@pytest.mark.parametrize("p", [1, 3, 8])
def test_patch_mask_pixels_is_kron_numpy_and_torch(p):
    g = np.random.default_rng(p)
    m = random_masks(g, (2, 3, 3, 5), 0.4)  # a non-square grid, two leading dimensions
    want = np.kron(m, np.ones((1, 1, p, p), bool)).astype(bool)
    before = m.copy()
    got = patch_mask_pixels(m, p)
    assert isinstance(got, np.ndarray) and got.dtype == bool and got.shape == (2, 3, 3 * p, 5 * p)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(m, before)
    t = torch.from_numpy(m)
    got_t = patch_mask_pixels(t, p)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.bool
    np.testing.assert_array_equal(got_t.numpy(), want)
    assert torch.equal(t, torch.from_numpy(before))
    # non-zero values count as inside, whatever the dtype
    np.testing.assert_array_equal(patch_mask_pixels(m.astype(np.float32) * 0.5, p), want)
    np.testing.assert_array_equal(patch_mask_pixels(t.int(), p).numpy(), want)


def test_patch_mask_pixels_rejects_bad_input():
    with pytest.raises(ValueError):
        patch_mask_pixels(np.ones((2, 2), bool), 0)
    with pytest.raises(ValueError):
        patch_mask_pixels(np.ones((2, 2), bool), 2.5)
    with pytest.raises(ValueError):
        patch_mask_pixels(np.ones(4, bool), 2)


# ---------------------------------------------------------------- mask_iou


def test_mask_iou_equals_pixel_loop():
    g = np.random.default_rng(0)
    p, grid = 4, (3, 5)
    pm = random_masks(g, (12, *grid), 0.4)
    tg = random_masks(g, (12, grid[0] * p, grid[1] * p), 0.3)
    pm[0] = False  # an empty mask, target not empty: 0
    tg[1] = False  # an empty target, mask not empty: 0
    pm[2] = tg[2] = False  # both empty: NaN
    pm[3], tg[3] = True, True  # both full: 1
    tg[4] = patch_mask_pixels(pm[4], p)  # the same pixels: 1
    want = np.array([ref_iou(a, b, p) for a, b in zip(pm, tg)])
    before = (pm.copy(), tg.copy())
    got = mask_iou(pm, tg, p)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (12,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert got[0] == 0 and got[1] == 0 and np.isnan(got[2]) and got[3] == 1 and got[4] == 1
    assert np.isnan(want[2]) and np.isnan(got).sum() == 1
    np.testing.assert_array_equal(pm, before[0])
    np.testing.assert_array_equal(tg, before[1])
    # batch = per image; torch inputs (also mixed) give the same numpy result
    for i in range(len(pm)):
        np.testing.assert_array_equal(mask_iou(pm[i], tg[i], p), got[i])
    np.testing.assert_array_equal(mask_iou(torch.from_numpy(pm), torch.from_numpy(tg), p), got)
    np.testing.assert_array_equal(mask_iou(torch.from_numpy(pm), tg, p), got)
    assert isinstance(mask_iou(torch.from_numpy(pm), torch.from_numpy(tg), p), np.ndarray)


def test_mask_iou_partial_patch_by_hand():
    """A 2x2 grid of 4 px patches; the mask keeps patch (0, 0), the target is a 2x6 bar in the top rows."""
    pm = np.array([[True, False], [False, False]])
    tg = np.zeros((8, 8), bool)
    tg[0:2, 0:6] = True  # 8 pixels inside patch (0, 0), 4 inside patch (0, 1)
    assert mask_iou(pm, tg, 4) == pytest.approx(8 / (16 + 12 - 8))
    assert mask_iou(pm, tg, 4).shape == ()


def test_mask_iou_broadcasts_heads_against_one_target():
    g = np.random.default_rng(1)
    pm = random_masks(g, (2, 3, 4, 2, 3), 0.5)  # (B, L, H, gh, gw)
    tg = random_masks(g, (2, 6, 9), 0.4)  # (B, S_h, S_w), patch 3
    got = mask_iou(pm, tg[:, None, None], 3)
    assert got.shape == (2, 3, 4)
    for b, layer, h in np.ndindex(got.shape):
        assert got[b, layer, h] == pytest.approx(ref_iou(pm[b, layer, h], tg[b], 3), nan_ok=True)


def test_mask_iou_rejects_mismatched_shapes():
    pm = np.ones((2, 3, 3), bool)
    with pytest.raises(ValueError):
        mask_iou(pm, np.ones((2, 25, 24), bool), 8)  # not the 3x3 grid of 8 px
    with pytest.raises(ValueError):
        mask_iou(pm, np.ones((2, 24, 24), bool), 7)
    with pytest.raises(ValueError):
        mask_iou(pm, np.ones((3, 24, 24), bool), 8)  # leading dimensions that do not broadcast
    with pytest.raises(ValueError):
        mask_iou(pm, np.ones((2, 24, 24), bool), 0)


# ---------------------------------------------------------------- mask_ious


def test_mask_ious_equals_numpy_threshold_then_loop():
    g = np.random.default_rng(2)
    p, grid = 4, (4, 3)  # non-square
    maps = g.random((5, *grid)) ** 3  # continuous values: no ties
    tg = random_masks(g, (5, grid[0] * p, grid[1] * p), 0.35)
    before = maps.copy()
    for tau in (DEFAULT_TAU, 0.3, 0.9, 1.0):
        want = [ref_iou(ref_mass_mask(m, tau), t, p) for m, t in zip(maps, tg)]
        np.testing.assert_allclose(mask_ious(maps, tg, p, tau), want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mask_ious(torch.from_numpy(maps), torch.from_numpy(tg), p, tau), want, atol=1e-12)
    np.testing.assert_allclose(
        mask_ious(maps, tg, p), [ref_iou(ref_mass_mask(m, 0.6), t, p) for m, t in zip(maps, tg)], atol=1e-12
    )
    np.testing.assert_array_equal(maps, before)
    assert DEFAULT_TAU == 0.6 and A.DEFAULT_TAU == 0.6


def test_mask_ious_known_answers():
    p = 8
    tg = np.zeros((3, 24, 32), bool)  # a 3x4 grid
    tg[:, 8:24, 8:16] = True  # patches (1, 1) and (2, 1) exactly
    maps = np.full((3, 3, 4), 1e-4)
    maps[0, 1:3, 1] = 1.0  # all but a trace of the mass on the target: the mask is the target, IoU 1
    maps[1, 1, 1] = 1.0  # concentrated on one of the two target patches: IoU 1/2
    maps[2, 0, 3] = 1.0  # concentrated away from the target: 0
    np.testing.assert_allclose(mask_ious(maps, tg, p), [1.0, 0.5, 0.0])
    # the centre prior's mask is the same for every scene; ties at the threshold go in row-major order
    cp = centre_prior((12, 12))
    disk = np.hypot(*np.mgrid[-48:48, -48:48]) < 30  # a 96 px target for the 12x12 grid
    want = ref_iou(ref_mass_mask(cp, 0.6), disk, p)
    assert mask_ious(cp, disk, p) == pytest.approx(want) and 0 < want < 1


def test_mask_ious_nan_maps_and_read_only_input():
    tg = np.zeros((2, 16, 16), bool)
    tg[0, :8, :8] = True
    maps = np.ones((2, 2, 2))
    maps[:, 0, 1] = np.nan  # no defined mass share: an empty mask
    got = mask_ious(maps, tg, 8)
    assert got[0] == 0 and np.isnan(got[1])  # empty mask and a target: 0; both empty: NaN
    ro = np.broadcast_to(np.eye(2), (2, 2, 2))  # read-only, as evaluate's centre prior
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(mask_ious(ro, tg, 8), [ref_iou(ref_mass_mask(np.eye(2), 0.6), tg[0], 8), 0.0])
    with pytest.raises(ValueError):
        mask_ious(-np.ones((1, 2, 2)), tg[:1], 8)
    with pytest.raises(ValueError):
        mask_ious(np.ones((1, 2, 2)), tg[:1], 8, tau=0.0)


# ---------------------------------------------------------------- the demo evaluation


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint("demo", device="cpu")


def test_mean_defined_counts_nan_cases():
    parts = [np.array([[0.5, np.nan], [0.25, np.nan]]), np.array([[np.nan, np.nan]])]
    mean, n = ev._mean_defined(parts)
    assert mean[0] == pytest.approx(0.375) and np.isnan(mean[1]) and n == 4


def test_score_mask_ious_equal_a_direct_computation(demo):
    """score() on 6 scenes (two batches) against the read-out rows, the rollout and the target taken here."""
    n, batch, seed = 6, 3, ev.TEST_SEED
    s = ev.score(demo, n=n, batch=batch)
    c = demo.config
    p, grid = c.patch_size, c.grid
    heads, roll, cp, shares = [], [], [], []
    for i in range(0, n, batch):
        images, _, masks = make_batch(np.random.SeedSequence([seed, i]), batch, size=c.image_size[0])
        attn = run_forward(demo.model, to_pixels(images)).attentions  # (B, L, H, T, T)
        P = c.num_prefix_tokens
        rows = attn[:, :, :, 0, P:].reshape(batch, c.depth, c.num_heads, *grid).numpy()  # class token row
        rollout = A.attention_rollout(attn, num_prefix=P, grid=grid).numpy()  # the app's code, paper settings
        share = patch_shares(masks, p)
        for b in range(batch):
            heads.append([[ref_iou(ref_mass_mask(m, 0.6), masks[b], p) for m in layer] for layer in rows[b]])
            roll.append(ref_iou(ref_mass_mask(rollout[b], 0.6), masks[b], p))
            cp.append(ref_iou(ref_mass_mask(centre_prior(grid), 0.6), masks[b], p))
            shares.append(ref_iou(ref_mass_mask(share[b], 0.6), masks[b], p))
    mk = s["mask_iou"]
    assert mk["tau"] == 0.6 and mk["undefined_cases"] == 0
    np.testing.assert_allclose(mk["heads"], np.mean(heads, axis=0), atol=1e-9)
    assert np.shape(mk["heads"]) == (c.depth, c.num_heads)
    assert mk["maps"]["rollout"] == pytest.approx(np.mean(roll), abs=1e-9)
    assert mk["maps"]["centre_prior"] == pytest.approx(np.mean(cp), abs=1e-9)
    assert mk["target_shares"] == pytest.approx(np.mean(shares), abs=1e-9)
    assert set(mk["maps"]) == set(ev.MAPS)
    json.dumps(s)
    text = ev.format_scores(s)
    assert "IoU@0.6" in text and f"{mk['heads'][-1][-1]:.4f}" in text
    (bl, bh), best = ev.best_head(mk)
    assert best == np.max(mk["heads"]) == mk["heads"][bl - 1][bh - 1]


def test_scene_maps_heads_with_registers_and_distillation():
    """The read-out the heads are scored on: the mean of the rows the classifier reads (class and
    distillation token for a distilled head), patch columns only, registers left out."""
    from model import VisionTransformer, ViTConfig
    from model.config import Preprocessing
    from model.weights.load import LoadedModel

    cfg = ViTConfig(
        image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=8,
        distill_token=True, distilled_head=True, num_registers=2,
    )  # fmt: skip
    model = VisionTransformer(cfg)
    model.init_weights(seed=3)
    pre = Preprocessing(input_size=cfg.image_size, mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)
    lm = LoadedModel(model.eval().requires_grad_(False), cfg, pre, [str(i) for i in range(8)], "vit", "t", "t", "t")
    images, labels, masks = make_batch(5, 4, size=32)
    sm = ev.scene_maps(lm, images, labels, masks, ev.reinitialized(lm), np.random.default_rng(0))
    attn = run_forward(model, to_pixels(images)).attentions
    P = cfg.num_prefix_tokens
    assert P == 4 and cfg.readout_tokens == (0, 1)
    want = attn[:, :, :, :2, P:].mean(dim=-2).reshape(4, 2, 2, 4, 4).numpy()
    np.testing.assert_allclose(sm.head_maps, want, atol=1e-6)
    got = ev.mask_scores(sm, masks, 8)["heads"]
    for b, layer, h in np.ndindex(got.shape):
        assert got[b, layer, h] == pytest.approx(ref_iou(ref_mass_mask(want[b, layer, h], 0.6), masks[b], 8))


# ---------------------------------------------------------------- the shipped card and scores


def test_shipped_card_shows_the_mask_iou_table_of_scores_json(demo):
    scores = json.loads((DEMO_DIR / "scores.json").read_text())
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    mk = scores["mask_iou"]
    assert mk["tau"] == DEFAULT_TAU and np.shape(mk["heads"]) == (6, 6)
    assert "### Masks (as in DINO), tau = 0.6" in card and "| mask at tau = 0.6 | IoU |" in card
    assert f"| attention rollout (paper settings) | {mk['maps']['rollout']:.3f} |" in card
    for h, v in enumerate(mk["heads"][-1]):
        assert f"| layer 6 (last), head {h + 1}: read-out attention | {v:.3f} |" in card
    assert f"| centre prior (trivial: one mask for every scene) | {mk['maps']['centre_prior']:.3f} |" in card
    (bl, bh), best = ev.best_head(mk)
    assert f"| best head of any layer: layer {bl}, head {bh} | {best:.3f} |" in card
    # the whole card is what model_card writes from these scores: nothing edited by hand, nothing stale
    training = json.loads((DEMO_DIR / "config.json").read_text()).get("training", {})
    assert ev.model_card(demo, scores, training) == card


def test_sanity_scores_text_states_the_mask_iou():
    from viz_app.tabs.sanity import scores_text

    scores = json.loads((DEMO_DIR / "scores.json").read_text())
    mk = scores["mask_iou"]
    text = scores_text(scores)
    assert "Mask IoU" in text and "60%" in text
    for k in ("rollout", "last_layer_cls", "centre_prior"):
        assert f" {mk['maps'][k]:.2f}" in text
    old = {k: v for k, v in scores.items() if k != "mask_iou"}  # a scores.json from before the masks
    assert "Mask IoU" not in scores_text(old)


@pytest.mark.skipif(not (DEMO_DIR / "scores.json").is_file(), reason="demo model not installed")
def test_sanity_tab_shows_the_mask_iou_of_scores_json():
    """AppTest: the Sanity tab of the embedded demo model shows the mask IoUs of assets/demo/scores.json."""
    from test_app import no_problems, open_tab, run_app

    mk = json.loads((DEMO_DIR / "scores.json").read_text())["mask_iou"]
    at = run_app()
    open_tab(at, "Sanity")
    no_problems(at)
    shown = [md.value for md in at.markdown if "Mask IoU" in md.value]
    assert len(shown) == 1
    want = (
        f"rollout {mk['maps']['rollout']:.2f}, last layer's head-averaged map {mk['maps']['last_layer_cls']:.2f}, "
        f"centre prior {mk['maps']['centre_prior']:.2f}."
    )
    assert want in shown[0]
