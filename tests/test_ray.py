"""`vit-lens analyze --engine ray` (viz_app/ray_engine.py) on a local 2-CPU Ray: the same results
as the in-process engine, a worker killed in the middle (the actor's process ends for real), a
driver killed in the middle and the rerun that completes it, reruns that skip what is done, and
the one-line refusal where Ray is not installed.

One Ray session is shared by the module (starting one takes seconds); the engine uses a Ray that
is already running as it is and leaves it running."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viz_app import cli, ray_engine
from viz_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
BATCH = "2"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five images (two of them named img0, in different folders) and one file that is no image."""
    folder = tmp_path_factory.mktemp("imgs")
    (folder / "sub").mkdir()
    g = np.random.default_rng(0)
    sizes = [(80, 60), (64, 64), (50, 120), (200, 150), (96, 96)]
    paths = [folder / f"img{i}.png" for i in range(4)] + [folder / "sub" / "img0.png"]
    for p, (w, h) in zip(paths, sizes):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    (folder / "bad.png").write_bytes(b"not an image at all")
    return folder


def analyze(out: Path, inputs, *extra: str) -> int:
    argv = ["analyze", "--model", "demo", "--device", "cpu", "--batch-size", BATCH, *extra, "--out", str(out)]
    return main(argv + [str(p) for p in inputs])


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, images):
    out = tmp_path_factory.mktemp("local") / "out"
    assert analyze(out, [images]) == 1  # bad.png is skipped
    return out


@pytest.fixture(scope="module")
def ray_out(tmp_path_factory, images, ray_session):
    out = tmp_path_factory.mktemp("ray") / "out"
    assert analyze(out, [images], "--engine", "ray") == 1
    return out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def no_temporaries(out: Path) -> bool:
    return not any(p.name.startswith(cli.TEMP_PREFIX) for p in out.rglob("*"))


def assert_same_outputs(a: Path, b: Path, stems, *, exact: bool = True) -> None:
    """Each image's report arrays (and its report_json) and its overlay PNG, as the local engine wrote them."""
    for stem in stems:
        za, zb = np.load(a / f"{stem}.npz"), np.load(b / f"{stem}.npz")
        assert za.files == zb.files, stem
        for k in za.files:
            if exact or k == "report_json" or za[k].dtype.kind != "f":
                assert np.array_equal(za[k], zb[k]), (stem, k)
            else:  # batched differently (a resumed run): float32 rounding
                np.testing.assert_allclose(za[k], zb[k], rtol=1e-5, atol=1e-6, err_msg=f"{stem} {k}")
        if exact:
            assert (a / f"{stem}_rollout.png").read_bytes() == (b / f"{stem}_rollout.png").read_bytes(), stem
        else:
            assert Image.open(b / f"{stem}_rollout.png").size == Image.open(a / f"{stem}_rollout.png").size


