"""The `vit-lens` command (also `python -m viz_app`).

`vit-lens analyze --model SOURCE --out DIR IMAGE_OR_DIR ...` is the batch analysis. The other
subcommands hand their arguments to their own modules: `app` (viz_app/app.py), `evaluate`
(viz_app/evaluate.py, which shares this module's input and output handling), `demo-train`,
`demo-evaluate` and `demo-gallery` (viz_app/demo/).

Exit codes (one line on stderr for each problem, never a traceback):
  0  every image analysed and written;
  1  some inputs were skipped, each named on a `skipped <path>: <why>` line (a file that is not an
     image we can read, a folder that cannot be listed); the others were analysed;
  2  the run could not do its work: bad arguments, a model that cannot be loaded, an analysis that
     would not fit in memory, or an output folder that cannot take the outputs (it cannot be
     created, is read-only, another run is writing to it, or writing fails part-way, e.g. a full
     disk). A write that fails part-way is 2, not 1: 1 tells a script that every input not named
     was analysed, which is untrue once writing stopped; it is the read-only folder's failure,
     found late. summary.json (where it can still be written) then lists what was written and
     says "complete": false;
  130 interrupted (Ctrl-C): the files already written are complete, summary.json lists them.

The output folder (OutputFolder) is locked for the run: flock on the folder itself, which the
kernel releases when the process ends however it ends, so a crashed run never blocks the next;
a second run into the same folder is refused (exit 2). Every file is written under a temporary
name (`.vit-lens-tmp-*.part`) in the folder and renamed when complete, so no file is ever
half-written under its final name; temporaries a killed run left behind are removed by the next
run. A file that was in the folder before the run is never replaced, unless an earlier vit-lens
run wrote it (its summary.json lists it). An image whose output names are taken (by another input
of the same name, by the run's own files, by a file already there) gets the first free
`<stem>_<k>`; summary.json maps every input to its files.

Memory: decoded originals are held only for the rollout overlay, downscaled to at most
OVERLAY_MAX_PIXELS, and a batch stops taking images once those held reach MAX_HELD_BYTES (the
rest go into the next batch). Before any image is read, the run's memory need (the shared estimate
of viz_app.pipeline plus these images) is checked against the free memory; a batch that does not
fit is refused (exit 2) with the largest --batch-size that would fit, rather than lowered
silently: the user chooses, and the same command does the same thing on every machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import io
import json
import logging
import os
import secrets
import stat
import sys
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import ViTLensError, load_checkpoint
from model.device import PRECISIONS
from model.errors import first_line
from model.preprocess import ImageError, PreparedImage, load_image, prepare_image
from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app import render, report
from viz_app.pipeline import memory_shortfall, run_forward

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
log = logging.getLogger("viz_app")

# The rollout overlay is drawn over the original reduced (by a whole factor, box filter) to at most
# this many pixels, as in the app (render.reduced_original): 16 MP keeps a 12 MP photo whole and
# halves each side of a 48 MP one. At 50 MP the overlay's float temporaries alone took 2 GB and 4 s
# per image; its map has one value per patch, so past this size it only repeats the photo's detail.
OVERLAY_MAX_PIXELS = render.OVERLAY_MAX_PIXELS
# A batch stops taking images once the originals it holds reach this (plus the last image read, at
# most 3 * OVERLAY_MAX_PIXELS bytes); three batches are in flight at most (one read, one in the
# model, one written), so about 1 GB of originals at worst instead of 8 x 150 MB per batch.
MAX_HELD_BYTES = 256 * 2**20
STAGES_IN_FLIGHT = 3
# Output file names: at most this many bytes (the common file-system limit); longer stems are cut.
NAME_MAX = 255
TEMP_PREFIX, TEMP_SUFFIX = ".vit-lens-tmp-", ".part"
LOCK_NAME = ".vit-lens.lock"  # only where a folder cannot be flocked (some network file systems)
SUMMARY = "summary.json"
# An earlier summary.json larger than this is not read to find which files that run wrote.
SUMMARY_MAX_BYTES = 64 * 2**20
# Every fixed name either command writes: an earlier vit-lens run into the folder may have left them.
RUN_FILES = (
    SUMMARY,
    "model.npz",
    "mad.png",
    "faithfulness.csv",
    "randomization.csv",
    "pointing.csv",
    "faithfulness.png",
    "randomization.png",
)
IMAGE_OUTPUTS = (".npz", "_rollout.png")  # per image: <stem>.npz and <stem>_rollout.png


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(message)


PROG = "vit-lens"
# subcommand -> (module with a main(argv) -> int, help); their arguments are parsed there
DELEGATED = {
    "app": ("viz_app.app", "start the web app on 127.0.0.1 (arguments go to `streamlit run`)"),
    "evaluate": ("viz_app.evaluate", "faithfulness curves and randomization checks of every map over a dataset"),
    "demo-train": ("viz_app.demo.train", "train the embedded demo model from scratch"),
    "demo-evaluate": ("viz_app.demo.evaluate", "score a model on generated shape scenes"),
    "demo-gallery": ("viz_app.demo.gallery", "write the demo model's test scenes and masks"),
}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--engine and --address, for analyze and evaluate."""
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process (the default); ray: a Ray Data pipeline, on a local Ray started here or on "
        "--address (needs requirements-ray.txt; inputs may be s3://, gs://, hdfs:// URIs)",
    )
    p.add_argument(
        "--address", default=None, help="with --engine ray: an existing Ray cluster (e.g. HOST:6379 or auto)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="ViT Lens: look inside Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    a = sub.add_parser("analyze", help="analyse images with a ViT and write arrays, overlays and a summary")
    a.add_argument("--model", required=True, help="demo, a curated key, a checkpoint path or a hub id")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    a.add_argument("--dtype", default="fp32", choices=list(PRECISIONS), help="tf32: CUDA only (docs/PRECISION.md)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--save-attentions", action="store_true", help="also store attentions (L, H, T, T) float32")
    a.add_argument(
        "--grad-rollout",
        action="store_true",
        help="also the gradient rollout for the top-1 class (one backward pass per batch: about 2x the time)",
    )
    a.add_argument("--grad-class", type=int, default=None, help="the gradient rollout's class (default: each top-1)")
    a.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="a JSON file of report settings, or a report's report_json (e.g. from the app's Download tab); "
        "the flags below override it",
    )
    a.add_argument("--rollout-fusion", choices=report.FUSIONS, default=None)
    a.add_argument("--rollout-discard", type=float, default=None, help="share in [0, 1) zeroed per layer")
    a.add_argument("--rollout-readout", choices=report.READOUTS, default=None)
    a.add_argument("--rollout-layers", default=None, metavar="FIRST-LAST", help="1-based, inclusive (e.g. 4-12)")
    a.add_argument("--query-patch", default=None, metavar="ROW,COL", help="also each head's map for this patch query")
    a.add_argument("--drop-prefix", action="store_true", default=None, help="per-head maps renormalized over patches")
    a.add_argument(
        "--class-method",
        choices=report.CLASS_METHODS,
        default=None,
        help="the class-specific maps: gradient (gradient rollout, ICCV 2021, the default) or lrp (Transformer "
        "Attribution, CVPR 2021)",
    )
    a.add_argument(
        "--class-maps", type=int, default=None, metavar="K", help="also the maps of each image's top-K classes"
    )
    a.add_argument(
        "--contrast", type=int, nargs=2, default=None, metavar=("A", "B"), help="also the contrastive map A minus B"
    )
    a.add_argument("--mask-tau", type=float, default=None, help="share of the mass the masks keep (default 0.6)")
    a.add_argument(
        "--high-norm-factor", type=float, default=None, help="high-norm patch: norm above this x the median (2)"
    )
    a.add_argument(
        "--budget-queries", choices=A.tokens.QUERIES, default=None, help="whose attention token_budget averages"
    )
    a.add_argument("--image-size", type=int, default=None, help="run at another resolution (resamples positions)")
    a.add_argument("--out", required=True, type=Path, help="output folder")
    add_engine_arguments(a)
    a.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    for name, (_, text) in DELEGATED.items():  # parsed by their own modules (see main)
        sub.add_parser(name, help=text, add_help=False)
    return p


