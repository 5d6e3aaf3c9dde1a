"""The demo task: scene generator properties and a smoke-sized training run."""

import json

import numpy as np
import pytest

from model import load_checkpoint
from viz_app.demo import evaluate as ev
from viz_app.demo.scenes import CLASSES, make_batch, make_scene
from viz_app.demo.train import main as train_main


def test_masks_match_drawn_pixels():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        s = make_scene(rng, size=96, difficulty=1.0)
        assert s.mask.any() and s.mask.dtype == bool
        colours = np.unique(s.image[s.mask].reshape(-1, 3), axis=0)
        assert len(colours) == 1  # the target is one solid colour, on top of everything
        # the target's colour stands out from what surrounds it
        ring = np.zeros_like(s.mask)
        ys, xs = np.nonzero(s.mask)
        ring[max(0, ys.min() - 3) : ys.max() + 4, max(0, xs.min() - 3) : xs.max() + 4] = True
        ring &= ~s.mask
        diff = np.abs(s.image[ring].astype(int) - colours[0].astype(int)).sum(1)
        assert (diff > 0).mean() > 0.5


def test_distractor_blobs_are_never_round():
    import cv2

    from viz_app.demo.scenes import _draw_distractor

    rng = np.random.default_rng(3)
    blobs = 0
    for _ in range(300):
        m = _draw_distractor(rng, 96, 40.0)
        ys, xs = np.nonzero(m)
        if m.sum() < 0.5 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1):  # lines and scribbles fill little of their box
            continue
        blobs += 1
        edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ey, ex = np.nonzero(edge)
        r = np.hypot(ey - ys.mean(), ex - xs.mean())
        assert r.max() >= 1.3 * r.min()  # a drawn disk of this size stays under 1.1
    assert blobs > 30
    disk = cv2.circle(np.zeros((96, 96), np.uint8), (48, 48), 20, 1, -1).astype(bool)  # the check itself
    edge = disk & ~cv2.erode(disk.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ey, ex = np.nonzero(edge)
    r = np.hypot(ey - 48, ex - 48)
    assert r.max() < 1.1 * r.min()


def test_target_fully_inside_and_sized():
    for seed in range(30):
        s = make_scene(np.random.default_rng(seed), size=96)
        ys, xs = np.nonzero(s.mask)
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < 95 and xs.max() < 95
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert 0.09 * 96 <= extent <= 0.47 * 96  # 15-45 % of the side as bounding diameter


def test_classes_balanced_and_seeded():
    imgs, labels, masks = make_batch(123, 80)
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [10] * 8
    imgs2, labels2, masks2 = make_batch(123, 80)
    assert np.array_equal(imgs, imgs2) and np.array_equal(labels, labels2) and np.array_equal(masks, masks2)
    imgs3, _, _ = make_batch(124, 80)
    assert not np.array_equal(imgs, imgs3)
    with pytest.raises(ValueError):
        make_scene(np.random.default_rng(0), difficulty=2.0)


def test_smoke_training_loss_goes_down_and_exports(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--out", str(out), "--smoke"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    hist = cfg["training"]["history"]
    first, last = hist[0]["loss"], min(h["loss"] for h in hist[-3:])
    assert last < first - 0.3, (first, last)
    lm = load_checkpoint(out)
    assert lm.labels == list(CLASSES) and lm.config.num_classes == 8
    s = ev.score(lm, n=40, batch=20)
    assert 0 <= s["top1_accuracy"] <= 1 and set(s["pointing"]) == set(ev.MAPS)


def test_resume_continues_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--out", str(out), "--smoke", "--steps", "20"]) == 0
    state_a = (out / "model.safetensors").read_bytes()
    # a second call with the same recipe finds the finished state and does no new steps
    assert train_main(["--out", str(out), "--smoke", "--steps", "20"]) == 0
    assert (out / "model.safetensors").read_bytes() == state_a


def test_scoring_primitives():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, :8, :8] = True
    masks[1, 8:, 8:] = True
    pm = ev.patch_masks(masks, 8)
    assert pm.shape == (2, 2, 2) and pm[0, 0, 0] == 1 and pm[1, 1, 1] == 1
    maps = np.array([[[1.0, 0], [0, 0]], [[1.0, 0], [0, 0]]])
    assert ev.pointing(maps, pm).tolist() == [True, False]
    assert ev.energy(maps, pm).tolist() == [4.0, 0.0]


def _one_hot_map(B, grid, r, c):
    maps = np.zeros((B, *grid))
    maps[:, r, c] = 1.0
    return maps


def test_pointing_loose_and_strict_one_pixel_overlap():
    """The argmax patch (1, 1) of 8 px covers pixels 8..15; the target touches it in one pixel only."""
    masks = np.zeros((1, 24, 24), bool)
    masks[0, 0:9, 0:9] = True  # a 9x9 square: pixel (8, 8) is the corner pixel of patch (1, 1)
    maps = _one_hot_map(1, (3, 3), 1, 1)
    pm = ev.patch_masks(masks, 8)
    assert pm[0, 1, 1] == 1 / 64
    assert ev.pointing(maps, pm).tolist() == [True]  # loose: one pixel of overlap is a hit
    assert ev.pointing_strict(maps, masks, 8).tolist() == [False]  # strict: the centre pixel is outside


def test_pointing_loose_and_strict_centre_inside():
    masks = np.zeros((2, 24, 24), bool)
    masks[0, 12, 12] = True  # a single pixel: the centre pixel (8 + 8 // 2, 8 + 8 // 2) of patch (1, 1)
    masks[1, 10:14, 10:14] = True  # a 4x4 square in the middle of patch (1, 1)
    maps = _one_hot_map(2, (3, 3), 1, 1)
    assert ev.pointing(maps, ev.patch_masks(masks, 8)).tolist() == [True, True]
    assert ev.pointing_strict(maps, masks, 8).tolist() == [True, True]
    # the centre pixel is exactly (12, 12): the pixel one up and left of it, inside the patch, is not it
    off = np.zeros((1, 24, 24), bool)
    off[0, 11, 11] = True
    assert ev.pointing(maps[:1], ev.patch_masks(off, 8)).tolist() == [True]
    assert ev.pointing_strict(maps[:1], off, 8).tolist() == [False]
    # odd patch size: the true centre pixel (1 * 7 + 3) of patch (1, 2)
    odd = np.zeros((1, 21, 21), bool)
    odd[0, 10, 17] = True
    assert ev.pointing_strict(_one_hot_map(1, (3, 3), 1, 2), odd, 7).tolist() == [True]
    with pytest.raises(ValueError):
        ev.pointing_strict(maps, masks[:, :16], 8)  # masks too small for the 3x3 grid of 8 px


def test_pointing_strict_uses_each_maps_own_argmax():
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 0:8, 8:16] = True  # patch (0, 1) in both images
    maps = np.stack([_one_hot_map(1, (2, 2), 0, 1)[0], _one_hot_map(1, (2, 2), 1, 0)[0]])
    assert ev.pointing_strict(maps, masks, 8).tolist() == [True, False]
    assert ev.pointing(maps, ev.patch_masks(masks, 8)).tolist() == [True, False]


