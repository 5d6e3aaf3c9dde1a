"""Which map to believe: perturbation (faithfulness) curves, model randomization and causal probes
(head ablation, token dropping), for any model; the app's tabs and `vit-lens evaluate` call these.

Every probe is an argument of the model's forward (keep, head_mask, head_fill), never a hook or
a write to the model: the cached model is shared by every session. Randomized models are new
module objects that share the unchanged tensors with the original.
Definitions: docs/DEFINITIONS.md, sections 'Faithfulness (perturbation) curves',
'Model randomization' and 'Causal probes'.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.vit import VisionTransformer
from viz_app import analysis as A
from viz_app.analysis.faithfulness import DIRECTIONS, centre_prior, curve_auc, removal_counts, removal_order
from viz_app.pipeline import Forward, run_forward

REMOVAL_MODES = {
    "drop": "drop the patches' tokens from the sequence (prefix tokens always stay)",
    "pixels": "replace the patches' pixels by the preprocessing mean (0 after normalization)",
}
RANDOM, CENTRE = "random", "centre_prior"
BASELINES = (CENTRE, RANDOM)
LABELS = {
    "rollout": "rollout",
    "grad_rollout": "gradient rollout",
    "last_layer": "last layer, mean of heads",
    CENTRE: "centre prior",
    RANDOM: "random order",
}


def label(key: str) -> str:
    """A map key's name for people: 'head_L12H3' -> 'head 3 of layer 12'."""
    if key.startswith("head_L"):
        layer, head = key[len("head_L") :].split("H")
        return f"layer {layer}, head {head}"
    return LABELS.get(key, key)


def head_key(layer: int, head: int) -> str:
    """Key of one head's read-out map, layer and head counted from 1."""
    return f"head_L{layer}H{head}"