class OutputError(Exception):
    """The output folder could not take a file: one line on stderr, exit 2 (see the module docstring)."""


@dataclass
class Item:
    path: Path
    stem: str
    prepared: PreparedImage
    original: np.ndarray | None  # the original for the overlay, at most OVERLAY_MAX_PIXELS; None if not kept
    geometry: PreparedImage | None = None  # prepared, with original_size that of `original`


def collect_inputs(inputs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files given or found in the given folders (recursively, in path order; links to
    folders are not followed) -> (files, [(path, why it could not be read)]).

    A folder that cannot be listed, or an image-named entry that cannot be looked at (permission,
    a link loop), is reported, not passed over silently (Path.rglob drops PermissionError). A
    name that points at nothing (a dangling link) is not an input and is left out quietly, as are
    entries that are not regular files (FIFOs, sockets)."""
    files: list[Path] = []
    unreadable: list[tuple[Path, str]] = []

    def failed(e: OSError) -> None:
        unreadable.append((Path(e.filename or "?"), f"cannot read folder: {e.strerror or first_line(e)}"))

    for p in inputs:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UsageError(f"no such file or folder: {p}") from None
        except OSError as e:
            unreadable.append((p, f"cannot read: {e.strerror or first_line(e)}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            found = []
            for root, _, names in os.walk(p, onerror=failed):
                for name in names:
                    f = Path(root) / name
                    if f.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    try:
                        if stat.S_ISREG(f.stat().st_mode):  # a regular file, through links
                            found.append(f)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        unreadable.append((f, f"cannot read: {e.strerror or first_line(e)}"))
            files += sorted(found)
        elif stat.S_ISREG(st.st_mode):
            files.append(p)
        else:
            raise UsageError(f"not a file or folder: {p}")
    if not files:
        why = f" ({unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise UsageError(f"no images found in the given inputs{why}")
    return files, unreadable


def _fit(stem: str, room: int) -> str:
    """stem cut (by characters) so that it and `room` more bytes fit in NAME_MAX bytes."""
    while stem and len(os.fsencode(stem)) + room > NAME_MAX:
        stem = stem[:-1]
    return stem or "image"


def free_stems(stems: list[str], suffixes: tuple[str, ...], taken: set[str]) -> list[str]:
    """One output stem per input stem such that no `stem + suffix` is in `taken` (casefolded names,
    so that names differing only in case never collide on a case-insensitive file system) or is
    given twice; `taken` receives the names given out.

    Deterministic: first every input whose own stem is free keeps it (the first such input of a
    name wins), then each other takes the first free `<stem>_<k>`, k = 1, 2, ... in input order. So
    `a/x.png`, `b/x.png`, `x_1.png` become x, x_2, x_1: no input takes another's own name."""
    longest = max(len(os.fsencode(s)) for s in suffixes)
    base = [_fit(s, longest) for s in stems]  # a name longer than the file system takes is cut

    def free(stem: str) -> bool:
        return not any((stem + s).casefold() in taken for s in suffixes)

    def take(stem: str) -> str:
        taken.update((stem + s).casefold() for s in suffixes)
        return stem

    out: list[str | None] = [take(b) if free(b) else None for b in base]
    next_k: dict[str, int] = {}
    for i, b in enumerate(base):
        if out[i] is None:
            k = next_k.get(b, 1)
            while not free(_fit(b, longest + len(f"_{k}")) + f"_{k}"):
                k += 1
            next_k[b] = k + 1
            out[i] = take(_fit(b, longest + len(f"_{k}")) + f"_{k}")
    return out  # type: ignore[return-value]


def earlier_outputs(summary: Path) -> set[str] | None:
    """The files an earlier vit-lens run (analyze or evaluate, this version or before) wrote into
    this folder, from its summary.json; None where that is not a summary vit-lens wrote."""
    try:
        if summary.stat().st_size > SUMMARY_MAX_BYTES:
            return None
        d = json.loads(summary.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    command = d.get("command")
    current = str(d.get("written_by", "")).startswith(PROG)
    legacy = ("schema_version" in d and isinstance(d.get("images"), dict)) or (
        isinstance(command, list) and command[:1] == [PROG]
    )
    if not (current or legacy):
        return None
    # a summary of this version lists every file its run wrote; one from before wrote the fixed
    # names (replacing whatever was there) and the files its images list
    names = {SUMMARY} if current else set(RUN_FILES)

    def add(v) -> None:
        if isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v:
            names.add(v)

    keys = ("written", "files_from_earlier_runs") if current else ("files",)
    for key in keys:
        v = d.get(key)
        for name in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
            add(name)
    images = d.get("images")
    for entry in images.values() if isinstance(images, dict) and not current else ():
        if isinstance(entry, dict):
            npz = entry.get("npz")
            if isinstance(npz, str) and npz.endswith(".npz"):
                add(npz)
                add(npz[:-4] + "_rollout.png")
    return names


# errno values of a file system that has no hard links (FAT, some FUSE mounts): rename instead
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EINVAL}


def _write_temp(f, data: bytes) -> None:
    """Fill a temporary file (a seam for tests that simulate a full disk)."""
    f.write(data)


class OutputFolder:
    """One run's output folder: created, locked, checked writable, and what is already in it
    surveyed, all before the model is loaded; then every file written atomically under a name
    that takes nothing that is not ours. See the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: list[str] = []  # names this run wrote, in order
        self.earlier: list[str] = []  # files an earlier run wrote that are still here
        self.taken: set[str] = set()  # casefolded names this run must not write (or has given out)
        self._ours: set[str] = set()  # casefolded names this run may replace
        self._lock_fd: int | None = None
        self._created = False

    def __enter__(self) -> OutputFolder:
        self._created = not os.path.lexists(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder {self.path}: {e.strerror or first_line(e)}") from None
        try:
            self._lock()
            self._probe()
            self._survey()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(refused=exc_type is not None and issubclass(exc_type, UsageError))

    def close(self, *, refused: bool = True) -> None:
        """Release the lock. A refused run (a usage error: the model did not load, the batch does not
        fit) removes the folder if it created it and wrote nothing into it."""
        if refused and self._created and not self.written:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _busy(self) -> UsageError:
        return UsageError(f"another vit-lens run is writing to {self.path}: wait for it to end or choose another --out")

    def _lock(self) -> None:
        if fcntl is None:
            return
        for target, flags in ((self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)), (self.path / LOCK_NAME, None)):
            try:
                fd = os.open(target, flags) if flags is not None else os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                if flags is not None:
                    continue  # a folder we cannot open for reading: the lock file
                raise UsageError(f"cannot lock output folder {self.path}: {e.strerror or first_line(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except OSError as e:
                os.close(fd)
                if flags is not None:
                    continue  # no flock on folders here: the lock file
                raise UsageError(f"cannot lock output folder {self.path}: {e.strerror or first_line(e)}") from None
            self._lock_fd = fd
            return

    def temp(self) -> tuple[int, str]:
        """A new file of our own in the folder (never an existing one: O_EXCL), mode as umask says."""
        while True:
            tmp = os.path.join(self.path, f"{TEMP_PREFIX}{secrets.token_hex(6)}{TEMP_SUFFIX}")
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
            except FileExistsError:
                continue

    def _probe(self) -> None:
        try:
            fd, tmp = self.temp()
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise UsageError(f"output folder {self.path} is not writable: {e.strerror or first_line(e)}") from None

    def _survey(self) -> None:
        """What is here: temporaries of a killed run (removed: the lock says no run is writing
        them), an earlier run's files (replaceable), anything else (never touched)."""
        entries: dict[str, bool] = {}  # name -> replaceable kind (not a folder)
        try:
            with os.scandir(self.path) as it:
                for e in it:
                    if e.name.startswith(TEMP_PREFIX) and e.name.endswith(TEMP_SUFFIX):
                        with contextlib.suppress(OSError):
                            os.unlink(e.path)
                        continue
                    try:
                        entries[e.name] = not e.is_dir(follow_symlinks=False)
                    except OSError:
                        entries[e.name] = False
        except OSError as e:  # writable but not readable: what is there cannot be known, so nothing is safe
            raise UsageError(f"cannot list output folder {self.path}: {e.strerror or first_line(e)}") from None
        claimed = earlier_outputs(self.path / SUMMARY) if SUMMARY in entries else set()
        if claimed is None:
            raise UsageError(f"{self.path} already holds a {SUMMARY} that vit-lens did not write: choose another --out")
        claimed_cf = {n.casefold() for n in claimed}
        for name, replaceable in entries.items():
            key = name.casefold()
            if replaceable and key in claimed_cf:
                self._ours.add(key)
                if name != SUMMARY:
                    self.earlier.append(name)
            else:
                self.taken.add(key)
        self.taken |= {SUMMARY.casefold(), LOCK_NAME.casefold()}  # summary.json: never an image's name
        self._ours.add(SUMMARY.casefold())

    def reserve(self, name: str) -> str:
        """A run file's name: `name`, or the first free `<stem>_<k><suffix>` if a file that is not
        ours already has it."""
        stem, dot, ext = name.rpartition(".")
        (got,) = free_stems([stem], (dot + ext,), self.taken)
        return got + dot + ext

    def write(self, name: str, data: bytes) -> None:
        """name <- data, atomically: a temporary file in the folder, renamed when complete."""
        self.commit(self.fill(data, name), name)

    def fill(self, data: bytes, name: str) -> str:
        """A temporary file in the folder holding data (meant for `name`) -> its path, for commit.
        On any failure, or an interruption, the temporary is removed."""
        tmp = None
        try:
            fd, tmp = self.temp()
            with open(fd, "wb") as f:
                _write_temp(f, data)
            return tmp
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {self.path / name}: {e.strerror or first_line(e)}") from None
            raise

    def commit(self, tmp: str, name: str) -> None:
        """Rename a complete temporary file to name. A name that is not ours is taken with a hard
        link, which fails rather than replace a file that appeared meanwhile; then the temporary
        goes. The temporary never outlives this call."""
        final = os.path.join(self.path, name)
        key = name.casefold()
        try:
            if key in self._ours:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise OSError(errno.EEXIST, "a file of that name appeared during the run") from None
                except OSError as e:
                    if e.errno not in _NO_LINKS:
                        raise
                    if os.path.lexists(final):
                        raise OSError(errno.EEXIST, "a file of that name appeared during the run") from None
                    os.replace(tmp, final)
                self._ours.add(key)
        except OSError as e:
            raise OutputError(f"cannot write {final}: {e.strerror or first_line(e)}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.written.append(name)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def overlap_stages(device: torch.device) -> bool:
    """Whether reading, the model and writing should overlap: where there are cores to spare (a
    GPU runs the model, or torch uses fewer threads than there are cores), the next batch is
    decoded and the last one's files are written while the model runs (PIL, zlib and OpenCV
    release the GIL). On a CPU that torch already fills, worker threads only stall its GEMMs."""
    return device.type != "cpu" or usable_cores() > torch.get_num_threads()


def worker_threads(device: torch.device) -> int:
    """Threads for decoding and encoding beside the model: the cores the model leaves free (all
    but one with a GPU, which the main thread feeds), at least 1."""
    cores = usable_cores()
    return max(1, cores - 1 if device.type != "cpu" else cores - torch.get_num_threads())


class InlineExecutor(Executor):
    """An executor that runs each task at once in the calling thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - re-raised by result(), as a thread pool would
            future.set_exception(e)
        return future


def read_one(
    path: Path, stem: str, preprocessing, keep_original: bool = True, *, data: bytes | None = None
) -> Item | tuple[Path, str]:
    """Decode and prepare one image (the file at path, or `data` already read from elsewhere, named
    by path) -> its Item, or (path, why it was skipped)."""
    try:
        img = load_image(path) if data is None else load_image(data, name=path.name)
    except ImageError as e:
        return path, str(e)
    prepared = prepare_image(img, preprocessing)
    original, geometry = render.reduced_original(img, prepared, OVERLAY_MAX_PIXELS) if keep_original else (None, None)
    return Item(path, stem, prepared, original, geometry)


def read_batch(
    paths: list[Path],
    stems: list[str],
    preprocessing,
    *,
    keep_original: bool = True,
    budget: int | None = None,
    decoder: Executor | None = None,
    width: int = 1,
) -> tuple[list[Item], list[tuple[Path, str]], int]:
    """Decode and prepare images of one batch, in order, until the originals kept reach `budget`
    bytes (default MAX_HELD_BYTES) -> (items, [(path, why it was skipped)], how many paths were
    used). keep_original=False (evaluate) keeps no original: then every path is used.

    With a decoder (a thread pool: PIL, its resize and OpenCV release the GIL), `width` images are
    decoded at a time and the budget is checked after each such wave, so it can be passed by at
    most one wave."""
    budget = MAX_HELD_BYTES if budget is None else budget
    items, bad, held, used = [], [], 0, 0
    step = max(1, width) if decoder is not None else 1
    for start in range(0, len(paths), step):
        wave = list(zip(paths[start : start + step], stems[start : start + step]))
        if decoder is None:
            got = [read_one(p, s, preprocessing, keep_original) for p, s in wave]
        else:
            got = list(decoder.map(lambda ps: read_one(*ps, preprocessing, keep_original), wave))
        for one in got:
            used += 1
            if isinstance(one, Item):
                items.append(one)
                held += 0 if one.original is None else one.original.nbytes
            else:
                bad.append(one)
        if held >= budget:
            break
    return items, bad, used


class BatchAnalyzer:
    """The model's part of a batch, the same for both engines: the forward pass with every layer's
    maps written into one reused attention block (or the gradient pass), the report's analyses,
    and each image's arrays as copies (an analysis may return a view of the block, which the next
    batch overwrites)."""

    def __init__(self, lm: LoadedModel, settings: report.Settings, batch_size: int) -> None:
        self.lm, self.settings, self.batch_size = lm, settings, batch_size
        # the forward pass keeps gradients for the gradient rollout only; LRP and the class maps
        # make their own passes (report.class_arrays)
        self.gradients = settings.grad_rollout and settings.class_method == "gradient"
        self.block = None

    def __call__(self, pixels: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """pixels (B, 3, H, W) on the host, B <= batch_size -> one dict of arrays per image."""
        lm, n = self.lm, len(pixels)
        if self.block is None and not self.gradients:
            self.block = lm.model.new_attention_block(self.batch_size, device=lm.device, dtype=lm.dtype)
        maps = None if self.block is None else self.block[:, :n]
        target = None
        if self.gradients and self.settings.grad_class is not None:
            target = torch.full((n,), self.settings.grad_class, dtype=torch.long, device=lm.device)
        if lm.device.type == "cuda":  # page-locked host memory: the copy runs asynchronously, queued before the model
            x = pixels.pin_memory().to(lm.device, non_blocking=True).to(lm.dtype)
        else:
            x = pixels.to(lm.device, lm.dtype)
        fwd = run_forward(lm.model, x, gradients=self.gradients, target=target, attention_out=maps)
        arrays = report.analyze_batch(lm, fwd, self.settings) | report.class_arrays(lm, x, fwd, self.settings)
        return [report.split(arrays, b) for b in range(n)]


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    """Whether an image's float arrays are all finite (NaN/Inf weights or preprocessing show here)."""
    return all(bool(np.isfinite(v).all()) for v in arrays.values() if v.dtype.kind == "f")


def top5_entry(arrays: dict[str, np.ndarray], labels: list[str] | None) -> list[dict] | None:
    """summary.json's top-5 of one image (None for a model without a classifier)."""
    if "top5_classes" not in arrays:
        return None
    return [
        {"class": int(k), "label": labels[k] if labels else str(int(k)), "probability": float(p)}
        for k, p in zip(arrays["top5_classes"], arrays["top5_probabilities"])
    ]


def announce(progress: Progress, folder: OutputFolder, *, own: int, renamed: int, total: int, run_names: dict) -> None:
    """The notes every analyze run starts with: earlier outputs left out, renamed images, run
    files that take other names."""
    if own:
        progress.note(f"note: left out {own} images in {folder.path} that an earlier vit-lens run wrote")
    if renamed:
        progress.note(
            f"note: {renamed} of {total} images are written under other names than their own (taken by other "
            f"inputs or files already in {folder.path}); summary.json maps each input to its files"
        )
    for fixed, name in (("model.npz", run_names["model"]), ("mad.png", run_names["mad"])):
        if name != fixed:
            progress.note(
                f"note: {folder.path} already holds a {fixed} that vit-lens did not write: this run writes {name}"
            )


def settings_for_model(settings: report.Settings, c) -> report.Settings:
    """The settings checked against the model (layers, query patch, class: UsageError if out of
    range). A model without a classifier has no class to explain: its reports say so by leaving
    grad_rollout out."""
    try:
        settings.layer_range(c.depth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if settings.query_patch is not None and not all(0 <= v < n for v, n in zip(settings.query_patch, c.grid)):
        raise UsageError(f"--query-patch {settings.query_patch} is outside the {c.grid[0]}x{c.grid[1]} patch grid")
    if settings.grad_class is not None and c.num_classes and not 0 <= settings.grad_class < c.num_classes:
        raise UsageError(f"--grad-class {settings.grad_class} is outside the model's classes 0-{c.num_classes - 1}")
    if settings.contrast_classes is not None and c.num_classes:
        if not all(0 <= v < c.num_classes for v in settings.contrast_classes) or len(settings.contrast_classes) != 2:
            raise UsageError(f"--contrast {settings.contrast_classes} needs two classes in 0-{c.num_classes - 1}")
    if not (settings.grad_rollout and c.num_classes > 0):
        settings = dataclasses.replace(settings, grad_rollout=False, grad_class=None)
    if not c.num_classes:
        settings = dataclasses.replace(settings, class_maps=0, contrast_classes=None)
    return settings


def summary_head(source: str, lm: LoadedModel, settings: report.Settings, device: str) -> dict:
    """The keys of summary.json that describe the run's model and settings (both engines)."""
    c = lm.config
    return {
        "model": {
            "source": source,
            "name": lm.name,
            "family": lm.family,
            "format": lm.format,
            "patch_size": c.patch_size,
            "grid": list(c.grid),
            "prefix_tokens": list(c.prefix_names),
            "num_prefix_tokens": c.num_prefix_tokens,
            "layers": c.depth,
            "heads": c.num_heads,
            "config": c.to_dict(),
        },
        "device": device,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "precision": lm.precision,
        "preprocessing": lm.preprocessing.to_dict(),
        "settings": settings.to_dict(),
        "schema_version": report.SCHEMA_VERSION,
        "mean_attention_distance_convention": "as_is (prefix mass counts as distance 0), pixels",
    }


def write_outputs(
    folder: OutputFolder,
    items: list[Item],
    reports: list[report.Report],
    patch_size: int,
    encoder: Executor | None = None,
) -> None:
    """Per image: its report (<stem>.npz) and the rollout overlay on the original (<stem>_rollout.png).
    With an encoder (a thread pool: zlib and OpenCV release the GIL) the files are encoded in
    parallel; they are written in order either way, so the run's file list does not depend on it."""

    def encode(it: Item, rep: report.Report) -> tuple[bytes, bytes]:
        png = render.overlay_on_original(it.original, it.geometry, rep.arrays["rollout"], patch_size=patch_size)
        return rep.npz_bytes(), render.to_png(png)

    encoded = map(encode, items, reports) if encoder is None else encoder.map(encode, items, reports)
    for it, (npz, png) in zip(items, encoded, strict=True):
        folder.write(f"{it.stem}.npz", npz)
        folder.write(f"{it.stem}_rollout.png", png)


def settings_from_args(args: argparse.Namespace) -> report.Settings:
    """Report settings: the --settings file, then the flags."""
    d: dict = {}
    if args.settings is not None:
        try:
            loaded = json.loads(args.settings.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read settings {args.settings}: {first_line(e)}") from None
        d = loaded.get("settings", loaded) if isinstance(loaded, dict) else None
        if not isinstance(d, dict):
            raise UsageError(f"{args.settings}: expected a JSON object of settings")
    flags = {
        "rollout_fusion": args.rollout_fusion,
        "rollout_discard": args.rollout_discard,
        "rollout_readout": args.rollout_readout,
        "drop_prefix": args.drop_prefix,
        "grad_class": args.grad_class,
        "class_method": args.class_method,
        "class_maps": args.class_maps,
        "contrast_classes": args.contrast,
        "mask_tau": args.mask_tau,
        "high_norm_factor": args.high_norm_factor,
        "budget_queries": args.budget_queries,
    }
    d |= {k: v for k, v in flags.items() if v is not None}
    if args.grad_rollout or args.grad_class is not None:
        d["grad_rollout"] = True
    if args.save_attentions:
        d["save_attentions"] = True
    try:
        if args.rollout_layers is not None:
            first, _, last = args.rollout_layers.partition("-")
            d["rollout_first_layer"], d["rollout_last_layer"] = int(first), int(last)
        if args.query_patch is not None:
            row, _, col = args.query_patch.partition(",")
            d["query_patch"] = (int(row), int(col))
        return report.Settings.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad settings: {first_line(e)}") from None


def model_arrays(lm: LoadedModel) -> tuple[dict[str, np.ndarray], list[str]]:
    """model.npz's arrays, and a note for each one left out: a checkpoint with non-finite weights
    has no filter principal components (the SVD fails on NaN), and no analysis of the model may
    end the run after its images were written."""
    c = lm.config
    notes: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        pos = lm.model.pos_embed.detach().float().cpu()[0, c.pos_embed_prefix :]
        arrays["position_similarity"] = A.position_similarity(pos).numpy()
    except (RuntimeError, ValueError, ArithmeticError) as e:
        notes.append(f"position_similarity left out: {first_line(e)}")
    arrays |= {
        "grid": np.array(c.grid),
        "pixel_mean": np.array(lm.preprocessing.mean),
        "pixel_std": np.array(lm.preprocessing.std),
    }
    if c.linear_patch_embed:  # a conv stem has no per-patch linear filters to decompose
        weight = lm.model.patch_embed.proj.weight.detach().float().cpu()
        if not bool(torch.isfinite(weight).all()):
            notes.append("filter principal components left out: the patch-embedding weights are not finite")
        else:
            try:
                pca = A.filter_pca(weight)
                arrays |= {
                    "filter_components": pca.components.numpy(),
                    "filter_explained_variance": pca.explained_variance_ratio.numpy(),
                    "filter_mean": pca.mean.numpy(),
                }
            except (RuntimeError, ValueError, ArithmeticError) as e:
                notes.append(f"filter principal components left out: {first_line(e)}")
    return arrays, notes


class Progress:
    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.open = False  # the bar's line is on screen without its newline

    def step(self, n: int) -> None:
        self.done += n
        rate = self.done / max(1e-9, time.monotonic() - self.start)
        width = 30
        fill = int(width * self.done / self.total)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} images, {rate:.1f} img/s")
        self.open = True
        if self.done >= self.total:
            self.end_line()
        self.stream.flush()

    def end_line(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False

    def note(self, text: str) -> None:
        """A line of its own (a skipped file, a warning), below the bar."""
        self.end_line()
        self.stream.write(text + "\n")
        self.stream.flush()


def check_memory(lm: LoadedModel, batch: int, *, gradients: bool, per_image_bytes: int = 0) -> None:
    """Refuse a run whose batch would not fit in memory (UsageError, exit 2), naming the largest
    --batch-size that fits. per_image_bytes: what each image of a batch holds beside the model's
    work (the overlay's original); at most MAX_HELD_BYTES of them per batch, STAGES_IN_FLIGHT
    batches at once."""

    def held(b: int) -> int:  # host memory: not counted against a GPU's
        if lm.device.type != "cpu":
            return 0
        return STAGES_IN_FLIGHT * min(b * per_image_bytes, MAX_HELD_BYTES + per_image_bytes)

    def shortfall(b: int) -> str | None:
        return memory_shortfall(lm.config, lm.dtype, lm.device, batch=b, gradients=gradients, extra_bytes=held(b))

    why = shortfall(batch)
    if why is None:
        return
    lo, hi = 0, batch - 1  # the largest batch in 1..batch-1 that fits, 0 if none
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shortfall(mid) is None:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        raise UsageError(f"{why}; --batch-size {lo} would fit")
    raise UsageError(f"{why}; not even one image at a time fits (a smaller --image-size or --dtype bf16 needs less)")


def without_earlier_outputs(files: list[Path], folder: OutputFolder) -> tuple[list[Path], int]:
    """The inputs less the files an earlier vit-lens run wrote into this output folder (its
    _rollout.png and mad.png, found through its summary.json): with --out the input folder, a
    second run would otherwise analyse the first one's overlays. -> (files, how many were left out)."""
    if not folder.earlier:
        return files, 0
    try:
        here = folder.path.resolve()
    except OSError:
        return files, 0
    earlier = set(folder.earlier)
    kept = [f for f in files if not (f.name in earlier and f.parent.resolve() == here)]
    return kept, len(files) - len(kept)


def run_analyze(args: argparse.Namespace) -> int:
    if getattr(args, "engine", "local") == "ray":  # imports Ray only here (viz_app/ray_engine.py)
        from viz_app import ray_engine

        return ray_engine.run_analyze(args)
    if getattr(args, "address", None) is not None:
        raise UsageError("--address needs --engine ray")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    settings = settings_from_args(args)
    files, unreadable = collect_inputs(args.inputs)
    with OutputFolder(args.out) as folder:  # created, locked and checked writable before the model loads
        return _analyze(args, settings, files, unreadable, folder)


def _analyze(
    args: argparse.Namespace,
    settings: report.Settings,
    files: list[Path],
    unreadable: list[tuple[Path, str]],
    folder: OutputFolder,
) -> int:
    run_names = {"model": folder.reserve("model.npz"), "mad": folder.reserve("mad.png")}
    files, own = without_earlier_outputs(files, folder)
    if not files:
        raise UsageError(f"no images found in the given inputs (only the {own} files an earlier vit-lens run wrote)")
    stems = free_stems([f.stem for f in files], IMAGE_OUTPUTS, folder.taken)
    try:
        lm = load_checkpoint(args.model, device=args.device, dtype=args.dtype, image_size=args.image_size)
    except (ViTLensError, ValueError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    start = time.monotonic()
    c = lm.config
    settings = settings_for_model(settings, c)
    gradients = settings.grad_rollout or bool(settings.class_maps) or settings.contrast_classes is not None
    batch_size = min(args.batch_size, len(files))
    check_memory(lm, batch_size, gradients=gradients, per_image_bytes=3 * OVERLAY_MAX_PIXELS)
    model_meta = report.model_meta(lm, str(args.model))
    progress = Progress(len(files))
    skipped: list[dict] = []
    for path, reason in unreadable:
        progress.note(f"skipped {path}: {reason}")
        skipped.append({"file": str(path), "reason": reason})
    renamed = sum(s != f.stem for s, f in zip(stems, files))
    announce(progress, folder, own=own, renamed=renamed, total=len(files), run_names=run_names)
    results: dict[str, dict] = {}
    mad_all: list[np.ndarray] = []  # finite ones
    non_finite: list[str] = []
    written_run: dict[str, str | None] = {"model": None, "mad": None}
    notes: list[str] = []
    mad_mean = None
    failure: str | None = None
    interrupted = False
    analyzer = BatchAnalyzer(lm, settings, batch_size)
    overlap = overlap_stages(lm.device)
    pool = (lambda: ThreadPoolExecutor(1)) if overlap else InlineExecutor
    # where the model leaves cores free (a GPU): decoding and encoding spread over them
    width = worker_threads(lm.device) if overlap else 1
    try:
        with pool() as reader, pool() as writer, ThreadPoolExecutor(width) as workers:
            coder = workers if width > 1 else None

            def read(i: int) -> Future:
                j = i + args.batch_size
                return reader.submit(read_batch, files[i:j], stems[i:j], lm.preprocessing, decoder=coder, width=width)

            pos, next_read, last_write = 0, read(0), None
            while next_read is not None:
                items, bad, used = next_read.result()
                pos += used
                next_read = read(pos) if pos < len(files) else None
                for path, reason in bad:
                    progress.note(f"skipped {path}: {reason}")
                    skipped.append({"file": str(path), "reason": reason})
                if items:
                    per_image = analyzer(torch.stack([it.prepared.pixels for it in items]))
                    reports = []
                    for it, one in zip(items, per_image):
                        one["model_view"] = it.prepared.view
                        image = {"name": it.path.name, "original_size": list(it.prepared.original_size)}
                        reports.append(report.Report(one, settings, model_meta, image))
                        if all_finite(one):
                            mad_all.append(one["mean_attention_distance"])
                        else:
                            non_finite.append(it.stem)
                        entry = {"file": str(it.path), "npz": f"{it.stem}.npz", "rollout_png": f"{it.stem}_rollout.png"}
                        top5 = top5_entry(one, lm.labels)
                        if top5 is not None:
                            entry["top5"] = top5
                        results[it.stem] = entry
                    if last_write is not None:
                        last_write.result()
                    last_write = writer.submit(write_outputs, folder, items, reports, c.patch_size, coder)
                progress.step(used)
            if last_write is not None:
                last_write.result()
        arrays, notes = model_arrays(lm)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        folder.write(run_names["model"], buf.getvalue())
        written_run["model"] = run_names["model"]
        mad_mean = np.mean(mad_all, axis=0) if mad_all else None
        if mad_mean is not None:
            png = render.mad_scatter_png(mad_mean, title=f"{len(mad_all)} images")
            folder.write(run_names["mad"], render.to_png(png))
            written_run["mad"] = run_names["mad"]
        elif results:
            notes.append("mad.png left out: no image gave finite mean attention distances")
    except OutputError as e:
        failure = str(e)
    except KeyboardInterrupt:
        interrupted = True
    progress.end_line()
    written = set(folder.written)
    images = {s: e for s, e in results.items() if e["npz"] in written and e["rollout_png"] in written}
    done = {e["file"] for e in images.values()} | {s["file"] for s in skipped}
    status = 130 if interrupted else 2 if failure else 1 if skipped else 0
    summary = summary_head(str(args.model), lm, settings, str(lm.device)) | {
        "images": images,
        "skipped": skipped,
        "mean_attention_distance": None if mad_mean is None else mad_mean.tolist(),
        "wall_time_s": round(time.monotonic() - start, 3),
        "written_by": f"{PROG} analyze",
        "complete": status in (0, 1),
        "stopped": "interrupted" if interrupted else failure,
        "not_written": [str(f) for f in files if str(f) not in done],
        "files": written_run,
        "written": list(folder.written),
        "files_from_earlier_runs": sorted(set(folder.earlier) - written),
        "non_finite": {
            "images": non_finite,
            "note": "images with NaN or Inf in their arrays; left out of the mean attention distance",
        },
        "notes": notes,
        "exit_status": status,
    }
    summary_error = None
    try:
        folder.write(SUMMARY, report.json_bytes(summary))
    except OutputError as e:
        summary_error = str(e)
    if non_finite:
        progress.note(
            f"warning: {len(non_finite)} of {len(results)} images gave non-finite values (NaN or Inf): the model's "
            "weights or its preprocessing produce them; summary.json lists them and writes such numbers as null"
        )
    if interrupted:
        raise KeyboardInterrupt
    if failure or summary_error:
        tail = (
            f"summary.json could not be written either ({summary_error})"
            if failure and summary_error
            else ("summary.json lists what was written")
        )
        what = failure or summary_error
        raise OutputError(f"{what}; stopped after {len(images)} of {len(files)} images; {tail}")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "analyze":
            return run_analyze(args)
        raise UsageError(f"unknown command {args.command!r}")
    except (UsageError, OutputError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