@pytest.mark.slow
def test_ray_engine_gives_the_in_process_results(local_ref, ray_out):
    ref, got = summary(local_ref), summary(ray_out)
    assert got["images"] == ref["images"]  # files, output names (img0 and img0_1), top-5 with labels
    assert len(got["images"]) == 5 and {"img0", "img0_1"} <= set(got["images"])
    assert got["skipped"] == ref["skipped"] and got["not_written"] == ref["not_written"] == []
    assert got["exit_status"] == ref["exit_status"] == 1 and got["complete"] is True
    for key in ("model", "preprocessing", "settings", "dtype", "device", "schema_version"):
        assert got[key] == ref[key], key
    np.testing.assert_allclose(got["mean_attention_distance"], ref["mean_attention_distance"], rtol=1e-5)
    assert_same_outputs(local_ref, ray_out, ref["images"])
    ma, mb = np.load(local_ref / "model.npz"), np.load(ray_out / "model.npz")
    assert ma.files == mb.files and all(np.array_equal(ma[k], mb[k]) for k in ma.files)
    assert Image.open(ray_out / "mad.png").size == Image.open(local_ref / "mad.png").size
    assert no_temporaries(ray_out)

    # the Parquet rows: one per image, the report's numbers
    import pyarrow.parquet as pq

    table = pq.read_table(ray_out / ray_engine.PARQUET_DIR)
    rows = {r["stem"]: r for r in table.to_pylist()}
    assert set(rows) == set(ref["images"]) and table.num_rows == 5
    assert table.column_names == [name for name, _, _ in ray_engine._columns()]
    for stem, r in rows.items():
        z = np.load(local_ref / f"{stem}.npz")
        assert r["file"] == ref["images"][stem]["file"] and r["npz"] == f"{stem}.npz"
        assert r["top5_classes"] == z["top5_classes"].tolist()
        assert r["top5_labels"] == [t["label"] for t in ref["images"][stem]["top5"]]
        for key in ("features", "rollout", "mean_attention_distance", "attention_entropy"):
            assert np.array_equal(np.float32(r[key]), z[key].reshape(-1)), (stem, key)
        assert r["finite"] is True and r["npz_size"] == (ray_out / r["npz"]).stat().st_size

    # the aggregates, against the per-image files
    agg = got["aggregates"]
    rollouts = np.stack([np.load(local_ref / f"{s}.npz")["rollout"] for s in ref["images"]])
    np.testing.assert_allclose(agg["mean_rollout"], rollouts.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(agg["mean_attention_distance"], ref["mean_attention_distance"], rtol=1e-5)
    top1 = {}
    for e in ref["images"].values():
        top1[e["top5"][0]["class"]] = top1.get(e["top5"][0]["class"], 0) + 1
    assert {c["class"]: c["images"] for c in agg["top1_counts"]} == top1
    assert sum(c["images"] for c in agg["top5_counts"]) == 5 * 5 and agg["images"] == 5


@pytest.mark.slow
def test_batches_that_do_not_fill_the_blocks_are_still_the_local_batches(tmp_path, images, ray_session):
    """9 inputs in batches of 4: Ray Data's blocks would regroup single images into [0-3], [4-5],
    [6-8]; with one row per batch every forward pass sees the local batch: the same bytes."""
    folder = tmp_path / "nine"
    folder.mkdir()
    for p in sorted(images.rglob("*.png")):  # 6 files (one no image), then 3 more images
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    for k, p in enumerate(sorted(images.glob("img*.png"))[:3]):
        shutil.copy(p, folder / f"z{k}.png")
    assert len(list(folder.iterdir())) == 9
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    assert analyze(local, [folder], "--batch-size", "4") == 1
    assert analyze(ray_run, [folder], "--batch-size", "4", "--engine", "ray") == 1
    s = summary(ray_run)
    assert s["images"] == summary(local)["images"] and len(s["images"]) == 8
    assert_same_outputs(local, ray_run, s["images"])


def hooks(monkeypatch, **kw) -> None:
    monkeypatch.setenv(
        ray_engine.TEST_HOOKS, json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
    )


@pytest.mark.slow
def test_a_rerun_skips_what_is_done_and_redoes_what_is_missing(tmp_path, images, ray_out, local_ref, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(ray_out, out)  # copy2: the files keep their modification times
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".npz", ".png")}
    calls = tmp_path / "calls"
    calls.mkdir()
    hooks(monkeypatch, count_dir=calls)
    assert analyze(out, [images], "--engine", "ray") == 1
    assert list(calls.iterdir()) == []  # the model saw no image
    s = summary(out)
    assert s["engine"]["images_resumed"] == 5 and s["engine"]["images_analysed"] == 0
    assert s["images"] == summary(ray_out)["images"] and s["complete"] is True
    for stem in s["images"]:  # not written again
        assert (out / f"{stem}.npz").stat().st_mtime_ns == before[f"{stem}.npz"]
    assert (out / "model.npz").stat().st_mtime_ns != before["model.npz"]  # the run's files are
    agg, ref_agg = s["aggregates"], summary(ray_out)["aggregates"]
    assert agg["top1_counts"] == ref_agg["top1_counts"] and agg["images"] == ref_agg["images"] == 5
    np.testing.assert_allclose(agg["mean_rollout"], ref_agg["mean_rollout"], rtol=1e-6)

    # an overlay deleted, another input changed: those two are analysed again, nothing else
    (out / "img1_rollout.png").unlink()
    changed = tmp_path / "in"
    shutil.copytree(images, changed)
    out2 = tmp_path / "out2"
    assert analyze(out2, [changed], "--engine", "ray") == 1
    os.utime(changed / "img3.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    for p in calls.iterdir():
        p.unlink()
    assert analyze(out, [images], "--engine", "ray") == 1
    assert sorted(p.name.rsplit("-", 1)[0] for p in calls.iterdir()) == ["img1"]
    assert analyze(out2, [changed], "--engine", "ray") == 1
    assert sorted(p.name.rsplit("-", 1)[0] for p in calls.iterdir()) == ["img1", "img3"]
    s = summary(out)
    assert s["engine"]["images_resumed"] == 4 and s["engine"]["images_analysed"] == 1
    assert s["images"] == summary(local_ref)["images"]
    assert_same_outputs(local_ref, out, s["images"], exact=False)
    assert no_temporaries(out)


def descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(tmp_path, images, local_ref, ray_session, monkeypatch):
    """The model actor's process ends (os._exit) on its second batch: Ray starts another and runs
    the batch again; the run ends complete, with the in-process results."""
    marker = tmp_path / "killed"
    hooks(monkeypatch, exit_on_batch=2, exit_marker=marker)
    out = tmp_path / "out"
    assert analyze(out, [images], "--engine", "ray") == 1
    assert marker.exists()  # the worker did die
    s = summary(out)
    assert s["complete"] is True and s["images"] == summary(local_ref)["images"]
    assert_same_outputs(local_ref, out, s["images"])  # the same batches: the same bytes
    assert no_temporaries(out)


@pytest.mark.slow
def test_a_killed_driver_leaves_complete_files_and_the_rerun_finishes(tmp_path, images, local_ref, ray_session):
    """SIGKILL to a `vit-lens analyze --engine ray` process (its own local Ray) once it has
    recorded some images: every file under a final name is whole, and a rerun analyses only the
    rest."""
    out = tmp_path / "out"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env[ray_engine.TEST_HOOKS] = json.dumps({"sleep": 1.0, "shard_rows": 1})
    argv = ["analyze", "--engine", "ray", "--model", "demo", "--device", "cpu", "--batch-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "viz_app", *argv, "--out", str(out), str(images)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tree |= descendants(proc.pid)
            if len(list((out / ray_engine.PARQUET_DIR).glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        tree |= descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(2)
        for pid in tree:  # Ray's agents of the killed driver outlive it: ours to end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    s = summary(out)
    assert s["complete"] is False  # the summary written before the first image: names every file it may write
    finals = [p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")]
    for p in finals:  # whole files only under final names
        if p.suffix == ".npz":
            np.load(p)["rollout"]
        elif p.suffix == ".png":
            Image.open(io.BytesIO(p.read_bytes())).load()
    import pyarrow.parquet as pq

    recorded = pq.read_table(out / ray_engine.PARQUET_DIR).column("stem").to_pylist()
    assert 2 <= len(recorded) < 5

    calls = tmp_path / "calls"
    calls.mkdir()
    os.environ[ray_engine.TEST_HOOKS] = json.dumps({"count_dir": str(calls)})
    try:
        assert analyze(out, [images], "--engine", "ray") == 1
    finally:
        del os.environ[ray_engine.TEST_HOOKS]
    s = summary(out)
    analysed = {p.name.rsplit("-", 1)[0] for p in calls.iterdir()}
    assert s["complete"] is True and s["images"] == summary(local_ref)["images"]
    assert analysed.isdisjoint(recorded) and analysed | set(recorded) == set(s["images"])
    assert s["engine"]["images_resumed"] == len(recorded) and s["engine"]["images_analysed"] == len(analysed)
    assert_same_outputs(local_ref, out, s["images"], exact=False)
    assert no_temporaries(out)


@pytest.mark.slow
def test_a_batch_that_fails_for_good_is_one_line_and_the_rerun_completes(
    tmp_path, images, local_ref, ray_session, monkeypatch, capsys
):
    hooks(monkeypatch, fail_on_batch=2)  # raises in the model actor: no retry mends it
    out = tmp_path / "out"
    assert analyze(out, [images], "--engine", "ray") == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("vit-lens: error: the Ray pipeline stopped: RuntimeError: a test hook failed this batch")
    assert "summary.json lists what was written" in last and not any("Traceback" in line for line in err)
    s = summary(out)
    assert s["complete"] is False and s["exit_status"] == 2 and "RuntimeError" in s["stopped"]
    assert no_temporaries(out)
    monkeypatch.delenv(ray_engine.TEST_HOOKS)
    assert analyze(out, [images], "--engine", "ray") == 1
    s = summary(out)
    assert s["complete"] is True and s["images"] == summary(local_ref)["images"]
    assert_same_outputs(local_ref, out, s["images"], exact=False)


@pytest.mark.slow
def test_address_connects_to_a_running_cluster(tmp_path, images, local_ref, ray_session):
    """A second process joins the module's Ray through --address (as on a cluster's head node)."""
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    argv = ["analyze", "--engine", "ray", "--address", address, "--model", "demo", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "viz_app", *argv, "--batch-size", BATCH, "--out", str(out), str(images)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    s = summary(out)
    assert s["engine"]["address"] == address and s["images"] == summary(local_ref)["images"]
    assert_same_outputs(local_ref, out, s["images"])


def test_an_address_that_does_not_answer_is_one_line(tmp_path, images, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    assert analyze(out, [images], "--engine", "ray", "--address", "127.0.0.1:1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    # "cannot reach the Ray cluster at ..." (or, where this process already runs a Ray: "already connected")
    assert len(err) == 1 and err[0].startswith("vit-lens: error:") and "127.0.0.1:1" in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_file_uris_are_read_through_pyarrow(tmp_path, images, local_ref, ray_session):
    out = tmp_path / "out"
    assert analyze(out, [f"file://{images}"], "--engine", "ray") == 1
    s, ref = summary(out), summary(local_ref)
    assert {k: e["file"] for k, e in s["images"].items()} == {
        k: f"file://{e['file']}" for k, e in ref["images"].items()
    }
    assert [x["reason"] for x in s["skipped"]] == [x["reason"] for x in ref["skipped"]]
    assert_same_outputs(local_ref, out, ref["images"])


def test_engine_ray_without_ray_is_one_line_and_exit_2(tmp_path, images, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    assert analyze(out, [images], "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "requirements-ray.txt" in err and "Traceback" not in err
    assert not out.exists()


def test_address_needs_engine_ray(tmp_path, images, capsys):
    assert analyze(tmp_path / "out", [images], "--address", "auto") == 2
    assert "--address needs --engine ray" in capsys.readouterr().err


def test_the_local_engine_never_imports_ray(tmp_path, images):
    code = (
        "import sys\nfrom viz_app.cli import main\n"
        f"rc = main(['analyze', '--model', 'demo', '--out', {str(tmp_path / 'o')!r}, {str(images / 'img1.png')!r}])\n"
        "assert rc == 0, rc\nassert 'ray' not in sys.modules and 'viz_app.ray_engine' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
