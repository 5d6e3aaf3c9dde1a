"""Model outputs -> analysis inputs: stacked attentions, gradients w.r.t. attentions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.vit import VisionTransformer


@dataclass
class Forward:
    """One forward pass, detached, float32 on the model's device.

    logits (B, C) or None; features (B, F); attentions (B, L, H, T, T); token_norms (B, L+1, T).
    """

    logits: Tensor | None
    features: Tensor
    attentions: Tensor
    token_norms: Tensor

    @property
    def probs(self) -> Tensor | None:
        return None if self.logits is None else self.logits.softmax(dim=-1)


def run_forward(model: VisionTransformer, pixels: Tensor) -> Forward:
    """pixels (B, 3, H, W) already on the model's device and dtype."""
    with torch.inference_mode():
        out = model(pixels, output_attentions=True, output_token_norms=True)
        return Forward(
            logits=None if out.logits is None else out.logits.float(),
            features=out.features.float(),
            attentions=torch.stack(out.attentions, dim=1).float(),
            token_norms=out.token_norms.float(),
        )


def attention_gradients(
    model: VisionTransformer, pixels: Tensor, target: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """d logit[target] / d attention for every layer, one forward and one backward pass.

    target: (B,) class per image; None takes each image's top-1. The model's parameters are not
    touched (no .grad written): the graph is built from the input. Images in a batch are
    independent, so the gradient of the summed target logits is each image's own gradient.
    -> (attentions (B, L, H, T, T), gradients (B, L, H, T, T), target (B,)).
    """
    if model.head is None:
        raise ValueError("gradient rollout needs a model with a classifier head")
    x = pixels.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x, output_attentions=True)
        logits = out.logits
        if target is None:
            target = logits.argmax(dim=-1)
        target = target.to(logits.device).long()
        if target.shape != (logits.shape[0],) or (target < 0).any() or (target >= logits.shape[1]).any():
            raise ValueError(f"target classes must be (B,) in 0..{logits.shape[1] - 1}")
        chosen = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(chosen, out.attentions)
    attns = torch.stack([a.detach() for a in out.attentions], dim=1).float()
    return attns, torch.stack(grads, dim=1).float(), target.detach()
