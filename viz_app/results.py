"""What the page shows for one (model, image): computed once per forward pass, then read only.

The arrays are the report's (viz_app/report.py) for the paper's settings; views that use other
settings recompute from `forward`, which keeps the attention maps. Plain numpy/torch; the
Streamlit caching that keeps these objects lives in viz_app/cache.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.preprocess import PreparedImage
from model.weights.load import LoadedModel
from viz_app import render, report
from viz_app.pipeline import Forward, run_forward


@dataclass(frozen=True)
class ImageResult:
    """One forward pass of one image (batch of 1, on the CPU, read-only by convention) and the
    report arrays for the default settings."""

    forward: Forward
    arrays: dict[str, np.ndarray]
    prepared: PreparedImage
    pictures: dict = field(default_factory=dict, compare=False, repr=False)  # drawn once, then reused
    nonfinite: str | None = None  # nonfinite_outputs' sentence for this model and image, None if all finite

    def patch_grid(self, patch_size: int) -> np.ndarray:
        """The model's view with its patch grid and row/column numbers (drawn once per result)."""
        key = ("grid", patch_size)
        if key not in self.pictures:
            self.pictures[key] = render.draw_patch_grid(self.prepared.view, patch_size)
        return self.pictures[key]

    @property
    def attentions(self) -> torch.Tensor:  # (L, H, T, T) float32
        return self.forward.attentions[0]

    @property
    def probs(self) -> np.ndarray | None:  # (C,)
        return self.arrays.get("probabilities")

    @property
    def top5(self) -> list[tuple[int, float]]:
        if "top5_classes" not in self.arrays:
            return []
        return [(int(i), float(p)) for i, p in zip(self.arrays["top5_classes"], self.arrays["top5_probabilities"])]

    @property
    def rollout(self) -> np.ndarray:  # (gh, gw), the paper's settings
        return self.arrays["rollout"]

    @property
    def mad(self) -> np.ndarray:  # (L, H) px, prefix mass as distance 0
        return self.arrays["mean_attention_distance"]

    @property
    def mad_renorm(self) -> np.ndarray:  # (L, H) px, renormalized over patches
        return self.arrays["mean_attention_distance_renormalized"]

    @property
    def prefix_share(self) -> np.ndarray:  # (L, H) in [0, 1]
        return self.arrays["prefix_mass_share"]

    @property
    def entropy(self) -> np.ndarray:  # (L, H) nats
        return self.arrays["attention_entropy"]

    @property
    def token_norms(self) -> np.ndarray:  # (L+1, T)
        return self.arrays["token_norms"]

    def report_arrays(
        self, lm: LoadedModel, settings: report.Settings, grad: tuple[int, np.ndarray] | None = None
    ) -> dict:
        """The report arrays for other settings, from the kept forward pass (no model run). The
        class-specific map (settings.class_method) needs its own backward pass: pass it in as
        (class, map) (the app caches it per class)."""
        no_grad = dataclasses.replace(settings, grad_rollout=False, grad_class=None)
        arrays = report.split(report.analyze_batch(lm, self.forward, no_grad), 0)
        if settings.grad_rollout and grad is not None:
            cls, heat = grad
            key = "grad_rollout" if settings.class_method == "gradient" else "transformer_attribution"
            arrays[key] = np.asarray(heat, np.float32)
            arrays["grad_class"] = np.array(cls, np.int64)
        arrays["model_view"] = self.prepared.view
        return arrays


def _cpu(fwd: Forward) -> Forward:
    move = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return Forward(
        logits=move(fwd.logits),
        features=move(fwd.features),
        attentions=move(fwd.attentions),
        token_norms=move(fwd.token_norms),
    )


def analyze_image(lm: LoadedModel, prepared: PreparedImage) -> ImageResult:
    x = prepared.pixels[None].to(lm.device, lm.dtype)
    fwd = _cpu(run_forward(lm.model, x))
    arrays = report.split(report.analyze_batch(lm, fwd, report.Settings()), 0)
    problem = nonfinite_outputs(
        pixels=x,  # as the model gets them: a cast to float16 can overflow finite pixels to infinity
        pos_embed=getattr(lm.model, "pos_embed", None),
        filters=patch_filters(lm),
        attentions=fwd.attentions[0],
        token_norms=fwd.token_norms,
        features=fwd.features,
        logits=fwd.logits,
    )
    return ImageResult(forward=fwd, arrays=arrays, prepared=prepared, nonfinite=problem)


