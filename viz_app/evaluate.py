"""`vit-lens evaluate`: which map to believe, over a folder of images or generated demo scenes.

vit-lens evaluate --model SOURCE --out DIR [IMAGES_OR_DIRS...] [--scenes N] [--modes drop,pixels]
    [--steps 10] [--randomization cascade|independent|none] [--class C] [--head L,H]
    [--batch-size B] [--device auto] [--settings FILE] [rollout flags as in `analyze`]
    [--engine local|ray] [--address RAY_ADDRESS]

Per batch of images: one forward pass with gradients (target: each image's top-1, or --class),
the maps of probes.attribution_maps (rollout with the settings, gradient rollout, last layer's
read-out attention mean over heads, one head with --head), their perturbation curves in every
removal mode and both directions next to the centre prior and a random order
(probes.faithfulness_curves), and the model randomization of the whole batch
(probes.randomization). On generated scenes (--scenes N) the pointing game (loose and strict) and
the energy of every map against the scene's target mask (viz_app.demo.evaluate) as well. Each
batch's rows and numbers are one Part (evaluate_batch); an engine supplies the parts in input
order: LocalEngine here, ray_evaluate.RayEngine with --engine ray.

Outputs in DIR, each written under a temporary name and renamed when complete:
faithfulness.csv, randomization.csv, pointing.csv (scenes), summary.json, faithfulness.png,
randomization.png. The output folder is handled as `analyze` handles it (viz_app/cli.py): locked
for the run, checked writable before the model loads, and a file already there that no vit-lens
run wrote is never replaced (a table or plot then takes the first free `<name>_<k>`, recorded in
summary.json's "files" and "plots"). Exit codes as `analyze`: 0 every input evaluated; 1 some
inputs were skipped (each named on stderr); 2 bad arguments, a model that cannot be loaded, a
batch that does not fit in memory, or an output folder that cannot take the outputs (one line on
stderr; after a write failed part-way, summary.json says "complete": false where it can still be
written); 130 interrupted (a table is only renamed into place whole, so none is left half-written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from model import ViTLensError, load_checkpoint
from model.device import PRECISIONS
from viz_app import cli, probes, render, report
from viz_app.analysis.faithfulness import DIRECTIONS, centre_prior, mean_ci
from viz_app.demo.evaluate import TEST_SEED, energy, patch_masks, pointing, pointing_strict
from viz_app.demo.scenes import CLASSES, make_batch
from viz_app.pipeline import run_forward

PROG = f"{cli.PROG} evaluate"
SCENE_CHUNK = 100  # scenes are generated 100 at a time from SeedSequence([seed, first index]), as demo-evaluate does
KINDS = ("cascade", "independent", "none")
CSV_NAMES = {"faithfulness": "faithfulness.csv", "randomization": "randomization.csv", "pointing": "pointing.csv"}
PROTOCOL = {
    "removal": "patches removed in the map's order, round(i * N / steps) after step i (step 0: none removed, "
    "last step: all, or all but one for models that pool patches); ties in row-major order",
    "deletion": "most relevant first (RISE deletion; Chefer et al. 2021 positive perturbation): lower AUC = more faithful",
    "insertion": "least relevant first (Chefer et al. 2021 negative perturbation; RISE insertion read from the other "
    "end): higher AUC = more faithful",
    "auc": "trapezoid rule over the removed share in [0, 1] (RISE's normalized AUC), in the score's units",
    "auc_probability": "AUC of the target class's softmax probability (cosine similarity of the pooled features "
    "to the unperturbed image's for a model without a classifier)",
    "auc_top1": "AUC of whether the top-1 class is still the unperturbed image's top-1",
    "difference_vs_random": "per image, the map's AUC minus the random order's AUC on the same image, then averaged: "
    "negative is better for deletion, positive for insertion",
    "ci": "95 % normal-approximation interval of the mean over images (analysis.mean_ci)",
    "random": "the mean curve of 3 seeded random permutations per image",
    "centre_prior": "the patches' closeness to the grid's centre",
}
# Okabe-Ito colours (RGB), told apart with colour-vision deficiencies; baselines dashed
PALETTE = [(230, 159, 0), (0, 114, 178), (0, 158, 115), (213, 94, 0), (86, 180, 233), (240, 228, 66)]
BASELINE_COLOURS = {probes.CENTRE: (204, 121, 167), probes.RANDOM: (110, 110, 110)}

log = logging.getLogger("viz_app")


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    p = cli._Parser(prog=PROG, description="faithfulness curves and randomization checks of every map, over a dataset")
    p.add_argument("--model", required=True, help="demo, a curated key, a checkpoint path or a hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("inputs", nargs="*", type=Path, help="images or folders of images (or --scenes)")
    p.add_argument(
        "--scenes",
        type=int,
        default=None,
        metavar="N",
        help=f"N generated shape scenes with target masks instead of images (seed --seed, default {TEST_SEED})",
    )
    p.add_argument("--seed", type=int, default=TEST_SEED, help="seed of the scenes and of the random baselines")
    p.add_argument(
        "--modes", default="drop,pixels", help=f"removal modes, comma-separated: {', '.join(probes.REMOVAL_MODES)}"
    )
    p.add_argument("--steps", type=int, default=10, help="removal steps of each curve")
    p.add_argument("--randomization", choices=KINDS, default="cascade", help="model randomization (none: skip)")
    p.add_argument(
        "--class", dest="target_class", type=int, default=None, metavar="C", help="target class (default: each top-1)"
    )
    p.add_argument("--head", default=None, metavar="LAYER,HEAD", help="also this head's read-out map (from 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="fp32", choices=list(PRECISIONS), help="tf32: CUDA only (docs/PRECISION.md)")
    p.add_argument("--image-size", type=int, default=None, help="run at another resolution (resamples positions)")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="a JSON file of report settings (its rollout settings and grad_class are used); the flags override it",
    )
    p.add_argument("--rollout-fusion", choices=report.FUSIONS, default=None)
    p.add_argument("--rollout-discard", type=float, default=None, help="share in [0, 1) zeroed per layer")
    p.add_argument("--rollout-readout", choices=report.READOUTS, default=None)
    p.add_argument("--rollout-layers", default=None, metavar="FIRST-LAST", help="1-based, inclusive (e.g. 4-12)")
    cli.add_engine_arguments(p)
    # what cli.settings_from_args reads and evaluate has no flag for
    p.set_defaults(grad_rollout=False, grad_class=None, save_attentions=False, query_patch=None, drop_prefix=None)
    p.set_defaults(**dict.fromkeys(("class_method", "class_maps", "contrast", "mask_tau", "high_norm_factor"), None))
    p.set_defaults(budget_queries=None)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.UsageError("--batch-size must be at least 1")
    if args.steps < 1:
        raise cli.UsageError("--steps must be at least 1")
    if args.seed < 0:
        raise cli.UsageError("--seed must be at least 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in probes.REMOVAL_MODES]
    if not modes or unknown:
        raise cli.UsageError(f"--modes takes a comma-separated subset of {', '.join(probes.REMOVAL_MODES)}")
    args.modes = list(dict.fromkeys(modes))
    if args.scenes is not None:
        if args.scenes < 1:
            raise cli.UsageError("--scenes must be at least 1")
        if args.inputs:
            raise cli.UsageError("give images or --scenes, not both")
    elif not args.inputs:
        raise cli.UsageError("give images or folders of images, or --scenes N")
    if args.head is not None:
        try:
            layer, _, h = args.head.partition(",")
            args.head = (int(layer), int(h))
        except ValueError:
            raise cli.UsageError(f"--head takes LAYER,HEAD (counted from 1), got {args.head!r}") from None
    return args


# ---------------------------------------------------------------------------------------------
# Inputs: batches of (names, pixels) and, for scenes, their target masks


@dataclass
class Batch:
    names: list[str]
    pixels: torch.Tensor  # (B, 3, H, W) normalized, on the CPU
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    labels: np.ndarray | None = None  # scenes: (B,) true classes
    masks: np.ndarray | None = None  # scenes: (B, S, S) bool target masks in model-input pixels
    size: int = 0  # inputs this batch accounts for (evaluated + skipped)
    ids: list[int] = field(default_factory=list)  # each image's id: its position among the inputs (or scenes)


def scene_pixels(images: np.ndarray, preprocessing) -> torch.Tensor:
    """(B, S, S, 3) uint8 scenes at the model's input size -> (B, 3, S, S) normalized by the
    model's own mean and std (no resize or crop: the masks stay aligned with the patches)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def scene_batches(n: int, seed: int, size: int, batch_size: int, preprocessing) -> Iterator[Batch]:
    """n scenes in batches; the scenes are those of `demo-evaluate --scenes n --seed seed` (made
    SCENE_CHUNK at a time), whatever the batch size. One chunk is held at a time."""
    pending: list[tuple[int, np.ndarray, int, np.ndarray]] = []
    for start in range(0, n, SCENE_CHUNK):
        images, labels, masks = make_batch(
            np.random.SeedSequence([seed, start]), min(SCENE_CHUNK, n - start), size=size
        )
        pending += [(start + i, images[i], int(labels[i]), masks[i]) for i in range(len(images))]
        while len(pending) >= batch_size or (pending and start + SCENE_CHUNK >= n):
            part, pending = pending[:batch_size], pending[batch_size:]
            yield Batch(
                names=[f"scene_{i:05d}" for i, *_ in part],
                pixels=scene_pixels(np.stack([p[1] for p in part]), preprocessing),
                labels=np.array([p[2] for p in part]),
                masks=np.stack([p[3] for p in part]),
                size=len(part),
                ids=[p[0] for p in part],
            )


