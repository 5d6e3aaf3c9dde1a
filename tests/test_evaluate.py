"""`vit-lens evaluate`: its tables equal the probes run directly, its summary's intervals are
mean_ci's, its exit codes and atomic outputs match `analyze`'s."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model import VisionTransformer, ViTConfig, load_checkpoint, load_image, prepare_image
from viz_app import cli, probes, report
from viz_app import evaluate as ev
from viz_app.analysis.faithfulness import mean_ci
from viz_app.demo.evaluate import TEST_SEED, energy, patch_masks, pointing, pointing_strict
from viz_app.demo.scenes import make_batch
from viz_app.demo.train import to_pixels
from viz_app.pipeline import run_forward

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
MAPS = ("rollout", "grad_rollout", "last_layer", "head_L2H1", "centre_prior", "random")


def _save(model, folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _tiny(**kw):
    m = VisionTransformer(
        ViTConfig(
            **{
                **dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5),
                **kw,
            }
        )
    )
    m.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the init: maps and classes that differ between images
        for name, p in m.named_parameters():
            if p.ndim > 1 or "token" in name or "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _save(_tiny(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (32, 32), (25, 60)]):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(tiny, images, tmp_path_factory):
    """One evaluation of three images in one batch, every map (one head too), both modes."""
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = ["--model", str(tiny), "--out", str(out), "--steps", str(STEPS), "--head", "2,1", str(images)]
    assert ev.main(argv) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_equals_the_probes_run_directly(run, tiny, images):
    lm = load_checkpoint(str(tiny), device="cpu")
    files = sorted(images.glob("*.png"))
    pixels = torch.stack([prepare_image(load_image(f), lm.preprocessing).pixels for f in files])
    kw = report.rollout_options(lm.config, report.Settings())
    fwd = run_forward(lm.model, pixels, gradients=True)
    maps = probes.attribution_maps(lm, fwd, kw, head=(2, 1))
    rows = {(r["image"], r["map"], r["mode"], r["direction"]): r for r in _rows(run / "faithfulness.csv")}
    assert len(rows) == 3 * len(MAPS) * 2 * 2
    for mode in ("drop", "pixels"):
        # the command seeds image i's random orders with [--seed + 1, i]
        curves = probes.faithfulness_curves(
            lm.model, pixels, maps, mode=mode, steps=STEPS, target=fwd.target.numpy(), seed=TEST_SEED + 1
        )
        for name in MAPS:
            for d in ("deletion", "insertion"):
                auc, top1 = curves.auc((name, d)), curves.auc_agree((name, d))
                for b, f in enumerate(files):
                    r = rows[(f.stem, name, mode, d)]
                    assert float(r["auc_probability"]) == pytest.approx(auc[b], abs=1e-6)
                    assert float(r["auc_top1"]) == pytest.approx(top1[b], abs=1e-9)
                    assert int(r["target_class"]) == int(fwd.target[b])
                    got = [float(r[f"p_{i}"]) for i in range(STEPS + 1)]
                    np.testing.assert_allclose(got, curves.scores[(name, d)][b], atol=1e-6)
    rnd = probes.randomization(lm.model, pixels, lambda f: probes.attribution_maps(lm, f, kw, head=(2, 1)))
    rrows = _rows(run / "randomization.csv")
    assert len(rrows) == 3 * 4 * len(rnd.labels)  # images x maps without baselines x steps
    for r in rrows:
        b, s = [f.stem for f in files].index(r["image"]), int(r["step"])
        assert r["kind"] == "cascade" and r["step_label"] == rnd.labels[s]
        for k in ("spearman", "ssim"):
            want = getattr(rnd, k)[r["map"]][s, b]
            assert (r[k] == "" and np.isnan(want)) or float(r[k]) == pytest.approx(want, abs=1e-6)


def test_summary_intervals_are_mean_ci_of_the_table(run):
    s = json.loads((run / "summary.json").read_text())
    rows = _rows(run / "faithfulness.csv")
    assert s["exit_status"] == 0 and s["inputs"]["evaluated"] == 3 and s["images_per_s"] > 0
    assert s["settings"]["modes"] == ["drop", "pixels"] and s["settings"]["head"] == [2, 1]
    for mode in ("drop", "pixels"):
        for d in ("deletion", "insertion"):
            got = s["faithfulness"][mode][d]
            rnd = {
                r["image"]: float(r["auc_probability"])
                for r in rows
                if (r["map"], r["mode"], r["direction"]) == ("random", mode, d)
            }
            for name in MAPS:
                mine = [r for r in rows if (r["map"], r["mode"], r["direction"]) == (name, mode, d)]
                aucs = np.array([float(r["auc_probability"]) for r in mine])
                m, lo, hi = mean_ci(aucs)
                e = got[name]["auc_probability"]
                assert e["n"] == 3 and e["mean"] == pytest.approx(m) and e["ci95"] == pytest.approx([lo, hi])
                curve = np.mean([[float(r[f"p_{i}"]) for i in range(STEPS + 1)] for r in mine], axis=0)
                np.testing.assert_allclose(got[name]["mean_curve"], curve, atol=1e-9)
                if name == "random":
                    assert "difference_vs_random" not in got[name]
                    continue
                diff = aucs - np.array([rnd[r["image"]] for r in mine])
                m, lo, hi = mean_ci(diff)
                e = got[name]["difference_vs_random"]
                assert e["mean"] == pytest.approx(m) and e["ci95"] == pytest.approx([lo, hi])
                assert e["better_than_random"] == (hi < 0 if d == "deletion" else lo > 0)
    rrows = _rows(run / "randomization.csv")
    steps = s["randomization"]["steps"]
    for name, per in s["randomization"]["maps"].items():
        for i, lab in enumerate(steps):
            v = [float(r["spearman"] or "nan") for r in rrows if r["map"] == name and r["step_label"] == lab]
            m, lo, hi = mean_ci(np.array(v))
            assert per["spearman"][i]["mean"] == pytest.approx(m)
            if not np.isnan(lo):
                assert per["spearman"][i]["ci95"] == pytest.approx([lo, hi])


def test_outputs_are_complete_and_no_temporary_file_is_left(run):
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted(
        ["faithfulness.csv", "randomization.csv", "summary.json", "faithfulness.png", "randomization.png"]
    )
    for png in ("faithfulness.png", "randomization.png"):
        img = cv2.imread(str(run / png))
        assert img is not None and img.shape[0] > 500 and img.shape[1] > 1000
    header = (run / "faithfulness.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["image", "map", "mode", "direction", "target_class", "auc_probability", "auc_top1"]
    assert header[7:] == [f"p_{i}" for i in range(STEPS + 1)]


def test_an_interrupted_run_leaves_no_final_or_temporary_file(tiny, images, tmp_path, monkeypatch):
    calls = []

    def stop(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ev.Part({}, ev.Tally(), size=1)

    monkeypatch.setattr(ev, "evaluate_batch", stop)
    out = tmp_path / "out"
    argv = ["--model", str(tiny), "--out", str(out), "--batch-size", "1", str(images)]
    assert ev.main(argv) == 130
    assert list(out.iterdir()) == []


def test_a_corrupt_image_is_skipped_and_named_exit_1(tiny, images, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(images.glob("*.png"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(tiny), "--out", str(out), "--modes", "drop", "--steps", "2"]
    argv += ["--randomization", "none", "--batch-size", "2", str(folder)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err and "Traceback" not in err
    s = json.loads((out / "summary.json").read_text())
    assert s["exit_status"] == 1 and s["inputs"]["evaluated"] == 2
    assert [k["file"].endswith("broken.png") for k in s["inputs"]["skipped"]] == [True]
    assert {r["image"] for r in _rows(out / "faithfulness.csv")} == {"img0", "img1"}
    assert not (out / "randomization.csv").exists() and "randomization" not in s


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "OUT", "IMG"],  # no --model
        ["--model", "TINY", "--out", "OUT"],  # neither images nor scenes
        ["--model", "TINY", "--out", "OUT", "--scenes", "3", "IMG"],  # both
        ["--model", "TINY", "--out", "OUT", "--scenes", "0"],
        ["--model", "TINY", "--out", "OUT", "--modes", "drop,blur", "IMG"],
        ["--model", "TINY", "--out", "OUT", "--steps", "0", "IMG"],
        ["--model", "TINY", "--out", "OUT", "--batch-size", "0", "IMG"],
        ["--model", "TINY", "--out", "OUT", "--randomization", "some", "IMG"],
        ["--model", "TINY", "--out", "OUT", "--head", "two", "IMG"],
        ["--model", "TINY", "--out", "OUT", "--head", "3,1", "IMG"],  # the tiny model has 2 layers
        ["--model", "TINY", "--out", "OUT", "--class", "5", "IMG"],  # and 5 classes
        ["--model", "TINY", "--out", "OUT", "--rollout-layers", "1-3", "IMG"],
        ["--model", "/nope.pth", "--out", "OUT", "IMG"],
        ["--model", "TINY", "--out", "OUT", "/no/such/file.png"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny, images, tmp_path, argv, capsys):
    swap = {"IMG": str(images / "img0.png"), "OUT": str(tmp_path / "o"), "TINY": str(tiny)}
    assert cli.main(["evaluate", *[swap.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit-lens: error:") and "Traceback" not in err


@pytest.mark.slow
def test_bad_arguments_in_a_real_process(tmp_path, images):
    argv = ["evaluate", "--model", "/nope.pth", "--out", str(tmp_path / "o"), str(images / "img0.png")]
    proc = subprocess.run(
        [sys.executable, "-m", "viz_app", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("vit-lens: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_a_model_without_classifier_follows_its_features(tmp_path, images):
    path = _save(_tiny(num_classes=0, class_token=False, global_pool="avg", fc_norm=True), tmp_path)
    out = tmp_path / "out"
    argv = ["--model", str(path), "--out", str(out), "--steps", "2", "--modes", "pixels", str(images)]
    assert ev.main(argv) == 0
    rows = _rows(out / "faithfulness.csv")
    assert {r["map"] for r in rows} == {"rollout", "last_layer", "centre_prior", "random"}
    assert {r["auc_top1"] for r in rows} == {""} and {r["target_class"] for r in rows} == {"-1"}
    s = json.loads((out / "summary.json").read_text())
    assert s["score"].startswith("cosine similarity")


def test_scene_batches_do_not_depend_on_the_batch_size():
    pre = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # the demo model's
    one = list(ev.scene_batches(7, 5, 32, 7, pre))
    three = list(ev.scene_batches(7, 5, 32, 3, pre))
    assert [len(b.names) for b in three] == [3, 3, 1]
    images, labels, masks = make_batch(np.random.SeedSequence([5, 0]), 7, size=32)
    for got in (one, three):
        assert [n for b in got for n in b.names] == [f"scene_{i:05d}" for i in range(7)]
        assert np.array_equal(np.concatenate([b.labels for b in got]), labels)
        assert np.array_equal(np.concatenate([b.masks for b in got]), masks)
        torch.testing.assert_close(torch.cat([b.pixels for b in got]), to_pixels(images))  # the demo's own input


def test_baselines_do_not_depend_on_the_batch_size_and_foreign_labels_give_no_accuracy(tiny, tmp_path):
    """The random order of image i is the same whether it runs in a batch of 1 or of 4; scenes
    scored by a model whose classes are not the demo's shapes get no top-1 accuracy."""
    got = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        argv = ["--model", str(tiny), "--out", str(out), "--scenes", "4", "--steps", "3", "--batch-size", str(bs)]
        assert ev.main([*argv, "--modes", "drop", "--randomization", "none"]) == 0
        got[bs] = {(r["image"], r["map"], r["direction"]): r for r in _rows(out / "faithfulness.csv")}
        s = json.loads((out / "summary.json").read_text())
        assert "top1_accuracy" not in s and "not the demo scenes' shapes" in s["top1_accuracy_note"]
    assert got[1].keys() == got[4].keys()
    for key, row in got[1].items():
        assert row["auc_probability"] == got[4][key]["auc_probability"], key