# ---------------------------------------------------------------------------------------------
# Values that are not finite (a checkpoint with NaN or infinite weights, or normalized pixels that
# overflow the model's precision): found once per result and named in one warning; every analysis
# and picture accepts them (NaN where undefined, drawn as no value) and none raises.


def patch_filters(lm: LoadedModel):
    """The linear patch embedding's weight (D, C, p, p), or None for a model without one."""
    if not lm.config.linear_patch_embed:
        return None
    proj = getattr(getattr(lm.model, "patch_embed", None), "proj", None)
    return getattr(proj, "weight", None)


def _finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x.detach()).all())
    return bool(np.isfinite(np.asarray(x, dtype=np.float64)).all())


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _ranges(numbers: Sequence[int]) -> str:
    """[2, 3, 4, 7] -> '2-4 and 7'; [2, 3] -> '2 and 3'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    parts = []
    for r in runs:
        parts += [f"{r[0]}-{r[-1]}"] if len(r) > 2 else [str(n) for n in r]
    return _listed(parts)


def nonfinite_outputs(
    *,
    pixels=None,
    pos_embed=None,
    filters=None,
    attentions=None,
    token_norms=None,
    features=None,
    logits=None,
) -> str | None:
    """Which of these hold a NaN or an infinite value, as one sentence; None when all are finite.

    Plain arrays in (numpy or torch, any shape; None = not checked), a sentence out, for the
    page's warning and the CLI's: pixels the preprocessed model input, pos_embed the position
    embeddings, filters the patch-embedding weight, attentions one image's maps with the layer
    first (L, ...): the sentence names the layers, counted from 1; token_norms, features and
    logits the model's outputs. Attention is checked one layer at a time (no full-size
    temporary)."""
    found = []
    if pixels is not None and not _finite(pixels):
        found.append("the preprocessed image (the model input)")
    if pos_embed is not None and not _finite(pos_embed):
        found.append("the position embeddings")
    if filters is not None and not _finite(filters):
        found.append("the patch-embedding filters")
    # attention maps are probabilities (sums of at most L*H*T): their total is finite exactly when
    # every value is, so one sum (2 ms for ViT-B/16) clears the common case before the layer-wise look
    if attentions is not None and not _finite(attentions.sum() if isinstance(attentions, torch.Tensor) else attentions):
        bad = [i + 1 for i in range(len(attentions)) if not _finite(attentions[i])]
        if bad:
            L = len(attentions)
            which = f"all {L} layers" if len(bad) == L else f"layer{'s' if len(bad) > 1 else ''} {_ranges(bad)} of {L}"
            found.append(f"the attention maps of {which}")
    if token_norms is not None and not _finite(token_norms):
        found.append("the token norms")
    if features is not None and not _finite(features):
        found.append("the pooled features")
    if logits is not None and not _finite(logits):
        found.append("the logits")
    if not found:
        return None
    return f"NaN or infinite values in {_listed(found)}."


def nonfinite_warning(problem: str, model: str) -> str:
    """The page's one warning for a result whose nonfinite_outputs sentence is `problem`."""
    return (
        f"{model}: {problem} Its weights or its preprocessing (mean, std) are broken, so every map and "
        "number computed from these values is meaningless. Values that are not finite are drawn in "
        "hatched grey in pictures and downloads, and left blank in the interactive charts."
    )


CLASS_MAPS = report.CLASS_MAPS  # method -> what the page calls it


def gradient_map(lm: LoadedModel, prepared: PreparedImage, target: int) -> np.ndarray:
    """Chefer et al. gradient rollout for one class, (gh, gw)."""
    return class_map(lm, prepared, target, "gradient")


def class_map(lm: LoadedModel, prepared: PreparedImage, target: int, method: str = "gradient") -> np.ndarray:
    """The class-specific map of `method` (a CLASS_MAPS key) for one class, (gh, gw): the batch
    function the CLI uses (report.class_maps) on this one image."""
    x = prepared.pixels[None].to(lm.device, lm.dtype)
    return report.class_maps(lm, x, torch.tensor([target], device=lm.device), method)[0].float().cpu().numpy()
