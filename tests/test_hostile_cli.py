"""Hostile situations for the batch CLI (issue 14, group 3 and the CLI side of groups 1 and 2):
output names that collide, a full disk, Ctrl-C, concurrent runs, unwritable and unreadable
folders, too many decoded pixels, a batch that does not fit in memory, non-finite weights.

Every test asserts the survival rules: the exit code, one clear stderr line and no traceback,
the other outputs intact (files that were there before byte-identical), summary.json valid
(strict) JSON and complete, no partial file under a final name and no temporary left behind;
memory and time in a child process where they are the point."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model import resources
from viz_app import cli, pipeline
from viz_app import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
DEMO = resources.DEMO_DIR


# ---------------------------------------------------------------------------------------------
# Helpers


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (50, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _strict_json(path: Path):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(token):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _err_lines(err: str) -> list[str]:
    """stderr without the progress bar's redraws and notes: the lines a user reads as messages."""
    lines = [part.split("\r")[-1] for part in err.splitlines()]
    return [ln for ln in lines if ln.strip() and not ln.startswith("[") and not ln.startswith("note:")]


def _one_error(err: str, *words: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in _err_lines(err) if "error" in ln]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _consistent(out: Path, users=()) -> dict | None:
    """The output folder's invariants: no temporary file, every .npz and .png complete (but the
    user's own files, `users`), and summary.json (when there) strict JSON whose files exist and
    belong to the inputs it names."""
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if n.endswith(cli.TEMP_SUFFIX)], names
    for p in out.glob("*.npz"):
        if p.name not in users:
            with np.load(p, allow_pickle=False) as z:
                for k in z.files:
                    z[k]
    for p in out.glob("*.png"):
        if p.name not in users:
            assert cv2.imread(str(p)) is not None, p
    if not (out / "summary.json").exists():
        return None
    s = _strict_json(out / "summary.json")
    for name in s.get("written", []):
        assert (out / name).exists(), name
    for entry in s.get("images", {}).values():
        assert (out / entry["rollout_png"]).exists()
        with np.load(out / entry["npz"], allow_pickle=False) as z:
            assert json.loads(str(z["report_json"]))["image"]["name"] == Path(entry["file"]).name
    return s


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _child(code: str, timeout: float = 120) -> dict:
    """Run code in a fresh Python (it sets `out`); returns out with the child's peak memory in MB
    (VmHWM) and its wall time."""
    wrapped = (
        "import json, time\n_t0 = time.perf_counter()\n"
        + textwrap.dedent(code)
        + "\nout['seconds'] = time.perf_counter() - _t0"
        + "\nout['peak_mb'] = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024"
        + "\nprint(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli_process(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "viz_app", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# 1. Output names


def test_free_stems_are_deterministic_unique_and_leave_own_names_alone():
    taken = {"model.npz", "mad.png", "summary.json"}
    stems = cli.free_stems(["x", "x", "x_1", "model", "X", "x"], (".npz", "_rollout.png"), taken)
    assert stems == ["x", "x_2", "x_1", "model_1", "X_3", "x_4"]  # X: same name on a case-insensitive disk
    again = cli.free_stems(["x", "x", "x_1", "model", "X", "x"], (".npz", "_rollout.png"), {"model.npz"})
    assert again[:4] == ["x", "x_2", "x_1", "model_1"]
    long = cli.free_stems(["é" * 200, "é" * 200], (".npz", "_rollout.png"), set())
    assert long[0] != long[1] and all(len(os.fsencode(s + "_rollout.png")) <= cli.NAME_MAX for s in long)


def test_colliding_stems_and_reserved_names_each_get_their_own_files(tmp_path, capsys):
    """a/x.png, b/x.png and x_1.png were x, x_1, x_1 (one analysis lost, exit 0); model.png's
    analysis was overwritten by model.npz."""
    inputs = [
        _png(tmp_path / "in" / "a" / "x.png", 1),
        _png(tmp_path / "in" / "b" / "x.png", 2),
        _png(tmp_path / "in" / "x_1.png", 3),
        _png(tmp_path / "in" / "model.png", 4),
        _png(tmp_path / "in" / "summary.png", 5),
        _png(tmp_path / "in" / "mad_rollout.png", 6),
    ]
    out = tmp_path / "out"
    rc, err = _run(["analyze", "--model", "demo", "--batch-size", "4", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 0 and "Traceback" not in err
    s = _consistent(out)
    assert sorted(e["file"] for e in s["images"].values()) == sorted(map(str, inputs))
    npz = [e["npz"] for e in s["images"].values()]
    assert len(set(npz)) == len(inputs) and "model.npz" not in npz
    by_file = {e["file"]: e["npz"] for e in s["images"].values()}
    assert by_file[str(inputs[2])] == "x_1.npz"  # its own name, not another x's
    assert s["files"] == {"model": "model.npz", "mad": "mad.png"}
    with np.load(out / "model.npz") as z:
        assert "position_similarity" in z.files  # the run's own model.npz, not an image report
    assert len(list(out.iterdir())) == 2 * len(inputs) + 3


def test_out_equal_to_the_input_folder_never_touches_the_users_files(tmp_path, capsys):
    folder = tmp_path / "photos"
    _png(folder / "cat.png", 1)
    users = {
        "cat_rollout.png": _png(folder / "cat_rollout.png", 2).read_bytes(),  # the user's own picture
        "mad.png": b"the user's notes, not a picture",
        "model.npz": b"the user's model",
        "cat.npz": b"the user's arrays",
    }
    for name, data in users.items():
        (folder / name).write_bytes(data)
    argv = ["analyze", "--model", "demo", "--out", str(folder), str(folder)]
    rc, err = _run(argv, capsys)
    assert rc == 1  # mad.png is not an image: named as skipped
    assert "skipped" in err and "mad.png" in err and "Traceback" not in err
    for name, data in users.items():
        assert (folder / name).read_bytes() == data, name
    s = _consistent(folder, users)
    assert s["files"]["model"] != "model.npz" and s["files"]["mad"] != "mad.png"
    cat = next(e for e in s["images"].values() if e["file"].endswith("/cat.png"))
    assert cat["npz"] != "cat.npz" and cat["rollout_png"] != "cat_rollout.png"
    before = sorted(p.name for p in folder.iterdir())
    # a second run into the same folder replaces its own earlier files, still none of the user's
    rc, err = _run(argv[:-1] + [str(folder / "cat.png")], capsys)
    assert rc == 0, err
    for name, data in users.items():
        assert (folder / name).read_bytes() == data, name
    assert sorted(p.name for p in folder.iterdir()) == before
    s2 = _consistent(folder, users)
    assert s2["files"] == s["files"] and next(iter(s2["images"].values()))["npz"] == cat["npz"]
    # the whole folder again: the first run's overlays are its outputs, not new inputs
    rc, err = _run(argv, capsys)
    # left out: the overlays of cat.png and of the user's cat_rollout.png, and the run's mad plot;
    # the user's mad.png (not an image) is still named as skipped
    assert rc == 1 and "left out 3 images" in err, err
    s3 = _consistent(folder, users)
    assert sorted(Path(e["file"]).name for e in s3["images"].values()) == ["cat.png", "cat_rollout.png"]
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_summary_json_vit_lens_did_not_write_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"my": "notes"}')
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(_png(tmp_path / "a.png"))], capsys)
    assert rc == 2
    _one_error(err, "summary.json")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == '{"my": "notes"}'


