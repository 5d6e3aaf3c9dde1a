"""`vit-lens evaluate --engine ray` (viz_app/ray_evaluate.py) on a local 2-CPU Ray: the tables
and the summary equal the in-process engine's for images (one of them unreadable) and for the demo
scenes, a model actor killed in the middle loses nothing, a batch that fails for good is one line
and leaves no table, and the local engine never imports Ray. (Tally.merge itself: tests/test_evaluate.py.)"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viz_app import evaluate as ev
from viz_app import ray_engine

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "demo", "--device", "cpu", "--steps", "3", "--batch-size", "2"]
# what may differ between the engines' summaries: how the command was called, how long it took, and how it ran
RUN_KEYS = {"command", "wall_time_s", "images_per_s", "engine"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five images of different sizes and one file that is no image, in the middle of the order."""
    folder = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(1)
    for i, (w, h) in enumerate([(80, 60), (64, 64), (50, 120), (200, 150), (96, 96)]):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img1b.png").write_bytes(b"not an image at all")
    return folder


def evaluate(out: Path, *args: str) -> int:
    return ev.main([*COMMON, "--out", str(out), *args])


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def same_run(a: Path, b: Path, tables: tuple[str, ...]) -> None:
    """The same tables, byte for byte (rows in input order, numbers from the same batches), and the
    same summary but for RUN_KEYS."""
    for name in tables:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = summary(a), summary(b)
    assert {k: v for k, v in sa.items() if k not in RUN_KEYS} == {k: v for k, v in sb.items() if k not in RUN_KEYS}


