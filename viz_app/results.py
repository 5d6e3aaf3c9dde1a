"""What the page shows for one (model, image): computed once per forward pass, then read only.

Everything here is plain numpy/torch; the Streamlit caching that keeps these objects lives in
viz_app/cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.preprocess import PreparedImage
from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app.pipeline import run_forward


@dataclass(frozen=True)
class ImageResult:
    """One forward pass of one image and the default views computed from it.

    attentions (L, H, T, T) float32 (float16 for large models, see `attn_dtype`), read-only.
    """

    probs: np.ndarray | None  # (C,)
    features: np.ndarray  # (F,)
    attentions: torch.Tensor  # (L, H, T, T), CPU, read-only by convention
    token_norms: np.ndarray  # (L+1, T)
    rollout: np.ndarray  # (gh, gw), paper settings
    mad: np.ndarray  # (L, H) pixels, prefix mass as distance 0
    mad_renorm: np.ndarray  # (L, H) pixels, renormalized over patches
    entropy: np.ndarray  # (L, H) nats, mean over queries
    prepared: PreparedImage
    extras: dict = field(default_factory=dict)

    @property
    def top5(self) -> list[tuple[int, float]]:
        if self.probs is None:
            return []
        idx = np.argsort(-self.probs)[:5]
        return [(int(i), float(self.probs[i])) for i in idx]


def analyze_image(lm: LoadedModel, prepared: PreparedImage) -> ImageResult:
    c = lm.config
    x = prepared.pixels[None].to(lm.device, lm.dtype)
    fwd = run_forward(lm.model, x)
    attn = fwd.attentions  # (1, L, H, T, T)
    kw = dict(num_prefix=c.num_prefix_tokens, grid=c.grid)
    rollout = A.attention_rollout(attn, readout_tokens=c.readout_tokens, **kw)[0]
    mad = A.mean_attention_distance(attn, patch_size=c.patch_size, **kw)[0]
    mad_r = A.mean_attention_distance(attn, patch_size=c.patch_size, convention="renormalized", **kw)[0]
    entropy = A.attention_entropy(attn)[0]
    return ImageResult(
        probs=None if fwd.probs is None else fwd.probs[0].cpu().numpy(),
        features=fwd.features[0].cpu().numpy(),
        attentions=attn[0].cpu(),
        token_norms=fwd.token_norms[0].cpu().numpy(),
        rollout=rollout.cpu().numpy(),
        mad=mad.cpu().numpy(),
        mad_renorm=mad_r.cpu().numpy(),
        entropy=entropy.cpu().numpy(),
        prepared=prepared,
    )


def gradient_map(lm: LoadedModel, prepared: PreparedImage, target: int) -> np.ndarray:
    """Chefer et al. gradient rollout for one class, (gh, gw)."""
    c = lm.config
    x = prepared.pixels[None].to(lm.device, lm.dtype)
    fwd = run_forward(lm.model, x, gradients=True, target=torch.tensor([target]))
    m = A.gradient_rollout(
        fwd.attentions, fwd.grads, num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens
    )
    return m[0].cpu().numpy()