def test_score_reports_both_rules_and_the_card_states_them(monkeypatch):
    """score() on a tiny random model: both pointing rules for every map, strict never above loose."""
    from model import VisionTransformer
    from model.config import Preprocessing
    from model.weights.load import LoadedModel
    from viz_app.demo.train import SMOKE, Recipe

    cfg = Recipe(**SMOKE).config()
    model = VisionTransformer(cfg)
    model.init_weights(seed=1)
    pre = Preprocessing(input_size=cfg.image_size, mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)
    lm = LoadedModel(model.eval().requires_grad_(False), cfg, pre, list(CLASSES), "vit", "test", "test", "tiny")
    calls = []
    real = ev.pointing_strict
    monkeypatch.setattr(ev, "pointing_strict", lambda *a: calls.append(1) or real(*a))
    s = ev.score(lm, n=12, batch=6)
    assert set(s["pointing"]) == set(s["pointing_strict"]) == set(ev.MAPS)
    assert calls and all(0 <= s["pointing_strict"][k] <= s["pointing"][k] <= 1 for k in ev.MAPS)
    assert set(s["pointing_rules"]) == {"pointing", "pointing_strict"}
    json.dumps(s)  # what --json writes
    text = ev.format_scores(s)
    assert "strict" in text and ev.POINTING_RULES["pointing_strict"] in text
    card = ev.model_card(lm, s, {})
    assert "pointing game (strict)" in card and "centre pixel" in card and "by at least one pixel" in card
