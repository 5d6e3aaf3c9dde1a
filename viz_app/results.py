"""What the page shows for one (model, image): computed once per forward pass, then read only.

The arrays are the report's (viz_app/report.py) for the paper's settings; views that use other
settings recompute from `forward`, which keeps the attention maps. Plain numpy/torch; the
Streamlit caching that keeps these objects lives in viz_app/cache.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from model.preprocess import PreparedImage
from model.weights.load import LoadedModel
from viz_app import analysis as A
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
        gradient rollout needs its own backward pass: pass it in as (class, map) (the app caches
        it per class)."""
        no_grad = dataclasses.replace(settings, grad_rollout=False, grad_class=None)
        arrays = report.split(report.analyze_batch(lm, self.forward, no_grad), 0)
        if settings.grad_rollout and grad is not None:
            cls, heat = grad
            arrays["grad_rollout"] = np.asarray(heat, np.float32)
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
    return ImageResult(forward=fwd, arrays=arrays, prepared=prepared)


def gradient_map(lm: LoadedModel, prepared: PreparedImage, target: int) -> np.ndarray:
    """Chefer et al. gradient rollout for one class, (gh, gw)."""
    c = lm.config
    x = prepared.pixels[None].to(lm.device, lm.dtype)
    fwd = run_forward(lm.model, x, gradients=True, target=torch.tensor([target]))
    m = A.gradient_rollout(
        fwd.attentions, fwd.grads, num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens
    )
    return m[0].cpu().numpy()