@pytest.fixture(scope="module")
def local_images(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("local") / "out"
    assert evaluate(out, str(images)) == 1  # the unreadable file is skipped
    return out


@pytest.mark.slow
def test_images_on_ray_give_the_local_tables_and_summary(tmp_path, images, local_images, ray_session):
    out = tmp_path / "out"
    assert evaluate(out, "--engine", "ray", str(images)) == 1
    same_run(local_images, out, ("faithfulness.csv", "randomization.csv"))
    s = summary(out)
    assert s["inputs"]["evaluated"] == 5 and [x["file"] for x in s["inputs"]["skipped"]] == [str(images / "img1b.png")]
    assert s["engine"]["name"] == "ray" and s["engine"]["model_actors"] == 1
    assert summary(local_images)["engine"] == {"name": "local"}
    assert (out / "faithfulness.png").exists() and (out / "randomization.png").exists()
    rows = list(csv.DictReader((out / "faithfulness.csv").open()))
    assert {r["image"] for r in rows} == {f"img{i}" for i in range(5)}


@pytest.mark.slow
def test_scenes_on_ray_give_the_local_tables_and_summary(tmp_path, ray_session):
    args = ["--scenes", "7", "--batch-size", "3", "--modes", "drop", "--randomization", "none"]
    assert evaluate(tmp_path / "local", *args) == 0
    assert evaluate(tmp_path / "ray", "--engine", "ray", *args) == 0
    same_run(tmp_path / "local", tmp_path / "ray", ("faithfulness.csv", "pointing.csv"))
    assert summary(tmp_path / "ray")["inputs"]["evaluated"] == 7


def test_a_batch_of_scenes_across_two_chunks_is_the_local_batch():
    """Scenes are generated SCENE_CHUNK (100) at a time; a batch that spans two chunks is cut
    from both, as the local engine's scene_batches cuts it."""
    import pickle
    from types import SimpleNamespace

    from viz_app import ray_evaluate

    assert ev.SCENE_CHUNK == 100
    pre = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    local = list(ev.scene_batches(130, 9, 32, 16, pre))[6]  # scenes 96 .. 111
    row = ray_evaluate._scene_batch({"first": np.array([96]), "count": np.array([16])}, n=130, seed=9, size=32)
    got = pickle.loads(row["payload"][0])
    assert got["i"] == local.ids == list(range(96, 112))
    assert np.array_equal(got["label"], local.labels) and np.array_equal(got["mask"], local.masks)
    assert np.array_equal(ev.scene_pixels(got["image"], pre).numpy(), local.pixels.numpy())


@pytest.mark.slow
def test_a_killed_model_actor_loses_nothing(tmp_path, images, local_images, ray_session, monkeypatch):
    """The actor's process ends (os._exit) on its second batch: Ray starts another, which runs the
    batch again; the run ends with the in-process tables."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(ray_engine.TEST_HOOKS, json.dumps({"exit_on_batch": 2, "exit_marker": str(marker)}))
    out = tmp_path / "out"
    assert evaluate(out, "--engine", "ray", str(images)) == 1
    assert marker.exists()  # the actor did die
    same_run(local_images, out, ("faithfulness.csv", "randomization.csv"))


@pytest.mark.slow
def test_a_batch_that_fails_for_good_is_one_line_and_leaves_no_table(
    tmp_path, images, ray_session, monkeypatch, capsys
):
    monkeypatch.setenv(ray_engine.TEST_HOOKS, json.dumps({"fail_on_batch": 2}))
    out = tmp_path / "out"
    assert evaluate(out, "--engine", "ray", str(images)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vit-lens: error: the Ray pipeline stopped: RuntimeError: a test hook failed this batch")
    assert not any("Traceback" in line for line in err)
    s = summary(out)
    assert s["complete"] is False and s["exit_status"] == 2 and "RuntimeError" in s["stopped"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no table, no temporary file


def test_evaluate_address_needs_engine_ray_and_ray_missing_is_one_line(tmp_path, images, monkeypatch, capsys):
    assert evaluate(tmp_path / "a", "--address", "auto", str(images)) == 2
    assert "--address needs --engine ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert evaluate(tmp_path / "b", "--engine", "ray", str(images)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "requirements-ray.txt" in err
    assert not (tmp_path / "b").exists()


def test_the_local_evaluate_never_imports_ray(tmp_path, images):
    code = (
        "import sys\nfrom viz_app.cli import main\n"
        f"rc = main(['evaluate', '--model', 'demo', '--steps', '2', '--randomization', 'none', '--out', "
        f"{str(tmp_path / 'o')!r}, {str(images / 'img0.png')!r}])\n"
        "assert rc == 0, rc\nassert 'ray' not in sys.modules and 'viz_app.ray_evaluate' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_the_driver_checks_in_a_precision_its_cpu_has_and_the_summary_names_the_runs():
    """tf32 and fp16 are GPU formats: a CPU-only driver (a cluster's head node) checks the arguments
    with fp32 weights, and summary.json names the precision the actors ran in."""
    assert [ray_engine.driver_precision(p) for p in ("fp32", "tf32", "bf16", "fp16")] == [
        "fp32",
        "fp32",
        "bf16",
        "fp32",
    ]
    assert ray_engine.run_precision("tf32") == {"dtype": "float32", "precision": "tf32"}
    assert ray_engine.run_precision("fp16") == {"dtype": "float16", "precision": "fp16"}


def test_the_drivers_fp32_model_is_rounded_as_fp16_actors_hold_it_and_cpu_actors_refuse_gpu_formats():
    import torch

    from model import VisionTransformer, ViTConfig
    from viz_app.cli import UsageError

    m = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_dim=32))
    m.init_weights(seed=0)
    want = {k: v.half().float() for k, v in m.state_dict().items()}
    ray_engine.round_weights(m, torch.float16)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ray_engine.round_weights(m, torch.float32)  # tf32 keeps float32 weights: nothing changes
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    for device in ("cpu", "auto"):  # auto on a cluster without GPUs: CPU actors
        with pytest.raises(UsageError, match="--dtype fp16 is not offered"):
            ray_engine.check_precision({"device": device}, "fp16")
        ray_engine.check_precision({"device": device}, "bf16")
    ray_engine.check_precision({"device": "cuda"}, "tf32")