def image_batches(files: list[Path], batch_size: int, preprocessing, executor) -> Iterator[Batch]:
    """Image files in batches, decoded by cli.read_batch (no original kept: evaluate draws no
    overlay), the next batch read while this one runs. Images of the same name are told apart as
    analyze's outputs are (cli.free_stems: x, x_1, ...); an image's id is its position in `files`."""
    stems = cli.free_stems([f.stem for f in files], ("",), set())
    index = {stem: i for i, stem in enumerate(stems)}
    chunks = [(files[i : i + batch_size], stems[i : i + batch_size]) for i in range(0, len(files), batch_size)]

    def read(k: int):
        return executor.submit(cli.read_batch, *chunks[k], preprocessing, keep_original=False)

    nxt = read(0)
    for k in range(len(chunks)):
        items, bad, _ = nxt.result()
        if k + 1 < len(chunks):
            nxt = read(k + 1)
        pixels = torch.stack([it.prepared.pixels for it in items]) if items else torch.zeros(0)
        yield Batch(
            [it.stem for it in items],
            pixels,
            skipped=bad,
            size=len(chunks[k][0]),
            ids=[index[it.stem] for it in items],
        )


# ---------------------------------------------------------------------------------------------
# Outputs


class AtomicCsv:
    """A CSV written row by row under a temporary name in the output folder and renamed by
    commit(): a file under its final name is always complete. close() without commit() removes
    it. A failing write (a full disk) is cli.OutputError."""

    def __init__(self, folder: cli.OutputFolder, name: str, header: list[str]) -> None:
        self.folder, self.name, self.tmp = folder, name, None
        try:
            fd, self.tmp = folder.temp()
            self.file = open(fd, "w", newline="", encoding="utf-8")
            self.writer = csv.writer(self.file)
            self.writer.writerow(header)
        except OSError as e:
            self.close()
            raise self._error(e) from None
        self.rows = 0

    def _error(self, e: OSError) -> cli.OutputError:
        return cli.OutputError(f"cannot write {self.folder.path / self.name}: {e.strerror or e}")

    def write(self, rows: list[list]) -> None:
        try:
            self.writer.writerows([[_cell(v) for v in r] for r in rows])
        except OSError as e:
            raise self._error(e) from None
        self.rows += len(rows)

    def commit(self) -> None:
        try:
            self.file.close()
        except OSError as e:
            raise self._error(e) from None
        tmp, self.tmp = self.tmp, None
        self.folder.commit(tmp, self.name)

    def close(self) -> None:
        file = getattr(self, "file", None)
        if file is not None and not file.closed:
            with contextlib.suppress(OSError):
                file.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else repr(float(v))
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    return str(v)