def attribution_maps(lm, fwd: Forward, rollout_kw: dict, head: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The maps the faithfulness and sanity checks compare, (B, gh, gw) each: rollout with
    rollout_kw (report.rollout_options), gradient rollout when fwd has gradients, the last
    layer's read-out attention averaged over heads, and one head's read-out attention when head
    = (layer, head) is given (counted from 1)."""
    c = lm.config
    kw = dict(num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens)
    attn = fwd.attentions
    out = {"rollout": A.attention_rollout(attn, **rollout_kw)}
    if fwd.grads is not None:
        out["grad_rollout"] = A.gradient_rollout(attn, fwd.grads, **kw)
    out["last_layer"] = A.attention_maps(attn[:, -1], **kw).mean(1)
    if head is not None:
        layer, h = head
        out[head_key(layer, h)] = A.attention_maps(attn[:, layer - 1, h - 1], **kw)
    return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Faithfulness curves


@dataclass(frozen=True)
class Curves:
    """Perturbation curves of a batch of images: for each map and direction, the score after each
    step. scores[(map, direction)]: (B, S) target-class probability (cosine similarity of the
    pooled features for models without a classifier); agree[(map, direction)]: (B, S) whether
    the top-1 class is still the unperturbed one (None without a classifier)."""

    mode: str
    steps: int
    fractions: np.ndarray  # (S,) share of patches removed, 0 .. 1
    removed: np.ndarray  # (S,) patches removed
    target: np.ndarray  # (B,) class whose probability is followed (-1 without a classifier)
    scores: dict[tuple[str, str], np.ndarray]
    agree: dict[tuple[str, str], np.ndarray] | None
    score_name: str
    forwards: int = 0  # images (sequences) run through the model, for the record
    tokens: int = 0  # tokens in all of them
    maps: tuple[str, ...] = field(default=())

    def auc(self, key: tuple[str, str]) -> np.ndarray:
        """(B,) area under the score curve over the removed share (trapezoid rule on [0, 1])."""
        return curve_auc(self.scores[key], self.fractions)

    def auc_agree(self, key: tuple[str, str]) -> np.ndarray | None:
        return None if self.agree is None else curve_auc(self.agree[key].astype(np.float64), self.fractions)


PROBE_BATCH_BYTES = 2**28  # one layer's attention scores of a probe batch stay under 256 MB


def probe_batch_size(config, cap: int = 32) -> int:
    """Images per batch for the probes' forward passes (no maps kept): as many as keep one
    layer's (B, H, T, T) float32 scores under PROBE_BATCH_BYTES, at most cap, at least 1.
    ViT-B/16 at 224 px: 32; ViT-L/14 at 518 px (1370 tokens): 2."""
    per_image = config.num_heads * config.num_tokens**2 * 4
    return max(1, min(cap, PROBE_BATCH_BYTES // per_image))


def _random_orders(num_patches: int, n: int, seed: int, image: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, image])
    return [rng.permutation(num_patches) for _ in range(n)]


def faithfulness_curves(
    model: VisionTransformer,
    pixels: Tensor,
    maps: dict[str, np.ndarray],
    *,
    mode: str = "drop",
    steps: int = 10,
    target: Sequence[int] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    baselines: bool = True,
    random_orders: int = 3,
    seed: int = 0,
    image_ids: Sequence[int] | None = None,
    head_mask: Tensor | None = None,
    head_fill: str = "zero",
    batch_size: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> Curves:
    """Remove patches in the order of each map, `steps` equal shares at a time, and follow the
    target class's probability.

    pixels: (B, 3, H, W) normalized, on the model's device and dtype; maps: name -> (B, gh, gw)
    (or (gh, gw) for all images). baselines adds the centre prior and a random order (the mean
    curve of `random_orders` seeded permutations per image). mode: 'drop' or 'pixels'
    (REMOVAL_MODES). target: (B,) classes, default each image's unperturbed top-1.
    seed, image_ids: image b's random orders come from the generator [seed, image_ids[b]]
    (default b), so a dataset's baselines do not depend on how it is cut into batches.
    head_mask/head_fill: run every input with these heads ablated (see the model's forward).
    Every perturbed input of every curve is batched (batch_size at a time, default
    probe_batch_size); inputs that are the same (step 0, removing everything) run once.
    """
    if mode not in REMOVAL_MODES:
        raise ValueError(f"removal mode must be one of {tuple(REMOVAL_MODES)}, got {mode!r}")
    c = model.config
    B, N, (gh, gw) = pixels.shape[0], c.num_patches, c.grid
    maps = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (B, gh, gw)) for k, v in maps.items()}
    if baselines:
        maps[CENTRE] = np.broadcast_to(centre_prior(c.grid), (B, gh, gw))
    counts = removal_counts(N, steps, min_kept=model.min_kept_patches)
    fractions = np.arange(steps + 1) / steps
    # orders[(map, direction)][b] = list of permutations (several for the random baseline)
    orders: dict[tuple[str, str], list[list[np.ndarray]]] = {}
    for name, m in maps.items():
        for d in directions:
            orders[(name, d)] = [[removal_order(m[b], d)] for b in range(B)]
    if image_ids is not None and len(image_ids) != B:
        raise ValueError(f"image_ids must name the {B} images of the batch, got {len(image_ids)}")
    if baselines and random_orders > 0:
        for d in directions:
            ids = range(B) if image_ids is None else image_ids
            orders[(RANDOM, d)] = [_random_orders(N, random_orders, seed, int(i)) for i in ids]
    # Every distinct (image, removed set) once.
    jobs: dict[tuple[int, bytes], int] = {}
    job_list: list[tuple[int, np.ndarray]] = []
    refs: dict[tuple[str, str], list[list[list[int]]]] = {}
    for key, per_image in orders.items():
        refs[key] = []
        for b, perms in enumerate(per_image):
            rows = []
            for perm in perms:
                row = []
                for k in counts:
                    removed = np.sort(perm[:k])
                    jk = (b, removed.tobytes())
                    if jk not in jobs:
                        jobs[jk] = len(job_list)
                        job_list.append((b, removed))
                    row.append(jobs[jk])
                rows.append(row)
            refs[key].append(rows)
    batch_size = batch_size or probe_batch_size(c)
    logits, feats = _run_jobs(model, pixels, job_list, mode, head_mask, head_fill, batch_size, progress)
    base = {b: jobs[(b, np.zeros(0, np.int64).tobytes())] for b in range(B)}
    if logits is not None:
        probs = logits.softmax(-1)
        top = logits.argmax(-1)
        tgt = np.array([int(top[base[b]]) for b in range(B)]) if target is None else np.asarray(target, np.int64)
        if tgt.shape != (B,):
            raise ValueError(f"target must give one class per image ({B}), got shape {tgt.shape}")
        score = probs[np.arange(len(job_list)), tgt[[b for b, _ in job_list]]].numpy().astype(np.float64)
        agree = (top.numpy() == np.array([int(top[base[b]]) for b, _ in job_list])).astype(np.float64)
        score_name = "target-class probability"
    else:
        tgt = np.full(B, -1)
        ref = feats[[base[b] for b, _ in job_list]]
        score = torch.nn.functional.cosine_similarity(feats, ref, dim=-1).numpy().astype(np.float64)
        agree = None
        score_name = "cosine similarity of the pooled features"
    scores, agrees = {}, {}
    for key, per_image in refs.items():
        idx = np.array(per_image)  # (B, n_perm, S)
        scores[key] = score[idx].mean(1)
        if agree is not None:
            agrees[key] = agree[idx].mean(1)
    tokens = sum(c.num_prefix_tokens + (N - len(r) if mode == "drop" else N) for _, r in job_list)
    return Curves(
        mode=mode,
        steps=steps,
        fractions=fractions,
        removed=counts,
        target=tgt,
        scores=scores,
        agree=agrees if agree is not None else None,
        score_name=score_name,
        forwards=len(job_list),
        tokens=tokens,
        maps=tuple(dict.fromkeys(k for k, _ in orders)),
    )


def _pixel_mask(removed: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    gh, gw = grid
    m = np.zeros(gh * gw, dtype=bool)
    m[removed] = True
    return np.kron(m.reshape(gh, gw), np.ones((patch, patch), dtype=bool))


@torch.inference_mode()
def _run_jobs(model, pixels, job_list, mode, head_mask, head_fill, batch_size, progress):
    """Logits (J, C) or None and pooled features (J, F) of every job (image, removed patches)."""
    c = model.config
    N = c.num_patches
    out_logits: list[Tensor | None] = [None] * len(job_list)
    out_feats: list[Tensor | None] = [None] * len(job_list)
    if mode == "drop":  # batch jobs keeping the same number of tokens
        groups: dict[int, list[int]] = {}
        for j, (_, removed) in enumerate(job_list):
            groups.setdefault(len(removed), []).append(j)
        batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    else:
        order = list(range(len(job_list)))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    done = 0
    for js in batches:
        imgs = torch.tensor([job_list[j][0] for j in js], device=pixels.device)
        x = pixels[imgs]
        keep = None
        if mode == "drop":
            kept = []
            for j in js:
                m = np.ones(N, dtype=bool)
                m[job_list[j][1]] = False
                kept.append(np.flatnonzero(m))
            if len(kept[0]) < N:
                keep = torch.from_numpy(np.stack(kept)).to(pixels.device)
        else:
            masks = np.stack([_pixel_mask(job_list[j][1], c.grid, c.patch_size) for j in js])
            if masks.any():
                x = x.masked_fill(torch.from_numpy(masks).to(pixels.device)[:, None], 0)
        hm = head_mask
        if hm is not None and hm.ndim == 3 and hm.shape[0] > 1:
            hm = hm[imgs]
        out = model(x, output_attentions=False, keep=keep, head_mask=hm, head_fill=head_fill)
        for i, j in enumerate(js):
            out_feats[j] = out.features[i].float().cpu()
            if out.logits is not None:
                out_logits[j] = out.logits[i].float().cpu()
        done += len(js)
        if progress is not None:
            progress(done / len(job_list))
    feats = torch.stack(out_feats)
    logits = torch.stack(out_logits) if out_logits[0] is not None else None
    return logits, feats


def favoured(curves: Curves, direction: str = "deletion") -> dict:
    """Which map the curves favour for image 0: for deletion the smallest AUC, for insertion the
    largest, among the maps (the baselines are never the answer), with its margin over the random
    order and over the centre prior (AUC units, positive = the map is better) where those ran.

    Only finite AUCs compete (a model whose scores are NaN or infinite has curves without an
    area); when no map has one, "map" is None, "auc" NaN and both margins None."""
    better = min if direction == "deletion" else max
    keys = [k for k in curves.scores if k[1] == direction and k[0] not in BASELINES]
    aucs = {k[0]: float(curves.auc(k)[0]) for k in keys}
    if not aucs:
        raise ValueError("no map besides the baselines to compare")
    finite = {k: v for k, v in aucs.items() if math.isfinite(v)}
    if not finite:
        return {"map": None, "auc": float("nan"), "aucs": aucs, "margin_vs_random": None, "margin_vs_centre": None}
    best = better(finite, key=finite.get)

    def margin(baseline: str) -> float | None:
        if (baseline, direction) not in curves.scores:
            return None
        b = float(curves.auc((baseline, direction))[0])
        if not math.isfinite(b):
            return None
        return (b - aucs[best]) if direction == "deletion" else (aucs[best] - b)

    return {
        "map": best,
        "auc": aucs[best],
        "aucs": aucs,
        "margin_vs_random": margin(RANDOM),
        "margin_vs_centre": margin(CENTRE),
    }


# ---------------------------------------------------------------------------------------------
# Model randomization (Adebayo et al. 2018)

HEAD_PARTS = ("norm.", "fc_norm.", "pre_logits.", "head.", "head_dist.", "proj.")
EMBED_PARTS = ("patch_embed.", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre.")


def part_of(name: str) -> str:
    """The part a parameter or buffer belongs to: 'head', 'block i' (from 0) or 'embedding'."""
    if name.startswith("blocks."):
        return f"block {int(name.split('.')[1])}"
    if name.startswith(EMBED_PARTS):
        return "embedding"
    if name.startswith(HEAD_PARTS):
        return "head"
    raise ValueError(f"parameter {name!r} belongs to no known part")


def _fresh(name: str, t: Tensor, gen: torch.Generator, layer_scale: bool) -> Tensor:
    """A re-initialized value for one tensor, by the model's own init rules (init_weights)."""
    if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
        return torch.zeros_like(t)
    if name.endswith("running_var"):
        return torch.ones_like(t)
    if name.endswith("gamma"):
        return torch.full_like(t, 1.0 if layer_scale else 0.0)
    if t.ndim == 1 and "norm" in name:
        return torch.full_like(t, 1.0 if name.endswith("weight") else 0.0)
    if name.endswith("bias"):
        return torch.zeros_like(t)
    # drawn on the CPU (the generator's device), so that every device gets the same weights
    w = torch.empty(t.shape, device="cpu").normal_(0.0, 0.02, generator=gen).clamp_(-0.04, 0.04)
    return w.to(t.device, t.dtype)


def randomized_model(model: VisionTransformer, parts: Sequence[str], *, seed: int = 0) -> VisionTransformer:
    """A copy of model whose `parts` ('head', 'block i' from 0, 'embedding') are re-initialized
    (seeded per part, so a part gets the same weights in every step that randomizes it). The
    other tensors are shared with model, not copied; model itself is not touched."""
    parts = set(parts)
    with torch.device("meta"):
        new = VisionTransformer(model.config)
    state = model.state_dict()
    gens: dict[str, torch.Generator] = {}
    for name in list(state):
        part = part_of(name)
        if part in parts:
            if part not in gens:
                gens[part] = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{part}".encode()))
            state[name] = _fresh(name, state[name], gens[part], model.config.layer_scale)
    new.load_state_dict(state, assign=True)
    new.allow_tf32 = model.allow_tf32  # the same precision and attention sequence as the original
    for mine, theirs in zip(new.blocks, model.blocks):
        mine.attn.sequence = theirs.attn.sequence
    return new.eval().requires_grad_(False)


def cascade_steps(depth: int) -> list[tuple[str, tuple[str, ...]]]:
    """Cascading randomization from the top: the head, then blocks L..1, then the embedding, each
    step keeping what the steps before it randomized. Labels count blocks from 1."""
    steps, parts = [], []
    for part, lab in [("head", "head"), *[(f"block {i}", f"block {i + 1}") for i in reversed(range(depth))]]:
        parts.append(part)
        steps.append((lab, tuple(parts)))
    steps.append(("embedding", (*parts, "embedding")))
    return steps


def independent_steps(depth: int) -> list[tuple[str, tuple[str, ...]]]:
    """Each part alone: the head, each block, the embedding."""
    return [
        ("head", ("head",)),
        *[(f"block {i + 1}", (f"block {i}",)) for i in range(depth)],
        ("embedding", ("embedding",)),
    ]


@dataclass(frozen=True)
class Randomization:
    """Maps after each randomization step and their similarity to the original model's.

    labels: the steps ('original' first); maps[name]: (S, B, gh, gw); spearman/ssim[name]: (S, B)."""

    kind: str
    labels: tuple[str, ...]
    maps: dict[str, np.ndarray]
    spearman: dict[str, np.ndarray]
    ssim: dict[str, np.ndarray]


def randomization(
    model: VisionTransformer,
    pixels: Tensor,
    map_fn: Callable[[Forward], dict[str, np.ndarray]],
    *,
    kind: str = "cascade",
    target: Tensor | None = None,
    gradients: bool = True,
    seed: int = 0,
    original: Forward | None = None,
    progress: Callable[[float], None] | None = None,
) -> Randomization:
    """Recompute the maps (map_fn of each forward pass) while the model's parts are re-initialized,
    cascading from the top (kind='cascade') or one part at a time ('independent'), and compare each
    with the original model's by Spearman rank correlation and SSIM.

    target: (B,) classes for class-specific maps (default each image's top-1 with the original
    weights: the same class is explained at every step). original: the original model's forward
    pass of these pixels, when the caller has it (with gradients for `target` if gradients are
    wanted), so it is not run again."""
    depth = model.config.depth
    steps = cascade_steps(depth) if kind == "cascade" else independent_steps(depth)
    grads = gradients and model.head is not None
    if original is not None and (original.grads is not None) == grads:
        first = original
    else:
        first = run_forward(model, pixels, gradients=grads, target=target)
    if grads and target is None:
        target = first.target
    found = [map_fn(first)]
    for i, (_, parts) in enumerate(steps):
        m = randomized_model(model, parts, seed=seed)
        found.append(map_fn(run_forward(m, pixels, gradients=grads, target=target)))
        if progress is not None:
            progress((i + 1) / len(steps))
    names = list(found[0])
    maps = {k: np.stack([f[k] for f in found]) for k in names}
    return Randomization(
        kind=kind,
        labels=("original", *[lab for lab, _ in steps]),
        maps=maps,
        spearman={k: A.spearman(v, v[0]) for k, v in maps.items()},
        ssim={k: A.ssim(v, v[0]) for k, v in maps.items()},
    )


# ---------------------------------------------------------------------------------------------
# Causal probes: head ablation, token dropping


def head_mask_for(config, heads: Sequence[tuple[int, int]], *, device: torch.device | str = "cpu") -> Tensor | None:
    """(L, H) mask with the listed (layer, head) pairs (counted from 1) removed; None for none.
    On `device` (the forward moves a mask to the model's device if it is elsewhere)."""
    if not heads:
        return None
    m = torch.ones(config.depth, config.num_heads, device=device)
    for layer, h in heads:
        if not (1 <= layer <= config.depth and 1 <= h <= config.num_heads):
            raise ValueError(f"head ({layer}, {h}) is outside {config.depth} layers x {config.num_heads} heads")
        m[layer - 1, h - 1] = 0
    return m


@torch.inference_mode()
def target_scores(model: VisionTransformer, pixels: Tensor, target: Tensor, **forward_kw) -> Tensor:
    """(B,) target logits of one forward pass with the given probes (keep, head_mask, head_fill)."""
    out = model(pixels, output_attentions=False, **forward_kw)
    return out.logits.float().gather(1, target.view(-1, 1).to(out.logits.device))[:, 0].cpu()


def head_effects(
    model: VisionTransformer,
    pixels: Tensor,
    target: int,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    base_mask: Tensor | None = None,
    head_fill: str = "zero",
    batch_size: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> np.ndarray:
    """Drop of the target logit when each head alone is removed on top of base_mask (L, H):
    logit(base) - logit(base with that head removed). pixels (1, 3, H, W).

    heads: (layer, head) pairs counted from 1 (default: every head, returned as (L, H); else
    (len(heads),)). The heads of a layer run as one batch (batch_size at most, default H), from
    the stream entering that layer, which is computed once: ranking every head costs about
    (L + 1) / 2 * H forward passes of one image, not L * H."""
    if model.head is None:
        raise ValueError("head effects follow the target logit: the model has no classifier")
    c = model.config
    L, H = c.depth, c.num_heads
    dev = pixels.device
    base = torch.ones(L, H, device=dev) if base_mask is None else base_mask.to(dev, torch.float32).clone()
    tgt = torch.tensor([target], device=dev)
    ref = float(
        target_scores(model, pixels, tgt, head_mask=base if base_mask is not None else None, head_fill=head_fill)[0]
    )
    pairs = [(la, h) for la in range(1, L + 1) for h in range(1, H + 1)] if heads is None else list(heads)
    for la, h in pairs:
        if not (1 <= la <= L and 1 <= h <= H):
            raise ValueError(f"head ({la}, {h}) is outside {L} layers x {H} heads")
    batch_size = batch_size or min(H, probe_batch_size(c))
    drops = np.zeros(len(pairs))
    by_layer: dict[int, list[int]] = {}
    for i, (la, _) in enumerate(pairs):
        by_layer.setdefault(la - 1, []).append(i)
    fill_mask = base[None]  # (1, L, H)
    done = 0
    with torch.inference_mode(), model.kernel_precision():  # the blocks run here, not through forward
        x = model.embed(pixels)  # (1, T, C): the stream entering block 0, with the base heads removed
        for layer in range(L):
            for start in range(0, len(by_layer.get(layer, [])), batch_size):
                idx = by_layer[layer][start : start + batch_size]
                masks = fill_mask.repeat(len(idx), 1, 1)
                for j, i in enumerate(idx):
                    masks[j, layer, pairs[i][1] - 1] = 0
                y = x.expand(len(idx), -1, -1)
                for i in range(layer, L):  # the blocks before `layer` are the same for every head
                    y, _ = model.blocks[i](y, None, masks[:, i], head_fill)
                logits = model.readout(y)[2].float()
                drops[idx] = ref - logits[:, target].cpu().numpy()
                done += len(idx)
                if progress is not None:
                    progress(done / len(pairs))
            x, _ = model.blocks[layer](x, None, fill_mask[:, layer] if base_mask is not None else None, head_fill)
    return drops.reshape(L, H) if heads is None else drops


def top_share_keep(heat: np.ndarray, share: float) -> np.ndarray:
    """Indices (row-major, ascending) of the ceil(share * N) patches where the map is highest
    (ties: the earlier patch), at least one."""
    order = removal_order(heat, "deletion")
    k = max(1, math.ceil(share * len(order) - 1e-9))
    return np.sort(order[:k])


def scatter_kept(values: np.ndarray, keep: np.ndarray, grid: tuple[int, int], fill: float = np.nan) -> np.ndarray:
    """(..., K) values of the kept patches -> (..., gh, gw) with `fill` where a patch was dropped."""
    gh, gw = grid
    out = np.full((*values.shape[:-1], gh * gw), fill, dtype=np.float64)
    out[..., np.asarray(keep)] = values
    return out.reshape(*values.shape[:-1], gh, gw)
