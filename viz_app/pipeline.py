"""Model outputs -> analysis inputs: stacked attentions and, when asked, their gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import ViTConfig
from model.vit import VisionTransformer


@dataclass
class Forward:
    """One forward pass, detached, float32, on the model's device.

    logits (B, C) or None; features (B, F); attentions (B, L, H, T, T); token_norms (B, L+1, T);
    grads (B, L, H, T, T) = d logit[target] / d attention, and target (B,), when asked for.
    """

    logits: Tensor | None
    features: Tensor
    attentions: Tensor
    token_norms: Tensor
    grads: Tensor | None = None
    target: Tensor | None = None

    @property
    def probs(self) -> Tensor | None:
        return None if self.logits is None else self.logits.softmax(dim=-1)


def run_forward(
    model: VisionTransformer,
    pixels: Tensor,
    *,
    gradients: bool = False,
    target: Tensor | None = None,
    attention_out: Tensor | None = None,
    keep: Tensor | None = None,
    head_mask: Tensor | None = None,
    head_fill: str = "zero",
) -> Forward:
    """pixels (B, 3, H, W) on the model's device and dtype.

    gradients: also d logit[target] / d attention for every layer, from the same forward pass
    plus one backward. target (B,) defaults to each image's top-1 class. The model's parameters
    are not touched (no .grad written): the graph is built from the input. Images in a batch are
    independent, so the gradient of the summed target logits is each image's own gradient.
    attention_out: a block to write the maps into (see VisionTransformer.forward); without
    gradients, the returned attentions are then a view of it. keep, head_mask, head_fill: the
    causal probes of VisionTransformer.forward (tokens dropped, heads removed), passed through.
    """
    probe = dict(keep=keep, head_mask=head_mask, head_fill=head_fill)
    if not gradients:
        with torch.inference_mode():
            out = model(pixels, output_attentions=True, output_token_norms=True, attention_out=attention_out, **probe)
            return Forward(
                logits=None if out.logits is None else out.logits.float(),
                features=out.features.float(),
                attentions=(
                    out.attention_stack if out.attention_stack is not None else torch.stack(out.attentions, dim=1)
                ).float(),
                token_norms=out.token_norms.float(),
            )
    if model.head is None:
        raise ValueError("class-specific maps need a model with a classifier head")
    x = pixels.detach().clone().requires_grad_(True)
    # the backward pass launches its kernels too: both run in the model's precision (TF32 or not)
    with torch.enable_grad(), model.kernel_precision():
        out = model(x, output_attentions=True, output_token_norms=True, **probe)
        logits = out.logits
        if target is None:
            target = logits.argmax(dim=-1)
        target = target.to(logits.device).long()
        if target.shape != (logits.shape[0],) or (target < 0).any() or (target >= logits.shape[1]).any():
            raise ValueError(f"target classes must be (B,) in 0..{logits.shape[1] - 1}")
        chosen = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(chosen, out.attentions)
    return Forward(
        logits=logits.detach().float(),
        features=out.features.detach().float(),
        attentions=torch.stack([a.detach() for a in out.attentions], dim=1).float(),
        token_norms=out.token_norms.detach().float(),
        grads=torch.stack(grads, dim=1).float(),
        target=target.detach(),
    )


def analysis_memory_bytes(config: ViTConfig, dtype: torch.dtype, *, batch: int = 1, gradients: bool = False) -> int:
    """Peak extra memory of run_forward + the default analyses, estimated before running.

    The attention maps dominate: B * L * H * T^2 values, written once into one block in the
    model's dtype, plus a float32 copy when that dtype is narrower; the analyses work on them in
    small chunks. Block activations are small beside them at ViT sizes. Gradients keep the
    autograd graph (about two more copies of the maps) and their own float32 stack. A quarter
    is added for what the estimate leaves out.
    """
    values = batch * config.depth * config.num_heads * config.num_tokens**2
    width = torch.finfo(dtype).bits // 8
    activations = batch * config.num_tokens * (4 * config.embed_dim + config.mlp_dim) * 4
    total = values * (width + (4 if width < 4 else 0)) + 4 * activations
    if gradients:
        total += values * (2 * width + 4) + config.depth * activations
    return int(1.25 * total)


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory where the analysis would run: on a GPU its free memory plus what PyTorch holds
    cached; on the host MemAvailable, capped by a cgroup (container) limit; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return None
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:  # cgroup v2: what the container may still use
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


# The share of free memory an analysis may plan to use; the rest is left to the OS, other sessions
# and what the estimate leaves out.
MEMORY_SHARE = 0.8


def memory_shortfall(
    config: ViTConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    batch: int = 1,
    gradients: bool = False,
    extra_bytes: int = 0,
) -> str | None:
    """None when `batch` images' analysis (plus extra_bytes, e.g. the decoded images held at once)
    fits in MEMORY_SHARE of the free memory where it would run; else one sentence saying how much
    it needs and how much is free. The one estimate the app and the CLI both check before running."""
    need = analysis_memory_bytes(config, dtype, batch=batch, gradients=gradients) + int(extra_bytes)
    free = available_memory_bytes(device)
    if free is None or need <= MEMORY_SHARE * free:
        return None
    what = "one image" if batch == 1 else f"a batch of {batch} images"
    return (
        f"the analysis of {what} with this model needs about {need / 2**30:.1f} GB "
        f"({config.depth} layers x {config.num_heads} heads x {config.num_tokens}^2 attention values), "
        f"but only {free / 2**30:.1f} GB is free on {torch.device(device)}"
    )
