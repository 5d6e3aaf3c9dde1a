"""`vit-lens analyze --engine ray`: the batch analysis on Ray Data, on this machine or a cluster.

The in-process engine (viz_app/cli.py) stays the default and never imports Ray; this module is
imported only for `--engine ray`, and Ray only when it runs (a missing Ray is one line, exit 2).

The pipeline is one Ray Data stream, never the whole input in memory:

  driver   lists the inputs (local folders through cli.collect_inputs; s3://, gs://, hdfs://, file://
           and whatever else pyarrow or fsspec opens through pyarrow.fs), loads the model once to
           check the arguments and write model.npz, plans output names (cli.free_stems);
  decode   Ray tasks (1 CPU each), one batch at a time (batch_rows: --batch-size consecutive inputs,
           as the local engine cuts them): read, decode and prepare each image with the local
           engine's cli.read_one (remote files' bytes read first through their filesystem); an
           unreadable image becomes a `skipped` line, as in the local engine;
  model    an actor pool, the model loaded once per actor (load_checkpoint): one actor per GPU
           with --device cuda (or auto where the cluster has GPUs), else CPU actors; a forward pass
           and report.analyze_batch per batch row, so each forward pass runs over the local engine's
           batch (Ray Data's bundling never regroups a row). An actor that dies is restarted and its
           batch retried (ACTOR_RESTARTS times);
  encode   Ray tasks: each image's report (.npz) and rollout overlay (.png), through
           cli.write_outputs, so the bytes are those of the local engine;
  driver   writes every file through cli.OutputFolder (a temporary name, renamed when complete:
           never a partial file under a final name), and every SHARD_ROWS images (or SHARD_SECONDS)
           a Parquet shard of their rows into <out>/parquet/ (PARQUET_COLUMNS), the record that
           makes a rerun skip them;
  aggregates  Ray tasks over the shards (local:// reads, on the driver's node): mean attention
           distance per head and mean rollout over the images with finite values, and top-1 and
           top-5 class counts, into summary.json ("aggregates") and mad.png.

Idempotent and resumable: before any image file is written, summary.json is written with
"complete": false and every name the run may write in "written" (what OutputFolder takes as an
earlier run's files), so a run killed at any point leaves a folder the next run can take over.
A rerun skips an input when a shard row records it (same absolute path or URI, same size and
modification time, same model, weights, settings, dtype and device kind: `fingerprint`) and both
its files are still there as that row wrote them (size and modification time); the rest are
analysed, the summary lists all of them. Rows of images analysed again stay in older shards; the
current row of an image is the one its summary.json names (`parquet.shards`, `run_id`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import socket
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from model import ViTLensError, load_checkpoint
from model.device import PRECISIONS, precisions_for
from model.errors import first_line
from model.preprocess import MAX_BYTES, ImageError
from viz_app import cli, render, report
from viz_app.cli import OutputError, UsageError

RAY_MISSING = (
    "--engine ray needs Ray, which is not installed here: pip install -r requirements-ray.txt "
    "(or pip install 'vit-lens[ray]')"
)
PARQUET_DIR = "parquet"  # <out>/parquet/part-<run id>-<n>.parquet
SHARD_ROWS = 1024  # a shard is written every this many images analysed...
SHARD_SECONDS = 60.0  # ...or this often, whichever comes first (what a crash can cost to redo)
ACTOR_RESTARTS = 3  # a model actor that dies is restarted, and its batch retried, this often
CPUS_PER_CPU_ACTOR = 8  # on CPUs: one model actor per this many CPUs of the cluster (at least one)
TEST_HOOKS = "VIT_LENS_RAY_TEST_HOOKS"  # tests only: JSON handed to the model actors (see _Model)
META_KEY = b"vit_lens"  # a shard's schema metadata: what wrote it
SHARD_SCHEMA_VERSION = 1
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")
log = logging.getLogger("viz_app")


def _columns():
    import pyarrow as pa

    f32, i64, s = pa.list_(pa.float32()), pa.int64(), pa.string()
    return (
        ("file", s, "the input as given on the command line (a path or a URI)"),
        ("path", s, "its absolute path or URI: the key a rerun looks images up by"),
        ("stem", s, "the output stem: <stem>.npz and <stem>_rollout.png"),
        ("npz", s, "the report's file name in the output folder"),
        ("rollout_png", s, "the rollout overlay's file name in the output folder"),
        ("size", i64, "the input's size in bytes when it was read"),
        ("mtime_ns", i64, "the input's modification time (ns since the epoch) when it was read"),
        ("width", pa.int32(), "the original's width in pixels"),
        ("height", pa.int32(), "the original's height in pixels"),
        ("top5_classes", pa.list_(i64), "the 5 most probable classes, most probable first (null without a classifier)"),
        ("top5_probabilities", f32, "their probabilities (null without a classifier)"),
        ("top5_labels", pa.list_(s), "their labels (class numbers where the model has no labels)"),
        ("grad_class", i64, "the gradient rollout's class (null without --grad-rollout)"),
        ("features", f32, "the pooled features the classifier reads (F,)"),
        ("rollout", f32, "attention rollout over the patch grid, row-major (gh * gw,)"),
        ("mean_attention_distance", f32, "pixels, layer-major (L * H,): as the report's (L, H) array"),
        ("mean_attention_distance_renormalized", f32, "pixels, layer-major (L * H,)"),
        ("prefix_mass_share", f32, "share in [0, 1], layer-major (L * H,)"),
        ("attention_entropy", f32, "nats, layer-major (L * H,)"),
        ("finite", pa.bool_(), "every array of the report is finite (left out of the aggregates if not)"),
        ("npz_size", i64, "size of the .npz as written (a rerun checks it)"),
        ("npz_mtime_ns", i64, "modification time of the .npz as written"),
        ("rollout_png_size", i64, "size of the _rollout.png as written"),
        ("rollout_png_mtime_ns", i64, "modification time of the _rollout.png as written"),
        ("run_id", s, "the run that wrote the row (summary.json's engine.run_id)"),
        ("fingerprint", s, "model, weights, settings, dtype and device kind that produced it"),
    )


def columns_markdown() -> str:
    """The shard columns as a markdown table (README)."""
    rows = ["| column | type | what |", "|---|---|---|"]
    rows += [f"| `{name}` | {typ} | {what} |" for name, typ, what in _columns()]
    return "\n".join(rows)


def import_ray():
    """Ray, imported now; UsageError (one line, exit 2) where it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library, an extra of the ray package
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