def _same(a, b, where="tally") -> None:
    """Equal, recursively: dicts and lists item by item, floats and arrays within float32 rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)) and not (a and isinstance(a[0], (float, np.floating, np.ndarray))):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, (float, np.floating, np.ndarray, list, tuple)):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, atol=1e-7, err_msg=where)
    else:
        assert a == b, where


def test_batches_merged_in_order_hold_what_one_batch_holds(tiny):
    """Tally.merge over the Parts of two batches gives every field of the tally of one batch of
    the same four scenes (the ids seed the random orders, so the batching changes nothing)."""
    lm = load_checkpoint(str(tiny), device="cpu")
    kw = report.rollout_options(lm.config, report.Settings())
    args = SimpleNamespace(
        modes=["drop", "pixels"], steps=3, randomization="cascade", target_class=None, seed=5, head=None
    )

    def parts(bs):
        batches = ev.scene_batches(4, 5, 32, bs, lm.preprocessing)
        return [ev.evaluate_batch(lm, b, args, kw, SimpleNamespace(within=lambda *a: None)) for b in batches]

    (one,) = parts(4)
    merged = ev.Tally()
    halves = parts(2)
    assert [p.tally.images for p in halves] == [2, 2]
    for p in halves:
        merged.merge(p.tally)
    for field in dataclasses.fields(ev.Tally):
        _same(getattr(one.tally, field.name), getattr(merged, field.name), field.name)
    assert one.tally.pointing and one.tally.spearman and one.tally.curves  # every kind of field was filled
    # and the same table rows (a batch lists its rows map by map, so their order follows the batching)
    for name in one.rows:
        key = lambda r: tuple(str(v) for v in r[:4])  # noqa: E731 - image, map and mode or kind, direction or label
        _same(sorted(one.rows[name], key=key), sorted([r for p in halves for r in p.rows[name]], key=key), name)


@pytest.mark.slow
def test_scenes_on_the_demo_model_write_pointing(tmp_path):
    out = tmp_path / "out"
    argv = ["evaluate", "--model", "demo", "--scenes", "6", "--out", str(out), "--steps", "2"]
    argv += ["--modes", "drop", "--randomization", "none", "--batch-size", "4"]
    assert cli.main(argv) == 0
    rows = _rows(out / "pointing.csv")
    assert len(rows) == 6 * 5  # rollout, gradient rollout, last layer, centre prior, random
    lm = load_checkpoint("demo", device="cpu")
    images, labels, masks = make_batch(np.random.SeedSequence([TEST_SEED, 0]), 6, size=96)
    fwd = run_forward(lm.model, to_pixels(images), gradients=True)
    maps = probes.attribution_maps(lm, fwd, report.rollout_options(lm.config, report.Settings()))
    pm = patch_masks(masks, 8)
    for name in ("rollout", "grad_rollout", "last_layer"):
        mine = [r for r in rows if r["map"] == name]
        assert [int(r["label"]) for r in mine] == labels.tolist()
        assert [int(r["pointing"]) for r in mine] == pointing(maps[name], pm).astype(int).tolist()
        assert [int(r["pointing_strict"]) for r in mine] == pointing_strict(maps[name], masks, 8).astype(int).tolist()
        np.testing.assert_allclose([float(r["energy"]) for r in mine], energy(maps[name], pm), rtol=1e-6)
    s = json.loads((out / "summary.json").read_text())
    e = s["pointing"]["rollout"]["energy"]
    m, lo, hi = mean_ci(np.array([float(r["energy"]) for r in rows if r["map"] == "rollout"]))
    assert e["mean"] == pytest.approx(m) and e["ci95"] == pytest.approx([lo, hi])
    assert s["inputs"]["kind"] == "scenes" and s["inputs"]["scene_seed"] == TEST_SEED
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["faithfulness.csv", "pointing.csv", "summary.json", "faithfulness.png"]
    )


def test_intervals_count_only_finite_values_and_stay_strict_json():
    import json as _json
    import math as _math

    from viz_app.evaluate import ci

    got = ci([1.0, 3.0, float("inf"), float("nan"), float("-inf")])
    assert got["n"] == 2 and got["mean"] == 2.0
    assert _json.loads(_json.dumps(got, allow_nan=False)) == got
    assert ci([float("inf")]) == {"mean": None, "ci95": [None, None], "n": 0}
    assert not _math.isnan(ci([5.0])["mean"]) and ci([5.0])["ci95"] == [None, None]