def test_a_name_at_the_file_system_limit_still_gets_its_outputs(tmp_path, capsys):
    """A 255-byte image name: <stem>_rollout.png would be 263 bytes (ENAMETOOLONG)."""
    img = _png(tmp_path / "in" / ("a" * 251 + ".png"))
    out = tmp_path / "out"
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(img)], capsys)
    assert rc == 0 and "Traceback" not in err
    s = _consistent(out)
    (entry,) = s["images"].values()
    assert entry["file"] == str(img) and len(entry["rollout_png"]) <= 255


# ---------------------------------------------------------------------------------------------
# 2, 3. Atomic writes, a full disk, Ctrl-C


def _fail_after(monkeypatch, n: int, exc: BaseException, *, once: bool = False) -> list:
    """Make the (n+1)-th file write fail half-way: the temporary holds half the data."""
    calls = []
    real = cli._write_temp

    def write(f, data):
        calls.append(len(data))
        if len(calls) > n and (not once or len(calls) == n + 1):
            f.write(data[: len(data) // 2])
            raise exc
        real(f, data)

    monkeypatch.setattr(cli, "_write_temp", write)
    return calls


@pytest.mark.parametrize("after, threads", [(0, False), (3, False), (6, False), (3, True)])
def test_a_full_disk_stops_with_one_line_and_a_summary_of_what_was_written(
    tmp_path, monkeypatch, capsys, after, threads
):
    for i in range(5):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    if threads:  # reading, the model and writing overlapped, as on a GPU: the error comes from the writer thread
        monkeypatch.setattr(cli, "overlap_stages", lambda device: True)
    _fail_after(monkeypatch, after, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), once=True)
    t = time.perf_counter()
    rc, err = _run(["analyze", "--model", "demo", "--batch-size", "2", "--out", str(out), str(tmp_path / "in")], capsys)
    assert time.perf_counter() - t < 30
    assert rc == 2
    line = _one_error(err, "No space left on device", "summary.json lists what was written")
    assert f"stopped after {after // 2} of 5 images" in line
    s = _consistent(out)
    assert s["complete"] is False and "No space left on device" in s["stopped"] and s["exit_status"] == 2
    assert len(s["images"]) == after // 2  # images whose two files are both complete
    assert len(s["images"]) + len(s["not_written"]) == 5


def test_a_disk_that_stays_full_leaves_no_partial_file_and_says_the_summary_failed(tmp_path, monkeypatch, capsys):
    for i in range(3):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    _fail_after(monkeypatch, 2, OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 2
    _one_error(err, "quota", "summary.json could not be written either")
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img0_rollout.png"]
    _consistent(out)


def test_a_real_write_error_from_the_os_is_a_message(tmp_path):
    """Not a monkeypatch: the child may write files of at most 60 kB (RLIMIT_FSIZE), so each
    report (68 kB) fails with EFBIG from the kernel; the small summary still gets written."""
    for i in range(2):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    done = subprocess.run(
        [sys.executable, "-m", "viz_app", "analyze", "--model", "demo", "--out", str(out), str(tmp_path / "in")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert done.returncode == 2, done.stderr
    _one_error(done.stderr, "File too large", "summary.json lists what was written")
    s = _consistent(out)
    assert s["complete"] is False and s["images"] == {} and len(s["not_written"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_ctrl_c_while_writing_leaves_only_complete_files_and_a_summary(tmp_path, monkeypatch, capsys):
    for i in range(4):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    _fail_after(monkeypatch, 3, KeyboardInterrupt(), once=True)
    rc, err = _run(["analyze", "--model", "demo", "--batch-size", "1", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    s = _consistent(out)
    assert s["complete"] is False and s["stopped"] == "interrupted"
    assert list(s["images"]) == ["img0"]  # img1.npz is complete, its overlay was not written
    assert sorted(p.name for p in out.iterdir()) == ["img0.npz", "img0_rollout.png", "img1.npz", "summary.json"]


@pytest.mark.slow
def test_a_real_sigint_at_any_moment_leaves_a_consistent_folder(tmp_path):
    for i in range(24):
        _png(tmp_path / "in" / f"img{i:02d}.png", i, size=(400, 300))
    for delay in (0.5, 1.5):
        out = tmp_path / f"out{delay}"
        proc = _cli_process(
            ["analyze", "--model", "demo", "--batch-size", "2", "--out", str(out), str(tmp_path / "in")]
        )
        deadline = time.time() + 60
        while not (out.exists() and list(out.glob("*.npz"))) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(delay / 10)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, 130) and "Traceback" not in err, err
        s = _consistent(out)
        assert s is not None and (s["complete"] is (proc.returncode == 0))


# ---------------------------------------------------------------------------------------------
# 4. Concurrent runs


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_runs_lock_is_not(tmp_path, capsys):
    img = _png(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; import time; from viz_app.cli import OutputFolder\n"
            f"f = OutputFolder(Path({str(out)!r})).__enter__(); print('locked', flush=True); time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(img)], capsys)
        assert rc == 2 and time.perf_counter() - t < 10
        _one_error(err, "another vit-lens run", str(out))
        assert list(out.iterdir()) == []
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops its lock
        holder.wait()
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(img)], capsys)
    assert rc == 0, err
    _consistent(out)


def test_evaluate_and_analyze_share_the_lock(tmp_path, capsys):
    img = _png(tmp_path / "a.png")
    out = tmp_path / "out"
    with cli.OutputFolder(out):
        rc = ev.main(["--model", "demo", "--out", str(out), "--steps", "2", str(img)])
    assert rc == 2
    _one_error(capsys.readouterr().err, "another vit-lens run")


@pytest.mark.slow
def test_three_concurrent_runs_leave_one_consistent_set(tmp_path):
    """Three runs at once into one folder, each with its own images: all exited 0 before and one
    run's reports ended up under another's summary. Now each either finishes or is refused."""
    outs = tmp_path / "out"
    procs = []
    for r in range(3):
        for i in range(6):
            _png(tmp_path / f"in{r}" / f"r{r}_{i}.png", 10 * r + i, size=(120, 90))
        procs.append(
            _cli_process(
                ["analyze", "--model", "demo", "--batch-size", "2", "--out", str(outs), str(tmp_path / f"in{r}")]
            )
        )
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = [rc for rc, _ in results]
    assert all(rc in (0, 2) for rc in codes) and 0 in codes, results
    for rc, err in results:
        if rc == 2:
            _one_error(err, "another vit-lens run")
    s = _consistent(outs)
    run = {Path(e["file"]).parent.name for e in s["images"].values()}
    assert len(run) == 1 and len(s["images"]) == 6  # the summary's images are all of one run


# ---------------------------------------------------------------------------------------------
# 5. Unwritable output folder, unreadable input folder


def _no_model(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(cli, "load_checkpoint", refuse)
    monkeypatch.setattr(ev, "load_checkpoint", refuse)


def test_a_read_only_output_folder_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    real = os.open

    def read_only(path, flags, *a, **kw):  # what a read-only mount answers to a new file
        if flags & os.O_CREAT and Path(path).parent == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    _no_model(monkeypatch)
    img = str(_png(tmp_path / "a.png"))
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), img], capsys)
    assert rc == 2
    _one_error(err, "not writable", "Read-only file system")
    rc = ev.main(["--model", "demo", "--out", str(out), img])
    assert rc == 2
    _one_error(capsys.readouterr().err, "not writable")
    assert list(out.iterdir()) == []


def test_an_output_folder_that_cannot_be_created_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    _no_model(monkeypatch)
    rc, err = _run(
        ["analyze", "--model", "demo", "--out", str(tmp_path / "file" / "out"), str(_png(tmp_path / "a.png"))], capsys
    )
    assert rc == 2
    _one_error(err, "cannot create output folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_real_permission_bits(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    locked = tmp_path / "in" / "locked"
    _png(locked / "x.png")
    _png(tmp_path / "in" / "y.png")
    locked.chmod(0)
    try:
        rc, err = _run(["analyze", "--model", "demo", "--out", str(ro), str(tmp_path / "in")], capsys)
        assert rc == 2 and "not writable" in err
        rc, err = _run(["analyze", "--model", "demo", "--out", str(tmp_path / "o"), str(tmp_path / "in")], capsys)
        assert rc == 1 and f"skipped {locked}" in err
    finally:
        ro.chmod(0o700)
        locked.chmod(0o700)


def _unlistable(monkeypatch, folder: Path) -> None:
    """os.scandir on `folder` fails as it does for a folder without read permission (tests run as
    root, which permission bits do not stop)."""
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_named_and_exits_1(tmp_path, monkeypatch, capsys):
    """rglob dropped the PermissionError: the folder's images were silently left out, exit 0."""
    _png(tmp_path / "in" / "ok.png", 1)
    _png(tmp_path / "in" / "deep" / "ok2.png", 2)
    _png(tmp_path / "in" / "private" / "hidden.png", 3)
    _unlistable(monkeypatch, tmp_path / "in" / "private")
    out = tmp_path / "out"
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 1 and "Traceback" not in err
    skipped = [ln for ln in _err_lines(err) if ln.startswith("skipped")]
    assert skipped == [f"skipped {tmp_path / 'in' / 'private'}: cannot read folder: Permission denied"]
    s = _consistent(out)
    assert sorted(s["images"]) == ["ok", "ok2"]
    assert [k["file"] for k in s["skipped"]] == [str(tmp_path / "in" / "private")]
    # evaluate walks the same way
    rc = ev.main(["--model", "demo", "--out", str(tmp_path / "ev"), "--steps", "2", "--randomization", "none",
                  "--modes", "drop", str(tmp_path / "in")])  # fmt: skip
    assert rc == 1
    assert "skipped" in capsys.readouterr().err
    assert _strict_json(tmp_path / "ev" / "summary.json")["inputs"]["evaluated"] == 2


def test_an_only_input_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch, capsys):
    _png(tmp_path / "in" / "x.png")
    _unlistable(monkeypatch, tmp_path / "in")
    rc, err = _run(["analyze", "--model", "demo", "--out", str(tmp_path / "out"), str(tmp_path / "in")], capsys)
    assert rc == 2
    _one_error(err, "no images found", "Permission denied")


# ---------------------------------------------------------------------------------------------
# 6. Decoded images held at once


def test_a_batch_stops_taking_images_at_the_byte_budget(tmp_path, monkeypatch, capsys):
    for i in range(5):
        _png(tmp_path / "in" / f"img{i}.png", i, size=(80, 60))
    sizes = []
    real = cli.run_forward

    def counting(model, pixels, **kw):
        sizes.append(pixels.shape[0])
        return real(model, pixels, **kw)

    monkeypatch.setattr(cli, "run_forward", counting)
    argv = ["analyze", "--model", "demo", "--batch-size", "4", "--out", str(tmp_path / "whole"), str(tmp_path / "in")]
    assert cli.main(argv) == 0 and sizes == [4, 1]
    sizes.clear()
    monkeypatch.setattr(cli, "MAX_HELD_BYTES", 2 * 80 * 60 * 3)  # two originals per batch
    argv[-2] = str(tmp_path / "split")
    assert cli.main(argv) == 0 and sizes == [2, 2, 1]
    for i in range(5):
        with np.load(tmp_path / "whole" / f"img{i}.npz") as a, np.load(tmp_path / "split" / f"img{i}.npz") as b:
            np.testing.assert_allclose(a["rollout"], b["rollout"], atol=1e-5)
    _consistent(tmp_path / "split")


def test_the_overlay_original_is_downscaled_past_the_pixel_bound(tmp_path, monkeypatch, capsys):
    img = _png(tmp_path / "a.png", size=(80, 60))
    monkeypatch.setattr(cli, "OVERLAY_MAX_PIXELS", 1000)
    rc, _ = _run(["analyze", "--model", "demo", "--out", str(tmp_path / "out"), str(img)], capsys)
    assert rc == 0
    png = cv2.imread(str(tmp_path / "out" / "a_rollout.png"))
    assert png.shape[:2] == (20, 27)  # the smallest whole factor (3) that brings 80 x 60 under 1000 px
    s = _consistent(tmp_path / "out")
    with np.load(tmp_path / "out" / "a.npz") as z:
        assert json.loads(str(z["report_json"]))["image"]["original_size"] == [80, 60]
    assert s["images"]["a"]["rollout_png"] == "a_rollout.png"


@pytest.mark.slow
def test_eight_images_at_the_pixel_limit_stay_far_under_3_gb(tmp_path):
    """Eight 50 MP images in one default batch took 3.1 GB and 32 s (originals held twice over,
    each 50 MP overlay 2 GB of float temporaries)."""
    first = tmp_path / "in" / "b0.png"
    first.parent.mkdir()
    Image.new("RGB", (8660, 5773), (120, 30, 200)).save(first)  # 50 MP, 150 kB: one colour
    for i in range(1, 8):
        shutil.copy(first, tmp_path / "in" / f"b{i}.png")
    out = tmp_path / "out"
    got = _child(
        f"""
        from viz_app.cli import main
        out = dict(rc=main(["analyze", "--model", "demo", "--out", {str(out)!r}, {str(tmp_path / "in")!r}]))
        """,
        timeout=240,
    )
    assert got["rc"] == 0
    assert got["peak_mb"] < 2000 and got["seconds"] < 60, got
    s = _consistent(out)
    assert len(s["images"]) == 8
    png = cv2.imread(str(out / "b0_rollout.png"))
    assert png.shape[0] * png.shape[1] <= cli.OVERLAY_MAX_PIXELS


# ---------------------------------------------------------------------------------------------
# 7. The memory estimate, before the run


def test_a_batch_that_does_not_fit_is_refused_naming_one_that_does(tmp_path, monkeypatch, capsys):
    for i in range(8):
        _png(tmp_path / "in" / f"img{i}.png", i)
    from model import load_checkpoint

    cfg = load_checkpoint("demo").config
    per_image = 3 * cli.OVERLAY_MAX_PIXELS

    def need(b):
        held = cli.STAGES_IN_FLIGHT * min(b * per_image, cli.MAX_HELD_BYTES + per_image)
        return pipeline.analysis_memory_bytes(cfg, torch.float32, batch=b) + held

    free = int(need(3) / pipeline.MEMORY_SHARE) + 1  # room for 3 images at a time, not 4
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda device: free)
    out = tmp_path / "out"
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 2
    _one_error(err, "--batch-size 3 would fit")
    assert not out.exists()  # refused before anything was written
    rc, err = _run(["analyze", "--model", "demo", "--batch-size", "3", "--out", str(out), str(tmp_path / "in")], capsys)
    assert rc == 0, err
    monkeypatch.setattr(pipeline, "available_memory_bytes", lambda device: 10 * 2**20)
    rc, err = _run(["analyze", "--model", "demo", "--out", str(tmp_path / "o2"), str(tmp_path / "in")], capsys)
    assert rc == 2
    _one_error(err, "not even one image")
    rc = ev.main(["--model", "demo", "--out", str(tmp_path / "o3"), str(tmp_path / "in")])
    assert rc == 2
    _one_error(capsys.readouterr().err, "not even one image")


def test_a_huge_image_size_is_refused_in_seconds_not_an_allocator_traceback(tmp_path):
    img = _png(tmp_path / "a.png")
    got = _child(
        f"""
        import contextlib, io
        from viz_app.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["analyze", "--model", "demo", "--image-size", "2048", "--out", {str(tmp_path / "o")!r}, {str(img)!r}])
        out = dict(rc=rc, err=err.getvalue())
        """
    )
    assert got["rc"] == 2 and got["seconds"] < 30 and got["peak_mb"] < 1500, got
    _one_error(got["err"], "needs about")


# ---------------------------------------------------------------------------------------------
# 8. Non-finite weights


def _demo_with(tmp_path: Path, broken) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(DEMO / "config.json", folder / "config.json")
    tensors = load_file(DEMO / "model.safetensors")
    save_file({k: broken(k, v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "which",
    [
        "head",  # exited 0 with NaN in summary.json: not JSON
        "all",
        "inf",
    ],
)
def test_non_finite_weights_warn_once_and_every_json_is_valid(tmp_path, capsys, which):
    def broken(k, v):
        if which == "inf" and k == "blocks.0.attn.qkv.weight":
            return torch.full_like(v, float("inf"))
        if which == "all" or (which == "head" and k.startswith("head")):
            return torch.full_like(v, float("nan"))
        return v

    model = _demo_with(tmp_path, broken)
    for i in range(3):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    rc, err = _run(
        ["analyze", "--model", str(model), "--grad-rollout", "--out", str(out), str(tmp_path / "in")], capsys
    )
    assert rc == 0 and "Traceback" not in err
    warnings = [ln for ln in _err_lines(err) if ln.startswith("warning:")]
    assert len(warnings) == 1 and "3 of 3 images" in warnings[0], err
    s = _consistent(out)  # strict JSON
    assert s["non_finite"]["images"] == ["img0", "img1", "img2"] and s["complete"]
    assert s["non_finite_as_null"] > 0 and len(s["images"]) == 3
    for i in range(3):
        with np.load(out / f"img{i}.npz") as z:
            json.loads(str(z["report_json"]), parse_constant=lambda t: pytest.fail(t))


def test_nan_patch_filters_leave_the_pca_out_instead_of_crashing(tmp_path, capsys):
    from safetensors.torch import save_file

    from model import VisionTransformer, ViTConfig

    m = VisionTransformer(
        ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)
    )
    m.init_weights(seed=0)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    state["patch_embed.proj.weight"] = torch.full_like(state["patch_embed.proj.weight"], float("nan"))
    save_file(state, str(tmp_path / "tiny.safetensors"))
    _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    rc, err = _run(
        ["analyze", "--model", str(tmp_path / "tiny.safetensors"), "--out", str(out), str(tmp_path / "in")], capsys
    )
    assert rc == 0 and "Traceback" not in err
    s = _consistent(out)
    with np.load(out / "model.npz") as z:
        assert "filter_components" not in z.files and "position_similarity" in z.files
    assert any("filter principal components" in n for n in s["notes"])
    assert s["files"]["mad"] is None and not (out / "mad.png").exists()


# ---------------------------------------------------------------------------------------------
# evaluate: the same outputs handling


def test_evaluate_keeps_the_users_files_and_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    img = _png(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "faithfulness.png").write_bytes(b"the user's own plot")
    argv = ["--model", "demo", "--out", str(out), "--steps", "2", "--randomization", "none", "--modes", "drop"]
    assert ev.main([*argv, str(img)]) == 0
    assert (out / "faithfulness.png").read_bytes() == b"the user's own plot"
    s = _strict_json(out / "summary.json")
    assert s["plots"]["faithfulness"] == "faithfulness_1.png" and (out / "faithfulness_1.png").exists()
    capsys.readouterr()

    def full(self, rows):  # the CSV's rows hit the full disk
        self.file.write("partial,row")
        raise cli.OutputError(f"cannot write {self.folder.path / self.name}: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(ev.AtomicCsv, "write", full)
    before = (out / "faithfulness.csv").read_bytes()
    assert ev.main([*argv, str(img)]) == 2
    _one_error(capsys.readouterr().err, "No space left on device")
    assert (out / "faithfulness.csv").read_bytes() == before  # the earlier complete table stays
    assert (out / "faithfulness.png").read_bytes() == b"the user's own plot"
    assert not [p for p in out.iterdir() if p.name.endswith(cli.TEMP_SUFFIX)]
    s = _strict_json(out / "summary.json")
    assert s["complete"] is False and s["files"] == {} and "No space left" in s["stopped"]


def test_evaluate_with_a_nan_head_warns_once_and_writes_strict_json_and_its_plots(tmp_path, capsys):
    """Its plots failed on the NaN curves (cannot convert float NaN to integer), with no summary."""
    model = _demo_with(tmp_path, lambda k, v: torch.full_like(v, float("nan")) if k.startswith("head") else v)
    for i in range(2):
        _png(tmp_path / "in" / f"img{i}.png", i)
    out = tmp_path / "out"
    argv = ["--model", str(model), "--out", str(out), "--steps", "2", "--modes", "drop", str(tmp_path / "in")]
    assert ev.main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [ln for ln in _err_lines(err) if ln.startswith("warning:")]
    assert len(warnings) == 1 and "2 of 2 inputs" in warnings[0], err
    s = _strict_json(out / "summary.json")
    assert s["non_finite"]["images"] == ["img0", "img1"] and s["complete"]
    assert cv2.imread(str(out / "faithfulness.png")) is not None


def test_an_output_folder_that_cannot_be_listed_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Writable but not readable (mode 0300): what is in it cannot be known, so no name is safe."""
    out = tmp_path / "out"
    out.mkdir()
    _unlistable(monkeypatch, out)
    _no_model(monkeypatch)
    rc, err = _run(["analyze", "--model", "demo", "--out", str(out), str(_png(tmp_path / "a.png"))], capsys)
    assert rc == 2
    _one_error(err, "cannot list output folder", "Permission denied")