# ----------------------------------------------------------------------------- inputs


@dataclass
class Source:
    """One input image."""

    file: str  # as given (a path or a URI)
    key: str  # absolute path or URI
    fs: int  # index into the run's filesystems; -1: a local file
    fs_path: str  # the path to read (on that filesystem, or locally)
    size: int
    mtime_ns: int
    stem: str  # the input's own stem (the output stem is planned later)


def as_uri(p: Path | str) -> str | None:
    """The URI a command-line input names, None for a local path. argparse gave a Path, which
    folds `s3://bucket/key` into `s3:/bucket/key`: the double slash is put back. A name that
    exists here is always the local file."""
    s = str(p)
    if os.path.lexists(s):
        return None
    m = _URI.match(s)
    if not m:
        return None
    scheme, rest = m.groups()
    return f"file:///{rest}" if scheme.lower() == "file" else f"{scheme}://{rest}"


def open_filesystem(uri: str):
    """(pyarrow filesystem, path) for a URI: pyarrow's own (s3, gs, hdfs, file, abfs), else any
    fsspec protocol whose driver is installed. UsageError (one line) where neither opens it."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, ImportError, TypeError) as e:  # ArrowInvalid is a ValueError
        why = first_line(e)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    except (ValueError, OSError, ImportError, TypeError, KeyError) as e:
        raise UsageError(f"cannot open {uri}: {why}; fsspec: {first_line(e)}") from None


def _uri_of(uri: str, fs_path: str) -> str:
    scheme = uri.split("://", 1)[0]
    return f"file://{fs_path}" if scheme.lower() == "file" else f"{scheme}://{fs_path.lstrip('/')}"


def list_uri(uri: str, filesystems: list) -> list[Source]:
    """The images under a URI (a file, or a folder searched recursively), in path order."""
    from pyarrow import fs as pafs

    fs, path = open_filesystem(uri)
    filesystems.append(fs)
    index = len(filesystems) - 1
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UsageError(f"no such file or folder: {uri}")
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot list {uri}: {first_line(e)}") from None
    found = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        if info.type != pafs.FileType.File and PurePosixPath(i.path).suffix.lower() not in cli.IMAGE_SUFFIXES:
            continue
        full = _uri_of(uri, i.path)
        mtime = i.mtime_ns if i.mtime_ns is not None else 0
        found.append(Source(full, full, index, i.path, int(i.size or 0), int(mtime), PurePosixPath(i.path).stem))
    return sorted(found, key=lambda s: PurePosixPath(s.fs_path))  # the local engine's order (Path order)


def gather_inputs(
    inputs: list[Path], filesystems: list
) -> tuple[list[Source], list[Path], list[tuple[Path | str, str]]]:
    """(sources, the local files among them, [(input, why it could not be read)]). Local inputs go
    through cli.collect_inputs (the same files, order and refusals as the local engine)."""
    local = [p for p in inputs if as_uri(p) is None]
    remote: list[Source] = []
    for p in inputs:
        uri = as_uri(p)
        if uri is not None:
            remote += list_uri(uri, filesystems)
    files: list[Path] = []
    unreadable: list[tuple[Path | str, str]] = []
    if local:
        try:
            files, unreadable = cli.collect_inputs(local)  # type: ignore[assignment]
        except UsageError:
            if not remote:
                raise
    if not files and not remote:
        raise UsageError("no images found in the given inputs")
    return remote, files, unreadable


def local_sources(files: list[Path]) -> tuple[list[Source], list[tuple[Path, str]]]:
    out, bad = [], []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            bad.append((f, f"cannot read: {e.strerror or first_line(e)}"))
            continue
        out.append(Source(str(f), os.path.abspath(f), -1, str(f), st.st_size, st.st_mtime_ns, f.stem))
    return out, bad


# ------------------------------------------------------------------------ Ray stages


def batch_rows(specs: list[dict], batch_size: int) -> list[dict]:
    """Ray Data rows, one per batch: batch_size consecutive inputs (each a dict of i, fs, fs_path,
    size and stem), pickled. Every stage up to the model takes one such row at a time, so Ray
    Data's bundling of blocks never regroups images: each forward pass sees the batch the local
    engine forms from the same inputs."""
    return [{"spec": pickle.dumps(specs[f : f + batch_size], protocol=5)} for f in range(0, len(specs), batch_size)]


def _decode_batch(row: dict, *, filesystems: list, preprocessing, keep_original: bool = True) -> dict:
    """Ray task: read and prepare the images of one batch row (batch_rows) -> one row holding, pickled,
    their input indices `i`, `error` (why an image was skipped, "" if read) and `item` (the pickled
    cli.Item, b"" if skipped). keep_original=False (evaluate) keeps no original for an overlay."""
    payload: dict[str, list] = {"i": [], "error": [], "item": []}
    for spec in pickle.loads(row["spec"][0]):
        fs_index, fs_path, stem = spec["fs"], spec["fs_path"], spec["stem"]
        if fs_index < 0:  # a local file: the local engine's own reader
            one = cli.read_one(Path(fs_path), stem, preprocessing, keep_original)
        else:
            name = PurePosixPath(fs_path).name
            try:
                data = _read_remote(filesystems[fs_index], fs_path, int(spec["size"]), name)
                one = cli.read_one(Path(name), stem, preprocessing, keep_original, data=data)
            except ImageError as e:  # too large or unreadable
                one = (Path(name), str(e))
        read = isinstance(one, cli.Item)
        payload["i"].append(int(spec["i"]))
        payload["error"].append("" if read else one[1])
        payload["item"].append(_pickle_item(one) if read else b"")
    return {"payload": np.array([pickle.dumps(payload, protocol=5)], dtype=object)}


def _read_remote(fs, path: str, size: int, name: str) -> bytes:
    if size > MAX_BYTES:
        raise ImageError(f"{name} is larger than {MAX_BYTES // 2**20} MB")
    try:
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ImageError(f"cannot read {name}: {e.strerror or first_line(e)}") from None
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name} is larger than {MAX_BYTES // 2**20} MB")
    return data


def _pickle_item(item: cli.Item) -> bytes:
    # pixels as numpy: torch tensors pickle through shared-memory file handles
    prepared = dataclasses.replace(item.prepared, pixels=item.prepared.pixels.numpy())
    geometry = item.geometry
    if geometry is not None:
        geometry = dataclasses.replace(geometry, pixels=prepared.pixels)
    return pickle.dumps(dataclasses.replace(item, prepared=prepared, geometry=geometry), protocol=5)


class _Model:
    """Ray actor: the model, loaded once, and the analyses of each batch (as cli._analyze does).

    hooks (tests only, from VIT_LENS_RAY_TEST_HOOKS): count_dir, one file written per image
    analysed; exit_on_batch and exit_marker, the actor's process ends (os._exit) on its N-th
    batch unless the marker file exists (it is created first, so a restarted actor goes on);
    sleep, seconds before each batch (a run slow enough to be killed in the middle);
    fail_on_batch, the N-th batch raises (an error that no retry mends). The driver
    reads shard_rows (rows per Parquet shard) from the same JSON."""

    def __init__(self, source, device, dtype, image_size, settings, batch_size, threads, hooks):
        if threads:
            torch.set_num_threads(threads)
        self.lm = load_checkpoint(source, device=device, dtype=dtype, image_size=image_size)
        self.meta = json.dumps(report.model_meta(self.lm, source))  # what each report says produced it
        self.settings = report.Settings.from_dict(settings)
        self.analyze = cli.BatchAnalyzer(self.lm, self.settings, batch_size)
        self.hooks = hooks or {}
        self.calls = 0

    def __call__(self, row: dict) -> dict:
        """One batch row (_decode_batch's) -> one row per image: its arrays, pickled."""
        self.calls += 1
        run_test_hooks(self.hooks, self.calls)
        batch = pickle.loads(row["payload"][0])
        errors, blobs = list(batch["error"]), list(batch["item"])
        arrays_out = [b""] * len(errors)
        ok = [k for k, e in enumerate(errors) if not e]  # at most batch_size: a row is one batch
        if ok:
            items = [pickle.loads(blobs[k]) for k in ok]
            per_image = self.analyze(torch.stack([torch.from_numpy(it.prepared.pixels) for it in items]))
            for k, one in zip(ok, per_image):
                arrays_out[k] = pickle.dumps(one, protocol=5)
            if self.hooks.get("count_dir"):
                for it in items:
                    Path(self.hooks["count_dir"], f"{it.stem}-{secrets.token_hex(4)}").touch()
        return {
            "i": np.array(batch["i"], dtype=np.int64),
            "error": np.array(errors, dtype=object),
            "item": np.array(blobs, dtype=object),
            "arrays": np.array(arrays_out, dtype=object),
            "meta": np.array([self.meta] * len(errors), dtype=object),
        }


def run_test_hooks(hooks: dict, calls: int) -> None:
    """What the tests' hooks (_Model's docstring) do before a model actor's `calls`-th batch."""
    if hooks.get("sleep"):
        time.sleep(float(hooks["sleep"]))
    if hooks.get("fail_on_batch") == calls:
        raise RuntimeError("a test hook failed this batch")
    n, marker = hooks.get("exit_on_batch"), hooks.get("exit_marker")
    if n and marker and calls == n and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # the worker process dies here, as on an out-of-memory kill


class _Capture:
    """A stand-in for cli.OutputFolder that keeps what cli.write_outputs writes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def write(self, name: str, data: bytes) -> None:
        self.files[name] = data


def _flat(a: np.ndarray | None) -> list | None:
    return None if a is None else np.asarray(a, np.float32).reshape(-1).tolist()


def _encode(batch: dict, *, settings: dict, patch_size: int, labels: list | None) -> dict:
    """Ray task: each image's .npz and _rollout.png bytes (cli.write_outputs, so the local
    engine's bytes) and its Parquet row -> rows of (i, error, pickled result)."""
    settings_ = report.Settings.from_dict(settings)
    outs = []
    for error, blob, arrays, meta in zip(batch["error"], batch["item"], batch["arrays"], batch["meta"]):
        if error:
            outs.append(b"")
            continue
        it: cli.Item = pickle.loads(blob)
        one = pickle.loads(arrays)
        finite = cli.all_finite(one)
        one["model_view"] = it.prepared.view
        image = {"name": it.path.name, "original_size": list(it.prepared.original_size)}
        model_meta = json.loads(meta)  # the actor's: its device, dtype, precision
        rep = report.Report(one, settings_, model_meta, image)
        files = _Capture()
        cli.write_outputs(files, [it], [rep], patch_size)
        top = one.get("top5_classes")
        record = {
            "width": int(it.prepared.original_size[0]),
            "height": int(it.prepared.original_size[1]),
            "top5_classes": None if top is None else [int(k) for k in top],
            "top5_probabilities": _flat(one.get("top5_probabilities")),
            "top5_labels": None if top is None else [labels[k] if labels else str(int(k)) for k in top],
            "grad_class": int(one["grad_class"]) if "grad_class" in one else None,
            "features": _flat(one["features"]),
            "rollout": _flat(one["rollout"]),
            "finite": finite,
        }
        for key in (
            "mean_attention_distance",
            "mean_attention_distance_renormalized",
            "prefix_mass_share",
            "attention_entropy",
        ):
            record[key] = _flat(one[key])
        out = {
            "npz": files.files[f"{it.stem}.npz"],
            "png": files.files[f"{it.stem}_rollout.png"],
            "record": record,
            "device": model_meta["device"],
        }
        outs.append(pickle.dumps(out, protocol=5))
    return {"i": batch["i"], "error": list(batch["error"]), "out": outs}


def _partials(batch: dict, *, stale_ref) -> dict:
    """Ray task: partial sums of the aggregates over a batch of shard rows (current rows only)."""
    import ray

    stale = _cached(stale_ref, ray)
    n = 0
    finite = 0
    mad = rollout = None
    top1: Counter = Counter()
    top5: Counter = Counter()
    for k in range(len(batch["path"])):
        if stale and (batch["run_id"][k], batch["path"][k]) in stale:
            continue
        n += 1
        if batch["top5_classes"][k] is not None and len(batch["top5_classes"][k]):
            classes = [int(c) for c in batch["top5_classes"][k]]
            top1[classes[0]] += 1
            top5.update(classes)
        if not batch["finite"][k]:
            continue
        finite += 1
        m = np.asarray(batch["mean_attention_distance"][k], np.float64)
        r = np.asarray(batch["rollout"][k], np.float64)
        mad = m if mad is None else mad + m
        rollout = r if rollout is None else rollout + r
    part = {"n": n, "finite": finite, "mad": mad, "rollout": rollout, "top1": top1, "top5": top5}
    return {"partial": [pickle.dumps(part, protocol=5)]}


_CACHE: dict = {}


def _cached(ref, ray):
    if ref is None:
        return None
    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


# ----------------------------------------------------------------------------- driver


def fingerprint(lm, args: argparse.Namespace, settings: report.Settings, device_kind: str) -> str:
    """What makes two runs' numbers the same: model, weights, settings, dtype and device kind."""
    h = hashlib.sha256()
    meta = report.model_meta(lm, str(args.model))
    meta.pop("device")
    h.update(
        json.dumps(
            {
                "meta": meta,
                "settings": settings.to_dict(),
                "dtype": args.dtype,
                "device": device_kind,
                "schema": [report.SCHEMA_VERSION, SHARD_SCHEMA_VERSION],
            },
            sort_keys=True,
        ).encode()
    )
    for name, t in sorted(lm.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def read_shards(folder: Path) -> list[tuple[str, dict]]:
    """(shard name, its index columns as lists) of every shard this engine wrote into folder, in
    the order they were written."""
    import pyarrow.parquet as pq

    out = []
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("part-") and n.endswith(".parquet"))
    except OSError:
        return []
    cols = ["path", "stem", "npz", "rollout_png", "size", "mtime_ns"]
    cols += ["npz_size", "npz_mtime_ns", "rollout_png_size", "rollout_png_mtime_ns", "run_id", "fingerprint"]
    cols += ["top5_classes", "top5_labels", "top5_probabilities", "finite"]  # summary.json's entry
    for name in names:
        try:
            pf = pq.ParquetFile(folder / name)
            if META_KEY not in (pf.schema_arrow.metadata or {}):
                continue
            out.append((name, pf.read(columns=cols).to_pydict()))
        except (OSError, ValueError, KeyError) as e:
            log.warning("left out %s: %s", name, first_line(e))
    return out


def _same_file(path: Path, size: int, mtime_ns: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == size and st.st_mtime_ns == mtime_ns


def plan_resume(
    sources: list[Source], shards: list[tuple[str, dict]], fp: str, folder: cli.OutputFolder
) -> tuple[dict[int, dict], set[tuple[str, str]], list[str]]:
    """Which inputs an earlier run already did -> ({source index: its shard row}, the stale rows
    (run_id, path) of the shards still read, the shards still read). The names of the images
    resumed are added to folder.taken (no other input may take them)."""
    wanted = {s.key: i for i, s in enumerate(sources)}
    latest: dict[str, tuple[str, dict]] = {}
    for name, cols in shards:
        for k in range(len(cols["path"])):
            p = cols["path"][k]
            if p in wanted:
                latest[p] = (name, {c: v[k] for c, v in cols.items()})  # a later shard wins
    resumed: dict[int, dict] = {}
    claimed: set[str] = set()
    for key, (_, row) in sorted(latest.items(), key=lambda kv: kv[1][1]["run_id"], reverse=True):
        s = sources[wanted[key]]
        names = {row["npz"].casefold(), row["rollout_png"].casefold()}
        if (
            row["fingerprint"] == fp
            and (row["size"], row["mtime_ns"]) == (s.size, s.mtime_ns)
            and not names & claimed
            and _same_file(folder.path / row["npz"], row["npz_size"], row["npz_mtime_ns"])
            and _same_file(folder.path / row["rollout_png"], row["rollout_png_size"], row["rollout_png_mtime_ns"])
        ):
            resumed[wanted[key]] = row
            claimed |= names
    folder.taken |= claimed
    keep = {(r["run_id"], r["path"]) for r in resumed.values()}
    used = []
    stale: set[tuple[str, str]] = set()
    for name, cols in shards:
        rows = list(zip(cols["run_id"], cols["path"]))
        if any(r in keep for r in rows):
            used.append(name)
            stale |= {r for r in rows if r not in keep}
    return resumed, stale, used


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 to /dev/null for the duration (what C++ code writes there), then back."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _probe(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that does not answer is refused at once: ray.init would
    retry for minutes. `auto` and other forms go to Ray as they are."""
    m = re.match(r"^(?:ray://)?\[?([^\]/]+?)\]?:(\d+)$", address)
    if not m:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {e.strerror or first_line(e)}") from None


def start_ray(ray, address: str | None) -> bool:
    """Connect to the cluster at address, or start a local Ray in this process (no dashboard, no
    usage reporting). -> whether this call started it (and so shuts it down). A Ray already
    started in this process (a notebook, a test) is used as it is."""
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address != "auto" and address.removeprefix("ray://") != current:
            raise UsageError(f"this process is already connected to the Ray cluster at {current}, not {address}")
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the driver's own Ray core logs only fatal errors on stderr (the CLI writes one line per
    # problem; the Python errors that end a run say what failed): RAY_BACKEND_LOG_LEVEL=info shows them
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    if address:
        _probe(address)
    try:
        with _stderr_to_devnull():  # Ray's C++ core announces its log level on the terminal
            if address:
                ray.init(address=address, **kw)
            else:  # "local": a new Ray of our own, even where `ray start` runs one on this machine
                ray.init(address="local", **kw)
    except (ConnectionError, RuntimeError, ValueError, OSError, TimeoutError) as e:
        if not address:
            raise UsageError(f"cannot start a local Ray: {first_line(e)}") from None
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (
                " (a cluster with token authentication, Ray's default, needs RAY_AUTH_MODE=token and its token in "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token; on one of its nodes, --address auto finds both)"
            )
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {first_line(e)}{hint}") from None
    return True


def _quiet_data(ray) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI's own bar counts images
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    # a failed task: the CLI's own line says what failed (ray_cause); Ray's log file has the rest
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").setLevel(logging.CRITICAL)
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)


def run_analyze(args: argparse.Namespace) -> int:
    ray = import_ray()
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if as_uri(args.out) is not None:
        raise UsageError(f"--out must be a local folder (on a cluster, one the driver can write): {args.out}")
    settings = cli.settings_from_args(args)
    filesystems: list = []
    remote, files, unreadable = gather_inputs(args.inputs, filesystems)
    with cli.OutputFolder(args.out) as folder:  # created, locked and checked writable before the model loads
        return _analyze(ray, args, settings, remote, files, unreadable, filesystems, folder)


def _analyze(ray, args, settings, remote, files, unreadable, filesystems, folder: cli.OutputFolder) -> int:
    started = time.monotonic()
    run_names = {"model": folder.reserve("model.npz"), "mad": folder.reserve("mad.png")}
    files, own = cli.without_earlier_outputs(files, folder)
    sources, bad = local_sources(files)
    unreadable = list(unreadable) + bad
    sources += remote
    if not sources:
        raise UsageError(f"no images found in the given inputs (only the {own} files an earlier vit-lens run wrote)")
    try:  # on the driver: checks the arguments, writes model.npz; the actors load their own
        lm = load_checkpoint(args.model, device="cpu", dtype=driver_precision(args.dtype), image_size=args.image_size)
    except (ViTLensError, ValueError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    round_weights(lm.model, PRECISIONS[args.dtype])  # model.npz from the weights the actors hold
    settings = cli.settings_for_model(settings, lm.config)

    ray_start = time.monotonic()
    ours = start_ray(ray, args.address)
    try:
        ray_start_s = time.monotonic() - ray_start
        _quiet_data(ray)
        return _run(
            ray, args, settings, lm, sources, unreadable, own, filesystems, folder, run_names, started, ray_start_s
        )
    finally:
        if ours:
            ray.shutdown()


def driver_precision(precision: str) -> str:
    """The precision the driver's own model loads in, on its CPU, to check the arguments and write
    model.npz: the run's where a CPU has it, else fp32 (tf32 and fp16 are GPU formats, which the
    actors load on their devices; round_weights then gives the driver the actors' fp16 values)."""
    return precision if precision in precisions_for("cpu") else "fp32"


@torch.no_grad()
def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The driver's float32 model (driver_precision) with every floating parameter and buffer
    rounded to `dtype` in place, as the actors load it (for fp16: round to nearest even, the
    same conversion to_precision makes); nothing changes where the dtypes are the same."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.dtype != dtype:
            t.copy_(t.to(dtype).to(t.dtype))


def run_precision(precision: str) -> dict:
    """summary.json's dtype and precision of a run whose actors load the model in `precision`."""
    return {"dtype": str(PRECISIONS[precision]).removeprefix("torch."), "precision": precision}


def check_precision(plan: dict, precision: str) -> None:
    """Refuse at once (UsageError) a precision the actors' device type does not have (tf32 or fp16
    on CPU actors), rather than let every actor Ray starts fail to load the model."""
    kind = "cpu" if plan["device"] == "auto" else plan["device"]  # auto: the cluster has no GPU
    offered = precisions_for(kind)
    if precision not in offered:
        raise UsageError(
            f"--dtype {precision} is not offered on the Ray cluster's {kind} actors (offered: {', '.join(offered)})"
        )


def _plan_actors(ray, device: str) -> dict:
    """Where the model runs: one actor per GPU of the cluster (--device cuda, or auto where it has
    GPUs), else one CPU actor per CPUS_PER_CPU_ACTOR CPUs, each with that many torch threads."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise UsageError("--device cuda: the Ray cluster has no GPU (ray status lists its resources)")
    tasks = 1 if cpus >= 2 else 0.5  # CPUs of each decode and encode task, and of each model actor
    plan = dict(num_cpus=tasks, tasks=tasks, cpus=cpus)
    if device == "cuda" or (device == "auto" and gpus):
        return plan | dict(device="cuda", kind="cuda", actors=gpus, num_gpus=1, threads=None)
    actors = max(1, cpus // CPUS_PER_CPU_ACTOR)
    threads = max(1, min(CPUS_PER_CPU_ACTOR, cpus // actors))
    return plan | dict(device=device, kind=device, actors=actors, num_gpus=0, threads=threads)


def _run(ray, args, settings, lm, sources, unreadable, own, filesystems, folder, run_names, started, ray_start_s):
    c = lm.config
    plan = _plan_actors(ray, args.device)
    check_precision(plan, args.dtype)
    fp = fingerprint(lm, args, settings, plan["kind"])
    shards_dir = folder.path / PARQUET_DIR
    resumed, stale, used_shards = plan_resume(sources, read_shards(shards_dir), fp, folder)
    pending = [i for i in range(len(sources)) if i not in resumed]
    stems: dict[int, str] = {i: row["stem"] for i, row in resumed.items()}
    for i, stem in zip(pending, cli.free_stems([sources[i].stem for i in pending], cli.IMAGE_OUTPUTS, folder.taken)):
        stems[i] = stem
    labels = list(lm.labels) if lm.labels else None
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)

    progress = cli.Progress(max(1, len(pending)))
    skipped: list[dict] = []
    for path, reason in unreadable:
        progress.note(f"skipped {path}: {reason}")
        skipped.append({"file": str(path), "reason": reason})
    if resumed:
        progress.note(
            f"note: {len(resumed)} of {len(sources)} images were analysed by an earlier run into {folder.path} "
            f"with the same model and settings: kept; {len(pending)} to analyse"
        )
    renamed = sum(stems[i] != s.stem for i, s in enumerate(sources))
    cli.announce(progress, folder, own=own, renamed=renamed, total=len(sources), run_names=run_names)

    entries: dict[int, dict] = {i: _entry(sources[i], row) for i, row in resumed.items()}
    records: list[dict] = []  # rows not yet in a shard
    shard_names: list[str] = []
    devices: set[str] = set()
    non_finite: list[str] = [stems[i] for i, row in resumed.items() if not _row_finite(row)]
    state = {
        "failure": None,
        "interrupted": False,
        "first_result_s": None,
        "first_batch_images": 0,
        "pipeline_s": None,
    }
    hooks = json.loads(os.environ.get(TEST_HOOKS, "{}") or "{}")
    shard_rows = int(hooks.get("shard_rows", SHARD_ROWS))
    planned = [n for i in pending for n in (f"{stems[i]}.npz", f"{stems[i]}_rollout.png")]
    planned += [run_names["model"], run_names["mad"]]

    def summary(*, final: bool, aggregates: dict | None = None, mad_mean=None, status: int | None = None):
        done = {e["file"] for e in entries.values()} | {s["file"] for s in skipped}
        resumed_files = [n for i in resumed for n in (entries[i]["npz"], entries[i]["rollout_png"])]
        written = [n for n in dict.fromkeys(folder.written) if n != cli.SUMMARY]
        if not final:  # everything this run may write, so a killed run leaves its files claimed
            written = list(dict.fromkeys(written + planned))
        earlier = sorted((set(folder.earlier) | set(resumed_files)) - set(written))
        head = cli.summary_head(str(args.model), lm, settings, ",".join(sorted(devices)) or plan["device"])
        return (
            head
            | run_precision(args.dtype)
            | {
                "images": {entries[i]["stem"]: entries[i]["entry"] for i in sorted(entries)},
                "skipped": skipped,
                "mean_attention_distance": None if mad_mean is None else mad_mean.tolist(),
                "wall_time_s": round(time.monotonic() - started, 3),
                "written_by": f"{cli.PROG} analyze",
                "complete": final and status in (0, 1),
                "stopped": (
                    "the run has not ended (or was killed): `written` lists every name it may write"
                    if not final
                    else "interrupted"
                    if state["interrupted"]
                    else state["failure"]
                ),
                "not_written": [s.file for s in sources if s.file not in done],
                "files": {k: (v if v in folder.written else None) for k, v in run_names.items()},
                "written": written,
                "files_from_earlier_runs": earlier,
                "non_finite": {
                    "images": non_finite,
                    "note": "images with NaN or Inf in their arrays; left out of the mean attention distance",
                },
                "notes": notes,
                "exit_status": status,
                "engine": {
                    "name": "ray",
                    "ray_version": ray.__version__,
                    "address": args.address,
                    "run_id": run_id,
                    "fingerprint": fp,
                    "model_actors": plan["actors"],
                    "actor_device": plan["device"],
                    "images_analysed": len(entries) - len(resumed),
                    "images_resumed": len(resumed),
                    "ray_start_s": round(ray_start_s, 3),
                    # seconds from the pipeline's start to its first batch of results (workers and
                    # actors started, the model loaded in each) and to its last
                    "first_result_s": state["first_result_s"],
                    "first_batch_images": state["first_batch_images"],
                    "pipeline_s": state["pipeline_s"],
                },
                "parquet": {
                    "folder": PARQUET_DIR,
                    "shards": used_shards + shard_names,
                    "columns": {name: what for name, _, what in _columns()},
                    "note": "one row per image and run; an image analysed again (its input or outputs changed) has a "
                    "row in more than one shard: its current row is the one of the latest run_id among these shards",
                },
                "aggregates": aggregates,
            }
        )

    notes: list[str] = []
    status = 2
    shards = None
    try:
        folder.write(cli.SUMMARY, report.json_bytes(summary(final=False)))
        shards = cli.OutputFolder(shards_dir).__enter__()
        if pending:
            stream = _pipeline(ray, args, settings, lm, sources, pending, stems, filesystems, plan, labels)
            last_flush = time.monotonic()
            t0 = time.monotonic()
            for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
                if state["first_result_s"] is None:
                    state["first_result_s"] = round(time.monotonic() - t0, 3)
                    state["first_batch_images"] = len(batch["i"])
                for i, error, out in zip(batch["i"], batch["error"], batch["out"]):
                    i = int(i)
                    s = sources[i]
                    if error:
                        progress.note(f"skipped {s.file}: {error}")
                        skipped.append({"file": s.file, "reason": str(error)})
                    else:
                        r = pickle.loads(out)
                        stem = stems[i]
                        npz, png = f"{stem}.npz", f"{stem}_rollout.png"
                        folder.write(npz, r["npz"])
                        folder.write(png, r["png"])
                        devices.add(r["device"])
                        row = _row(s, stem, r["record"], folder, run_id, fp)
                        records.append(row)
                        entries[i] = _entry(s, row)
                        if not row["finite"]:
                            non_finite.append(stem)
                    progress.step(1)
                if records and (len(records) >= shard_rows or time.monotonic() - last_flush > SHARD_SECONDS):
                    shard_names.append(_write_shard(shards, records, run_id, len(shard_names), lm))
                    records.clear()
                    last_flush = time.monotonic()
            state["pipeline_s"] = round(time.monotonic() - t0, 3)
        if records:
            shard_names.append(_write_shard(shards, records, run_id, len(shard_names), lm))
            records.clear()
    except OutputError as e:
        state["failure"] = str(e)
    except KeyboardInterrupt:
        state["interrupted"] = True
    except Exception as e:  # noqa: BLE001 - Ray's errors (a task or actor that failed for good) have no common base
        if not _is_ray_error(ray, e):
            raise
        state["failure"] = f"the Ray pipeline stopped: {ray_cause(e)} (a rerun resumes)"
    finally:
        progress.end_line()
    if records and shards is not None and not state["interrupted"]:  # what was written is recorded
        try:
            shard_names.append(_write_shard(shards, records, run_id, len(shard_names), lm))
        except OutputError as e:
            state["failure"] = state["failure"] or str(e)

    aggregates, mad_mean = None, None
    if not state["interrupted"] and not state["failure"]:
        try:
            aggregates = _aggregate(ray, shards_dir, used_shards + shard_names, stale, labels, c)
            if aggregates["mean_attention_distance"] is not None:
                mad_mean = np.asarray(aggregates["mean_attention_distance"], np.float32)
            arrays, model_notes = cli.model_arrays(lm)
            notes += model_notes
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            folder.write(run_names["model"], buf.getvalue())
            if mad_mean is not None:
                png = render.mad_scatter_png(mad_mean, title=f"{aggregates['finite_images']} images")
                folder.write(run_names["mad"], render.to_png(png))
            elif entries:
                notes.append("mad.png left out: no image gave finite mean attention distances")
        except OutputError as e:
            state["failure"] = str(e)
        except KeyboardInterrupt:
            state["interrupted"] = True
    if shards is not None:
        shards.close(refused=False)
    status = 130 if state["interrupted"] else 2 if state["failure"] else 1 if skipped else 0
    summary_error = None
    try:
        folder.write(
            cli.SUMMARY, report.json_bytes(summary(final=True, aggregates=aggregates, mad_mean=mad_mean, status=status))
        )
    except OutputError as e:
        summary_error = str(e)
    if non_finite:
        progress.note(
            f"warning: {len(non_finite)} of {len(entries)} images gave non-finite values (NaN or Inf): the model's "
            "weights or its preprocessing produce them; summary.json lists them and writes such numbers as null"
        )
    if state["interrupted"]:
        raise KeyboardInterrupt
    failure = state["failure"]
    if failure or summary_error:
        tail = (
            f"summary.json could not be written either ({summary_error})"
            if failure and summary_error
            else "summary.json lists what was written"
        )
        raise OutputError(f"{failure or summary_error}; stopped after {len(entries)} of {len(sources)} images; {tail}")
    return status


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): (.*)$")


def ray_cause(e: BaseException) -> str:
    """The user-code error inside a Ray error, in one line: Ray carries it only as traceback text
    (`RuntimeError: ...` before Ray's own `ray.exceptions...` lines)."""
    text = _ANSI.sub("", str(e))
    raised = [m for m in map(_RAISED.match, text.splitlines()) if m and not m.group(1).startswith("ray.")]
    if raised:
        return f"{raised[-1].group(1)}: {raised[-1].group(2)}"[:300]
    return first_line(Exception(text)) if text.strip() else type(e).__name__


def _is_ray_error(ray, e: BaseException) -> bool:
    import ray.exceptions

    kinds = [ray.exceptions.RayError]
    try:
        from ray.data.exceptions import UserCodeException

        kinds.append(UserCodeException)
    except ImportError:
        pass
    return isinstance(e, tuple(kinds))


def _row_finite(row: dict) -> bool:
    return bool(row["finite"])


def _row(s: Source, stem: str, record: dict, folder: cli.OutputFolder, run_id: str, fp: str) -> dict:
    npz, png = f"{stem}.npz", f"{stem}_rollout.png"
    st_npz, st_png = (folder.path / npz).stat(), (folder.path / png).stat()
    return {
        "file": s.file,
        "path": s.key,
        "stem": stem,
        "npz": npz,
        "rollout_png": png,
        "size": s.size,
        "mtime_ns": s.mtime_ns,
        **record,
        "npz_size": st_npz.st_size,
        "npz_mtime_ns": st_npz.st_mtime_ns,
        "rollout_png_size": st_png.st_size,
        "rollout_png_mtime_ns": st_png.st_mtime_ns,
        "run_id": run_id,
        "fingerprint": fp,
    }


def _entry(s: Source, row: dict) -> dict:
    """summary.json's entry for an image, from its shard row (as the local engine writes it)."""
    entry = {"file": s.file, "npz": row["npz"], "rollout_png": row["rollout_png"]}
    if row.get("top5_classes") is not None:
        entry["top5"] = [
            {"class": int(k), "label": label, "probability": float(p)}
            for k, label, p in zip(row["top5_classes"], row["top5_labels"], row["top5_probabilities"])
        ]
    return {"stem": row["stem"], "file": s.file, "npz": row["npz"], "rollout_png": row["rollout_png"], "entry": entry}


def _write_shard(shards: cli.OutputFolder, rows: list[dict], run_id: str, seq: int, lm) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _columns()
    c = lm.config
    meta = {
        "schema_version": SHARD_SCHEMA_VERSION,
        "report_schema_version": report.SCHEMA_VERSION,
        "run_id": run_id,
        "grid": list(c.grid),
        "layers": c.depth,
        "heads": c.num_heads,
        "columns": {name: what for name, _, what in cols},
    }
    schema = pa.schema([pa.field(name, typ) for name, typ, _ in cols], metadata={META_KEY: json.dumps(meta)})
    table = pa.table({name: [r.get(name) for r in rows] for name, _, _ in cols}, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    name = f"part-{run_id}-{seq:05d}.parquet"
    shards.write(name, sink.getvalue().to_pybytes())
    return name


# Ray 2.60 names no other way to bound a Data actor's restarts (its default is forever) or to keep
# the decode tasks out of the model actors (fusion): ray_remote_args_fn, which warns that Ray 2.64
# removes it (requirements-ray.txt pins 2.60).
_REMOTE_ARGS_FN_WARNING = r"`ray_remote_args_fn` is deprecated"


def _task_retries() -> dict:
    """A task whose worker process dies is run again, this often."""
    return {"max_retries": ACTOR_RESTARTS}


def _actor_restarts() -> dict:
    """A model actor whose process dies is started again and its batch retried, this often (Ray
    Data's default is forever, which a model that crashes every time would never leave)."""
    return {"max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}


def batch_dataset(ray, rows: list[dict], plan: dict):
    """A Ray Dataset of batch rows: a block per batch where that still gives every CPU a few, else
    up to 16 batches a block (a million tiny blocks would cost more in scheduling than in work)."""
    warnings.filterwarnings("ignore", message=_REMOTE_ARGS_FN_WARNING)
    blocks = min(len(rows), max(4 * plan["cpus"], math.ceil(len(rows) / 16)))
    return ray.data.from_items(rows, override_num_blocks=max(1, blocks))


def read_stage(ds, fn, plan: dict, kwargs: dict):
    """ds mapped by a reading task fn, one batch row at a time (batch_rows)."""
    return ds.map_batches(
        fn,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs=kwargs,
        num_cpus=plan["tasks"],
        ray_remote_args_fn=_task_retries,  # also keeps this stage out of the model actors (no fusion)
    )


def model_stage(ds, actor, args: argparse.Namespace, plan: dict, extra: dict):
    """ds mapped by a pool of model actors (plan: _plan_actors), one batch row at a time; each
    actor is built with the model's source, device, precision, image size, its torch threads, the
    tests' hooks (TEST_HOOKS) and `extra`."""
    from ray.data import ActorPoolStrategy

    hooks = json.loads(os.environ.get(TEST_HOOKS, "{}") or "{}")
    return ds.map_batches(
        actor,
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs={
            "source": str(args.model),
            "device": plan["device"],
            "dtype": args.dtype,
            "image_size": args.image_size,
            "threads": plan["threads"],
            "hooks": hooks,
            **extra,
        },
        compute=ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"] or None,
        ray_remote_args_fn=_actor_restarts,
    )


def _pipeline(ray, args, settings, lm, sources, pending, stems, filesystems, plan, labels):
    """The Ray Data stream: decode (tasks) -> model (actor pool) -> encode (tasks)."""
    bs = args.batch_size
    specs = [
        {"i": i, "fs": sources[i].fs, "fs_path": sources[i].fs_path, "size": sources[i].size, "stem": stems[i]}
        for i in pending
    ]
    ds = batch_dataset(ray, batch_rows(specs, bs), plan)
    ds = read_stage(ds, _decode_batch, plan, {"filesystems": filesystems, "preprocessing": lm.preprocessing})
    extra = {"settings": settings.to_dict(), "batch_size": bs}
    ds = model_stage(ds, _Model, args, plan, extra)
    return ds.map_batches(
        _encode,
        batch_size=bs,
        batch_format="numpy",
        fn_kwargs={
            "settings": settings.to_dict(),
            "patch_size": lm.config.patch_size,
            "labels": labels,
        },
        num_cpus=plan["tasks"],
        ray_remote_args_fn=_task_retries,
    )


def _aggregate(ray, shards_dir: Path, shard_names: list[str], stale: set, labels: list | None, config) -> dict:
    """The dataset aggregates, computed by Ray tasks over the current shard rows."""
    n = finite = 0
    mad = rollout = None
    top1: Counter = Counter()
    top5: Counter = Counter()
    if shard_names:
        import pyarrow.parquet as pq

        # the driver reads the shards (the workers may be on machines that cannot see --out), one at a
        # time, the columns the aggregates need, into the object store; Ray tasks do the sums
        cols = ["path", "run_id", "finite", "top5_classes", "mean_attention_distance", "rollout"]
        refs = [ray.put(pq.read_table(shards_dir / name, columns=cols)) for name in shard_names]
        ds = ray.data.from_arrow_refs(refs)
        stale_ref = ray.put(stale) if stale else None
        parts = ds.map_batches(_partials, batch_format="numpy", fn_kwargs={"stale_ref": stale_ref})
        for row in parts.take_all():
            p = pickle.loads(row["partial"])
            n += p["n"]
            finite += p["finite"]
            if p["mad"] is not None:
                mad = p["mad"] if mad is None else mad + p["mad"]
                rollout = p["rollout"] if rollout is None else rollout + p["rollout"]
            top1 += p["top1"]
            top5 += p["top5"]

    def counts(counter: Counter) -> list[dict]:
        return [
            {"class": int(k), "label": labels[k] if labels else str(int(k)), "images": int(v)}
            for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    return {
        "images": n,
        "finite_images": finite,
        "mean_attention_distance": None
        if mad is None
        else (mad / finite).astype(np.float32).reshape(config.depth, config.num_heads).tolist(),
        "mean_rollout": None
        if rollout is None
        else (rollout / finite).astype(np.float32).reshape(config.grid).tolist(),
        "top1_counts": counts(top1),
        "top5_counts": counts(top5),
        "note": "means over the images with finite values: mean_attention_distance (layers, heads) in pixels of "
        "the model input, mean_rollout (grid rows, grid columns); top1_counts: images whose most probable class it "
        "is; top5_counts: images with it among their 5 most probable",
    }
