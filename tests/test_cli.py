"""The batch CLI: outputs, references from transformers' own attentions, errors and exit codes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_checkpoint, load_image, prepare_image
from viz_app import cli
from viz_app.cli import main

import hf_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_vit")
    model = hf_models.build("vit", patch_size=16, image_size=64)
    hf_models.save(model, folder)
    return folder, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(0)
    for i, (w, h) in enumerate([(80, 60), (64, 64), (50, 120)]):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def numpy_rollout(attns: np.ndarray, num_prefix: int) -> np.ndarray:
    """Independent reference: (L, H, T, T) -> read-out row of the rollout over patches."""
    T = attns.shape[-1]
    R = np.eye(T)
    for a in attns.astype(np.float64):
        f = 0.5 * a.mean(0) + 0.5 * np.eye(T)
        R = (f / f.sum(1, keepdims=True)) @ R
    return R[0, num_prefix:]


@pytest.mark.parity
@pytest.mark.parametrize("grad_rollout", [True, False])  # without: one block of maps reused by every batch
def test_cli_matches_transformers_reference(tmp_path, hf_folder, images, grad_rollout, monkeypatch):
    folder, hf = hf_folder
    write = cli.write_outputs

    def slow_write(*a, **kw):  # the next batch's forward runs first: its maps must not leak in
        time.sleep(0.3)
        write(*a, **kw)

    monkeypatch.setattr(cli, "write_outputs", slow_write)
    monkeypatch.setattr(cli, "overlap_stages", lambda device: True)  # worker threads even on 2 cores
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            "--model",
            str(folder),
            "--batch-size",
            "2",
            "--save-attentions",
            *(["--grad-rollout"] if grad_rollout else []),
            "--out",
            str(out),
            str(images),
        ]
    )
    assert rc == 0
    lm = load_checkpoint(folder)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["grid"] == [4, 4] and summary["model"]["layers"] == 3
    assert len(summary["mean_attention_distance"]) == 3
    for stem in ("img0", "img1", "img2"):
        rec = np.load(out / f"{stem}.npz")
        x = prepare_image(load_image(images / f"{stem}.png"), lm.preprocessing).pixels[None]
        with torch.no_grad():
            ref = hf(pixel_values=x, output_attentions=True)
        ref_attn = torch.stack(ref.attentions, 1)[0].numpy()  # (L, H, T, T)
        np.testing.assert_allclose(rec["attentions"], ref_attn, atol=1e-5)
        np.testing.assert_allclose(rec["rollout"].ravel(), numpy_rollout(ref_attn, 1), atol=1e-5)
        np.testing.assert_allclose(rec["logits"], ref.logits[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(rec["readout_attention"], ref_attn[:, :, 0, 1:].reshape(3, 4, 4, 4), atol=1e-5)
        assert rec["mean_attention_distance"].shape == (3, 4)
        assert ("grad_rollout" in rec) == grad_rollout and (not grad_rollout or rec["grad_rollout"].shape == (4, 4))
        assert (out / f"{stem}_rollout.png").stat().st_size > 0
        assert len(summary["images"][stem]["top5"]) == 5
    model_npz = np.load(out / "model.npz")
    assert model_npz["position_similarity"].shape == (16, 16)
    assert model_npz["filter_components"].shape[1:] == (3, 16, 16)
    assert (out / "mad.png").stat().st_size > 0


def test_unreadable_file_is_reported_and_skipped(tmp_path, hf_folder, images, capsys):
    folder, _ = hf_folder
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    (bad / "good.png").write_bytes((images / "img1.png").read_bytes())
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(folder), "--out", str(out), str(bad)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert [s["file"].endswith("broken.png") for s in summary["skipped"]] == [True]
    assert (out / "good.npz").exists() and not (out / "broken.npz").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "--out", "x", "img.png"],  # no --model
        ["analyze", "--model", "/nope.pth", "--out", "OUT", "IMG"],
        ["analyze", "--model", "demo", "--batch-size", "0", "--out", "OUT", "IMG"],
        ["analyze", "--model", "demo", "--dtype", "fp64", "--out", "OUT", "IMG"],
        ["frobnicate"],
        ["analyze", "--model", "demo", "--grad-class", "99", "--out", "OUT", "IMG"],  # the demo has 8 classes
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, images, argv, capsys):
    argv = [str(images / "img0.png") if a == "IMG" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err


def test_bad_arguments_in_a_real_process(tmp_path, images):
    """The same through the interpreter: logging set up by main adds no second line."""
    argv = ["analyze", "--model", "/nope.pth", "--out", str(tmp_path / "o"), str(images / "img0.png")]
    proc = subprocess.run(
        [sys.executable, "-m", "viz_app", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("vit-lens: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_headless_model_writes_features(tmp_path, images):
    folder = tmp_path / "dino"
    hf_models.save(hf_models.build("dinov2_reg", patch_size=14, image_size=56), folder)
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(folder), "--grad-rollout", "--out", str(out), str(images / "img0.png")]) == 0
    rec = np.load(out / "img0.npz")
    assert "features" in rec and "logits" not in rec and "grad_rollout" not in rec
    assert rec["rollout"].shape == (4, 4)


def test_batch_size_larger_than_the_input_allocates_only_what_it_uses(tmp_path, hf_folder, images):
    folder, _ = hf_folder
    rc = main(["analyze", "--model", str(folder), "--batch-size", "1000000", "--out", str(tmp_path / "o"), str(images)])
    assert rc == 0 and len(list((tmp_path / "o").glob("*_rollout.png"))) == 3


def test_parallel_decoding_and_encoding_write_the_same_files(tmp_path, monkeypatch):
    """Where the model leaves cores free (a GPU), images are decoded and files encoded by a pool of
    threads: the files and summary.json's image list equal the sequential run's, byte for byte."""
    import hashlib

    from viz_app import cli

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for k in range(7):  # a batch of 4 and a short one; one damaged file among them
        Image.fromarray(rng.integers(0, 255, (40 + k, 60, 3), dtype=np.uint8)).save(src / f"im{k}.png")
    (src / "bad.png").write_bytes(b"not a png")

    import threading

    threads = set()
    real_read_one = cli.read_one

    def read_one(*a, **k):
        threads.add(threading.current_thread().name)
        return real_read_one(*a, **k)

    def run(out, parallel):
        if parallel:
            monkeypatch.setattr(cli, "overlap_stages", lambda device: True)
            monkeypatch.setattr(cli, "worker_threads", lambda device: 3)
            monkeypatch.setattr(cli, "read_one", read_one)
        rc = cli.main(["analyze", "--model", "demo", "--batch-size", "4", "--out", str(out), str(src)])
        monkeypatch.undo()
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != "summary.json"}
        summary = json.loads((out / "summary.json").read_text())
        return rc, files, summary

    rc1, files1, s1 = run(tmp_path / "seq", False)
    rc2, files2, s2 = run(tmp_path / "par", True)
    assert len(threads) > 1 and threading.current_thread().name not in threads  # decoded by the pool
    assert rc1 == rc2 == 1  # bad.png skipped in both
    assert files1 == files2 and len(files1) == 2 * 7 + 2  # npz + png per image, model.npz, mad.png
    assert s1["images"] == s2["images"] and s1["skipped"] == s2["skipped"]
    assert s1["written"] == s2["written"]  # written in the same order