def ci(values) -> dict:
    """mean_ci as a JSON object: mean, ci95 [lower, upper], n (the finite values, which are the
    ones mean_ci uses)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    m, lo, hi = mean_ci(v)
    return {"mean": _num(m), "ci95": [_num(lo), _num(hi)], "n": int(np.isfinite(v).sum())}


def _num(x: float) -> float | None:
    """A number for strict JSON: None where it is missing, NaN or infinite."""
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------------------------
# The evaluation of one batch, and the running tally


@dataclass
class Tally:
    """Per-image numbers of every batch so far (scalars and short curves, never images)."""

    maps: list[str] = field(default_factory=list)  # faithfulness maps, baselines last
    auc: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)  # (mode, direction, map)
    auc_top1: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    vs_random: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    curves: dict[tuple[str, str, str], list[np.ndarray]] = field(default_factory=dict)
    fractions: np.ndarray | None = None
    score_name: str = ""
    forwards: dict[str, int] = field(default_factory=dict)  # mode -> perturbed inputs run
    rand_labels: tuple[str, ...] = ()
    spearman: dict[str, list[np.ndarray]] = field(default_factory=dict)  # map -> (S,) per image
    ssim: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pointing: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # map -> score -> values
    correct: list[bool] = field(default_factory=list)
    images: int = 0
    non_finite: list[str] = field(default_factory=list)  # images whose forward gave NaN or Inf

    def merge(self, part: Tally) -> None:
        """Add one batch's tally (evaluate_batch's) to this one; merged in input order, the lists
        keep the images in input order."""
        if not self.maps:
            self.maps = list(part.maps)
        for name in ("auc", "auc_top1", "vs_random", "curves", "spearman", "ssim"):
            mine = getattr(self, name)
            for key, values in getattr(part, name).items():
                mine.setdefault(key, []).extend(values)
        if part.fractions is not None:
            self.fractions, self.score_name = part.fractions, part.score_name
        for mode, n in part.forwards.items():
            self.forwards[mode] = self.forwards.get(mode, 0) + n
        self.rand_labels = part.rand_labels or self.rand_labels
        for name, scores in part.pointing.items():
            mine = self.pointing.setdefault(name, {})
            for key, values in scores.items():
                mine.setdefault(key, []).extend(values)
        self.correct += part.correct
        self.images += part.images
        self.non_finite += part.non_finite


@dataclass
class Part:
    """What one batch adds to a run: the rows of each table (CSV_NAMES' keys) and its tally. The
    same for both engines: the local one computes it in-process, the Ray one in a model actor."""

    rows: dict[str, list[list]]
    tally: Tally
    size: int = 0  # inputs the batch accounts for (evaluated + skipped)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why)


class _Progress(cli.Progress):
    """analyze's progress bar, also moved within a batch (curves and randomization take a while)."""

    def _draw(self, done: float, stage: str) -> None:
        rate = done / max(1e-9, time.monotonic() - self.start)
        fill = int(30 * done / self.total)
        line = f"[{'#' * fill}{'.' * (30 - fill)}] {done:.0f}/{self.total} images, {rate:.2f} img/s"
        self.stream.write(f"\r{line}{', ' + stage if stage else '':<32}")
        self.open = True
        self.stream.flush()

    def within(self, batch: int, share: float, stage: str) -> None:
        self._draw(self.done + batch * min(1.0, share), stage)

    def step(self, n: int) -> None:
        self.done += n
        self._draw(self.done, "")
        if self.done >= self.total:
            self.end_line()


def with_gradients(lm) -> bool:
    """Whether evaluate's forward passes keep gradients (the gradient rollout): a model with a classifier."""
    return lm.config.num_classes > 0 and lm.model.head is not None


def evaluate_batch(lm, batch: Batch, args: argparse.Namespace, rollout_kw: dict, progress) -> Part:
    """Every number of one batch: its table rows and per-image values (Part). Each image's random
    orders and baselines are seeded by its id (Batch.ids), so they do not depend on the batching.
    A batch of unreadable images only (no names) gives no rows, only its skipped inputs."""
    skipped = [(str(p), why) for p, why in batch.skipped]
    if not batch.names:
        return Part({}, Tally(), size=batch.size, skipped=skipped)
    c = lm.config
    tally, out = Tally(), {}
    B = len(batch.names)
    pixels = batch.pixels.to(lm.device, lm.dtype)
    gradients = with_gradients(lm)
    target = None
    if gradients and args.target_class is not None:
        target = torch.full((B,), args.target_class, dtype=torch.long)
    stages = len(args.modes) + (args.randomization != "none")
    progress.within(B, 0, "maps")
    fwd = run_forward(lm.model, pixels, gradients=gradients, target=target)
    finite = torch.isfinite(fwd.features).flatten(1).all(1) & torch.isfinite(fwd.attentions).flatten(1).all(1)
    if fwd.logits is not None:
        finite &= torch.isfinite(fwd.logits).all(1)
    tally.non_finite += [n for n, ok in zip(batch.names, finite.tolist()) if not ok]
    maps = probes.attribution_maps(lm, fwd, rollout_kw, head=args.head)
    target_np = None if fwd.target is None else fwd.target.cpu().numpy()
    rows = []
    for i, mode in enumerate(args.modes):
        curves = probes.faithfulness_curves(
            lm.model,
            pixels,
            maps,
            mode=mode,
            steps=args.steps,
            target=target_np,
            seed=args.seed + 1,  # streams apart from the scenes' SeedSequence([seed, first])
            image_ids=list(batch.ids),  # per image: the same whatever the batch size
            progress=lambda f, i=i, mode=mode: progress.within(B, (i + f) / stages, f"curves ({mode})"),
        )
        tally.fractions, tally.score_name = curves.fractions, curves.score_name
        tally.forwards[mode] = tally.forwards.get(mode, 0) + curves.forwards
        if not tally.maps:
            tally.maps = list(curves.maps)
        for direction in DIRECTIONS:
            rnd = curves.auc((probes.RANDOM, direction))
            for name in curves.maps:
                key = (name, direction)
                auc = curves.auc(key)
                top1 = curves.auc_agree(key)
                k3 = (mode, direction, name)
                tally.auc.setdefault(k3, []).extend(auc.tolist())
                tally.vs_random.setdefault(k3, []).extend((auc - rnd).tolist())
                tally.curves.setdefault(k3, []).extend(curves.scores[key])
                if top1 is not None:
                    tally.auc_top1.setdefault(k3, []).extend(top1.tolist())
                for b in range(B):
                    rows.append(
                        [
                            batch.names[b],
                            name,
                            mode,
                            direction,
                            int(curves.target[b]),
                            auc[b],
                            None if top1 is None else top1[b],
                            *curves.scores[key][b],
                        ]
                    )
    out["faithfulness"] = rows
    if args.randomization != "none":
        r = probes.randomization(
            lm.model,
            pixels,
            lambda f: probes.attribution_maps(lm, f, rollout_kw, head=args.head),
            kind=args.randomization,
            target=fwd.target,
            gradients=gradients,
            seed=0,
            original=fwd,
            progress=lambda f: progress.within(
                B, (len(args.modes) + f) / stages, f"randomization ({args.randomization})"
            ),
        )
        tally.rand_labels = r.labels
        rows = []
        for name in r.spearman:
            tally.spearman.setdefault(name, []).extend(r.spearman[name].T)
            tally.ssim.setdefault(name, []).extend(r.ssim[name].T)
            for b in range(B):
                for s, lab in enumerate(r.labels):
                    rows.append([batch.names[b], name, r.kind, lab, s, r.spearman[name][s, b], r.ssim[name][s, b]])
        out["randomization"] = rows
    if batch.masks is not None:
        pmask = patch_masks(batch.masks, c.patch_size)
        scored = dict(maps)
        scored[probes.CENTRE] = np.broadcast_to(centre_prior(c.grid), (B, *c.grid))
        scored[probes.RANDOM] = np.stack(
            [np.random.default_rng([args.seed, batch.ids[b], 1]).random(c.grid) for b in range(B)]
        )
        rows = []
        for name, m in scored.items():
            hit = pointing(m, pmask)
            strict = pointing_strict(m, batch.masks, c.patch_size)
            en = energy(m, pmask)
            got = tally.pointing.setdefault(name, {"pointing": [], "pointing_strict": [], "energy": []})
            got["pointing"] += hit.astype(float).tolist()
            got["pointing_strict"] += strict.astype(float).tolist()
            got["energy"] += en.tolist()
            for b in range(B):
                pred = None if fwd.logits is None else int(fwd.logits[b].argmax())
                rows.append([batch.names[b], name, int(batch.labels[b]), pred, hit[b], strict[b], en[b]])
        out["pointing"] = rows
        if fwd.logits is not None and tuple(lm.labels or ()) == CLASSES:  # the scenes' labels are the demo's
            tally.correct += (fwd.logits.argmax(-1).cpu().numpy() == batch.labels).tolist()
    tally.images += B
    return Part(out, tally, size=batch.size, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Summary and plots


def summarize(tally: Tally) -> dict:
    """Means with 95 % intervals of everything in the tally (see PROTOCOL)."""
    faith: dict = {}
    for (mode, direction, name), aucs in tally.auc.items():
        vs = tally.vs_random[(mode, direction, name)]
        entry = {
            "auc_probability": ci(aucs),
            "auc_top1": ci(tally.auc_top1[(mode, direction, name)])
            if (mode, direction, name) in tally.auc_top1
            else None,
            "mean_curve": np.mean(tally.curves[(mode, direction, name)], axis=0).tolist(),
        }
        if name != probes.RANDOM:
            d = ci(vs)
            lo, hi = d["ci95"]
            better = None
            if lo is not None and hi is not None:
                better = hi < 0 if direction == "deletion" else lo > 0
            entry["difference_vs_random"] = d | {"better_than_random": better}
        faith.setdefault(mode, {}).setdefault(direction, {})[name] = entry
    out = {"faithfulness": faith}
    if tally.rand_labels:
        out["randomization"] = {
            "steps": list(tally.rand_labels),
            "maps": {
                name: {
                    "spearman": [ci(v) for v in np.stack(tally.spearman[name]).T],
                    "ssim": [ci(v) for v in np.stack(tally.ssim[name]).T],
                }
                for name in tally.spearman
            },
        }
    if tally.pointing:
        out["pointing"] = {name: {k: ci(v) for k, v in scores.items()} for name, scores in tally.pointing.items()}
    if tally.correct:
        out["top1_accuracy"] = ci(np.asarray(tally.correct, dtype=float))
    elif tally.pointing:
        out["top1_accuracy_note"] = "left out: the model's classes are not the demo scenes' shapes " + ", ".join(
            CLASSES
        )
    return out


def _colour(name: str, order: list[str]) -> tuple[int, int, int]:
    if name in BASELINE_COLOURS:
        return BASELINE_COLOURS[name]
    own = [m for m in order if m not in BASELINE_COLOURS]
    return PALETTE[own.index(name) % len(PALETTE)] if name in own else PALETTE[-1]


def _polyline(img, pts, colour, thick, dashed) -> None:
    """A line through pts; a point that is not finite (a NaN score, e.g. from non-finite weights)
    breaks the line there instead of failing the plot."""
    runs: list[list[tuple[int, int]]] = [[]]
    for p in pts:
        if np.isfinite(p).all():
            runs[-1].append(tuple(int(round(float(v))) for v in p))
        elif runs[-1]:
            runs.append([])
    for run in runs:
        if run:
            _segments(img, run, colour, thick, dashed)


def _segments(img, pts, colour, thick, dashed) -> None:
    if not dashed:
        cv2.polylines(img, [np.array(pts, np.int32)], False, colour, thick, cv2.LINE_AA)
        return
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        n = max(1, int(np.hypot(x1 - x0, y1 - y0) // 12))
        for k in range(n):
            a, b = k / n, (k + 0.55) / n
            p = (int(x0 + a * (x1 - x0)), int(y0 + a * (y1 - y0)))
            q = (int(x0 + b * (x1 - x0)), int(y0 + b * (y1 - y0)))
            cv2.line(img, p, q, colour, thick, cv2.LINE_AA)


def _band(img, xs, lo, hi, colour, alpha=0.18) -> None:
    poly = np.array([*zip(xs, hi), *zip(xs[::-1], lo[::-1])], np.float64)
    poly = poly[np.isfinite(poly).all(1)]
    if len(poly) < 3:
        return
    layer = img.copy()
    cv2.fillPoly(layer, [poly.round().astype(np.int32)], colour, cv2.LINE_AA)
    cv2.addWeighted(layer, alpha, img, 1 - alpha, 0, dst=img)


def _vertical_text(text: str, fs: float) -> np.ndarray:
    (tw, th), base = cv2.getTextSize(text, render.FONT, fs, 1)
    tile = np.full((th + base + 4, tw + 4, 3), 255, np.uint8)
    render.put_text(tile, text, (2, th + 2), fs)
    return np.rot90(tile)


@dataclass
class Axes:
    """A panel's plot area in pixels and its data ranges."""

    x0: int
    y0: int
    x1: int
    y1: int
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x, y):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        u = self.x0 + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (self.x1 - self.x0)
        v = self.y1 - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (self.y1 - self.y0)
        return u, v


def _frame(img, ax: Axes, fs: float, yticks, xticks, ytitle: str, xtitle: str, title: str) -> None:
    black, grey = (0, 0, 0), (215, 215, 215)
    for t in yticks:
        _, y = ax.px(ax.xlim[0], t)
        cv2.line(img, (ax.x0, int(y)), (ax.x1, int(y)), grey, 1)
        label = f"{round(float(t), 6) + 0.0:.1f}"
        (tw, th), _ = cv2.getTextSize(label, render.FONT, fs, 1)
        render.put_text(img, label, (ax.x0 - tw - 8, int(y) + th // 2), fs, black)
    for x, label in xticks:
        u, _ = ax.px(x, ax.ylim[0])
        cv2.line(img, (int(u), ax.y1), (int(u), ax.y1 + 5), black, 1)
        if isinstance(label, str) and label:
            (tw, th), _ = cv2.getTextSize(label, render.FONT, fs, 1)
            render.put_text(img, label, (int(u) - tw // 2, ax.y1 + th + 12), fs, black)
    cv2.rectangle(img, (ax.x0, ax.y0), (ax.x1, ax.y1), black, 1)
    if xtitle:
        (tw, th), _ = cv2.getTextSize(xtitle, render.FONT, fs, 1)
        render.put_text(img, xtitle, ((ax.x0 + ax.x1 - tw) // 2, ax.y1 + 2 * th + 30), fs, black)
    side = _vertical_text(ytitle, fs)
    y = max(0, (ax.y0 + ax.y1 - side.shape[0]) // 2)
    x = max(0, ax.x0 - side.shape[1] - int(60 * fs))
    img[y : y + side.shape[0], x : x + side.shape[1]] = side[: img.shape[0] - y, : img.shape[1] - x]
    render.put_text(img, title, (ax.x0, ax.y0 - 14), fs * 1.15, black, thick=2)


def _legend(img, x: int, y: int, entries: list[tuple[str, tuple[int, int, int], bool]], fs: float) -> None:
    (_, th), _ = cv2.getTextSize("Ag", render.FONT, fs, 1)
    step = th + 14
    for i, (text, colour, dashed) in enumerate(entries):
        yy = y + i * step
        _polyline(img, [(x, yy - th // 2), (x + 36, yy - th // 2)], colour, 3, dashed)
        render.put_text(img, text, (x + 46, yy), fs, (0, 0, 0))


def _ylim(lows, highs) -> tuple[float, float]:
    lo = min([0.0, *[float(np.nanmin(v)) for v in lows if np.isfinite(v).any()]])
    hi = max([1.0, *[float(np.nanmax(v)) for v in highs if np.isfinite(v).any()]])
    return math.floor(lo * 5) / 5, math.ceil(hi * 5) / 5


def _step_ci(values: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, S) per image -> mean, lower, upper per step (mean_ci); the band is clipped to the
    values' own range [lo, hi] (the normal approximation can step outside it for few images)."""
    got = np.array([mean_ci(values[:, s]) for s in range(values.shape[1])])
    return got[:, 0], np.clip(got[:, 1], lo, hi), np.clip(got[:, 2], lo, hi)


def faithfulness_png(tally: Tally, modes: list[str], *, title: str = "") -> np.ndarray:
    """Mean deletion and insertion curves of every map with 95 % bands: one row per removal mode,
    deletion left, insertion right; the legend of each panel gives the maps' mean AUC."""
    pw, ph, fs = 900, 520, 0.6
    top = 70
    img = np.full((top + ph * len(modes), 2 * pw, 3), 255, np.uint8)
    if title:
        render.put_text(img, title, (20, 40), fs * 1.4, (0, 0, 0), thick=2)
    fr = tally.fractions
    for r, mode in enumerate(modes):
        for col, direction in enumerate(DIRECTIONS):
            names = [n for n in tally.maps if (mode, direction, n) in tally.curves]
            lo = 0.0 if tally.score_name.endswith("probability") else -1.0
            stats = {n: _step_ci(np.asarray(tally.curves[(mode, direction, n)]), lo, 1.0) for n in names}
            ylim = _ylim([s[1] for s in stats.values()], [s[2] for s in stats.values()])
            ox, oy = col * pw, top + r * ph
            ax = Axes(ox + 100, oy + 60, ox + 560, oy + ph - 90, (0.0, 1.0), ylim)
            yticks = np.arange(ylim[0], ylim[1] + 1e-9, 0.2)
            xticks = [(t, f"{t:.1f}") for t in np.linspace(0, 1, 6)]
            better = "lower" if direction == "deletion" else "higher"
            head = f"{direction}, mode '{mode}' ({better} AUC = more faithful)"
            _frame(img, ax, fs, yticks, xticks, tally.score_name, "share of patches removed", head)
            entries = []
            for n in names:
                m, lo, hi = stats[n]
                colour, dashed = _colour(n, tally.maps), n in BASELINE_COLOURS
                u, vlo = ax.px(fr, lo)
                _, vhi = ax.px(fr, hi)
                _band(img, u, vlo, vhi, colour)
                _, v = ax.px(fr, m)
                _polyline(img, list(zip(u, v)), colour, 3, dashed)
                auc = np.mean(tally.auc[(mode, direction, n)])
                entries.append((f"{probes.label(n)}  AUC {auc:.3f}", colour, dashed))
            _legend(img, ax.x1 + 24, ax.y0 + 20, entries, fs * 0.85)
            n_img = len(tally.auc[(mode, direction, names[0])]) if names else 0
            render.put_text(img, f"mean of {n_img} images, bands: 95% CI", (ax.x1 + 24, ax.y1), fs * 0.8, (90, 90, 90))
    return img


def randomization_png(tally: Tally, kind: str, *, title: str = "") -> np.ndarray:
    """Mean Spearman rank correlation (left) and SSIM (right) of every map with the original
    model's, per randomization step, with 95 % bands."""
    labels = list(tally.rand_labels)
    names = list(tally.spearman)
    pw, ph, fs = 900, 640, 0.6
    top = 70
    img = np.full((top + ph, 2 * pw, 3), 255, np.uint8)
    if title:
        render.put_text(img, title, (20, 40), fs * 1.4, (0, 0, 0), thick=2)
    order = [*names, *BASELINE_COLOURS]
    for col, (what, data) in enumerate((("Spearman rank correlation", tally.spearman), ("SSIM", tally.ssim))):
        stats = {n: _step_ci(np.asarray(data[n]), -1.0, 1.0) for n in names}
        lo = min([-0.2, *[float(np.nanmin(s[1])) for s in stats.values() if np.isfinite(s[1]).any()]])
        ylim = (math.floor(lo * 5) / 5, 1.0)
        ox = col * pw
        ax = Axes(ox + 100, top + 60, ox + 620, top + ph - 170, (-0.3, len(labels) - 0.7), ylim)
        yticks = np.arange(ylim[0], ylim[1] + 1e-9, 0.2)
        _frame(img, ax, fs, yticks, [(i, "") for i in range(len(labels))], what, "", f"{what} with the original maps")
        zero = int(ax.px(0, 0.0)[1])
        cv2.line(img, (ax.x0, zero), (ax.x1, zero), (120, 120, 120), 1)
        for i, lab in enumerate(labels):  # step labels, vertical
            tile = _vertical_text(lab, fs * 0.9)
            u = int(ax.px(i, 0)[0]) - tile.shape[1] // 2
            img[ax.y1 + 10 : ax.y1 + 10 + tile.shape[0], u : u + tile.shape[1]] = tile
        step_title = (
            f"{kind} randomization: parts re-initialized (from the top)"
            if kind == "cascade"
            else (f"{kind} randomization: the part re-initialized")
        )
        (tw, _), _ = cv2.getTextSize(step_title, render.FONT, fs, 1)
        render.put_text(img, step_title, ((ax.x0 + ax.x1 - tw) // 2, top + ph - 20), fs, (0, 0, 0))
        entries = []
        xs = np.arange(len(labels))
        for n in names:
            m, lo_, hi_ = stats[n]
            colour = _colour(n, order)
            u, vlo = ax.px(xs, lo_)
            _, vhi = ax.px(xs, hi_)
            _band(img, u, vlo, vhi, colour)
            _, v = ax.px(xs, m)
            _polyline(img, list(zip(u, v)), colour, 3, False)
            for p in zip(u, v):
                if np.isfinite(p).all():
                    cv2.circle(img, (int(p[0]), int(p[1])), 5, colour, -1, cv2.LINE_AA)
            entries.append((probes.label(n), colour, False))
        _legend(img, ax.x1 + 24, ax.y0 + 20, entries, fs * 0.85)
        n_img = len(data[names[0]]) if names else 0
        render.put_text(img, f"mean of {n_img} images, bands: 95% CI", (ax.x1 + 24, ax.y1), fs * 0.8, (90, 90, 90))
    return img


# ---------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.engine == "ray":  # imports Ray only here (viz_app/ray_evaluate.py)
        from viz_app import ray_evaluate

        return ray_evaluate.run(args, argv)
    if args.address is not None:
        raise cli.UsageError("--address needs --engine ray")
    settings = cli.settings_from_args(args)
    files, unreadable = (None, []) if args.scenes is not None else cli.collect_inputs(args.inputs)
    with cli.OutputFolder(args.out) as folder:  # created, locked and checked writable before the model loads
        return _run(args, argv, settings, files, unreadable, folder, LocalEngine())


class LocalEngine:
    """The in-process engine: the next batch decoded while this one runs (where cores are free),
    every batch evaluated here."""

    name = "local"

    def model_place(self, args: argparse.Namespace) -> tuple[str, str]:
        """(device, precision) of the command's own model: here, the run's."""
        return args.device, args.dtype

    def model_meta(self) -> dict:
        """What summary.json's "model" says beside the command's own model (here: nothing)."""
        return {}

    def start(self, args: argparse.Namespace, lm, batch: int) -> None:
        """Before any file is written: refuse a batch that would not fit in memory here."""
        cli.check_memory(lm, batch, gradients=with_gradients(lm))

    def parts(self, lm, args, inputs: list | None, rollout_kw: dict, progress) -> Iterator[Part]:
        c = lm.config
        pool = (lambda: ThreadPoolExecutor(1)) if cli.overlap_stages(lm.device) else cli.InlineExecutor
        with pool() as reader:
            if inputs is None:
                batches = scene_batches(args.scenes, args.seed, c.image_size[0], args.batch_size, lm.preprocessing)
            else:
                batches = image_batches(inputs, args.batch_size, lm.preprocessing, reader)
            for batch in batches:
                yield evaluate_batch(lm, batch, args, rollout_kw, progress)

    def summary(self) -> dict:
        return {"name": self.name}


def _run(args, argv, settings, files: list | None, unreadable, folder: cli.OutputFolder, engine) -> int:
    """The command on either engine: files (None for --scenes) are what engine.parts reads (paths
    here, ray_evaluate's sources there); the tables, plots and summary are written here."""
    names = {k: folder.reserve(v) for k, v in CSV_NAMES.items()}
    plot_names = {k: folder.reserve(f"{k}.png") for k in ("faithfulness", "randomization")}
    try:
        device, precision = engine.model_place(args)
        lm = load_checkpoint(args.model, device=device, dtype=precision, image_size=args.image_size)
    except (ViTLensError, ValueError) as e:
        raise cli.UsageError(f"cannot load model {args.model!r}: {e}") from None
    c = lm.config
    try:
        rollout_kw = report.rollout_options(c, settings)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if args.target_class is None:
        args.target_class = settings.grad_class
    if args.target_class is not None and not (c.num_classes and 0 <= args.target_class < c.num_classes):
        raise cli.UsageError(
            f"--class {args.target_class} is outside the model's classes 0-{max(0, c.num_classes - 1)}"
        )
    if args.head is not None and not (1 <= args.head[0] <= c.depth and 1 <= args.head[1] <= c.num_heads):
        raise cli.UsageError(f"--head {args.head[0]},{args.head[1]} is outside {c.depth} layers x {c.num_heads} heads")
    if args.scenes is not None and c.image_size[0] != c.image_size[1]:
        raise cli.UsageError(f"--scenes needs a square input; the model takes {c.image_size[0]}x{c.image_size[1]}")
    total = args.scenes if files is None else len(files)
    engine.start(
        args, lm, min(args.batch_size, total)
    )  # where the batches will run, checked before any file is written
    out = folder.path
    start = time.monotonic()
    csvs: dict[str, AtomicCsv] = {}
    p_cols = [f"p_{i}" for i in range(args.steps + 1)]
    tally = Tally()
    skipped: list[dict] = []
    progress = _Progress(total)
    for path, reason in unreadable:
        progress.note(f"skipped {path}: {reason}")
        skipped.append({"file": str(path), "reason": reason})
    plots: dict[str, str] = {}
    failure = None

    def record(part: Part) -> None:  # one batch's rows into the tables, its numbers into the tally
        for path, reason in part.skipped:
            progress.note(f"skipped {path}: {reason}")
            skipped.append({"file": path, "reason": reason})
        for name, rows in part.rows.items():
            csvs[name].write(rows)
        tally.merge(part.tally)
        progress.step(part.size)

    try:
        try:
            csvs["faithfulness"] = AtomicCsv(
                folder,
                names["faithfulness"],
                ["image", "map", "mode", "direction", "target_class", "auc_probability", "auc_top1", *p_cols],
            )
            if args.randomization != "none":
                csvs["randomization"] = AtomicCsv(
                    folder, names["randomization"], ["image", "map", "kind", "step_label", "step", "spearman", "ssim"]
                )
            if files is None:
                csvs["pointing"] = AtomicCsv(
                    folder,
                    names["pointing"],
                    ["image", "map", "label", "predicted", "pointing", "pointing_strict", "energy"],
                )
            for part in engine.parts(lm, args, files, rollout_kw, progress):
                record(part)
            for f in csvs.values():
                f.commit()
        finally:
            for f in csvs.values():
                f.close()
        title = f"{lm.name}, {tally.images} {'scenes' if files is None else 'images'}"
        if tally.images:
            png = faithfulness_png(tally, args.modes, title=title)
            folder.write(plot_names["faithfulness"], render.to_png(png))
            plots["faithfulness"] = plot_names["faithfulness"]
            if tally.rand_labels:
                png = randomization_png(tally, args.randomization, title=title)
                folder.write(plot_names["randomization"], render.to_png(png))
                plots["randomization"] = plot_names["randomization"]
    except cli.OutputError as e:  # a full disk: what was written stays, the summary says so
        failure = str(e)
    progress.end_line()
    wall = time.monotonic() - start
    status = 2 if failure else 1 if skipped else 0
    written = set(folder.written)
    summary = {
        "command": [cli.PROG, "evaluate", *argv],
        "model": report.model_meta(lm, str(args.model)) | engine.model_meta(),
        "settings": {
            "rollout": {k: v for k, v in settings.to_dict().items() if k.startswith("rollout_")},
            "target_class": args.target_class,
            "target": "each image's top-1 class" if args.target_class is None else f"class {args.target_class}",
            "head": None if args.head is None else list(args.head),
            "modes": args.modes,
            "steps": args.steps,
            "randomization": args.randomization,
            "randomization_seed": 0,
            "random_orders_per_image": 3,
            "seed": args.seed,
            "batch_size": args.batch_size,
        },
        "inputs": {
            "kind": "scenes" if files is None else "images",
            "given": total,
            "evaluated": tally.images,
            "skipped": skipped,
            **({"scene_seed": args.seed, "scene_size": c.image_size[0]} if files is None else {}),
        },
        "maps": {n: probes.label(n) for n in tally.maps},
        "score": tally.score_name,
        "protocol": PROTOCOL,
        "fractions": None if tally.fractions is None else tally.fractions.tolist(),
        "perturbed_inputs_per_image": {m: n / max(1, tally.images) for m, n in tally.forwards.items()},
        **summarize(tally),
        "files": {k: f.name for k, f in csvs.items() if f.name in written},
        "wall_time_s": round(wall, 3),
        "images_per_s": round(tally.images / max(wall, 1e-9), 4),
        "engine": engine.summary(),
        "exit_status": status,
        "non_finite": {"images": tally.non_finite, "note": "images whose forward pass gave NaN or Inf"},
        "written_by": f"{cli.PROG} evaluate",
        "complete": failure is None,
        "stopped": failure,
        "plots": plots,
        "written": list(folder.written),
        "files_from_earlier_runs": sorted(set(folder.earlier) - written),
    }
    try:
        folder.write(cli.SUMMARY, report.json_bytes(summary))
    except cli.OutputError as e:
        failure = f"{failure}; summary.json could not be written either" if failure else str(e)
    if tally.non_finite:
        progress.note(
            f"warning: {len(tally.non_finite)} of {tally.images} inputs gave non-finite values (NaN or Inf): the "
            "model's weights or its preprocessing produce them; summary.json lists them and writes such numbers as null"
        )
    if failure:
        raise cli.OutputError(f"{failure}; stopped after {tally.images} of {total} inputs")
    print(
        f"evaluated {tally.images} of {total} in {wall:.1f} s ({summary['images_per_s']:.2f} img/s) -> {out}",
        file=sys.stderr,
    )
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(parse_args(argv), argv)
    except (cli.UsageError, cli.OutputError) as e:
        print(f"{cli.PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
