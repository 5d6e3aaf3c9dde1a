"""Train the embedded demo ViT on shape scenes, from scratch, on the CPU.

python -m viz_app.demo.train --out runs/demo             # the shipped recipe (see assets/demo/MODEL_CARD.md)
python -m viz_app.demo.train --out runs/smoke --smoke    # seconds; used by the tests

Every batch is generated from (seed, step), so a run is reproducible and resumes exactly from
its last checkpoint (runs/<name>/state.pt, written every --ckpt-every steps and on Ctrl-C).
At the end the weights are exported in ViT Lens format: model.safetensors + config.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import Preprocessing, VisionTransformer, ViTConfig
from viz_app.demo.scenes import CLASSES, make_batch, patch_shares

log = logging.getLogger("viz_app.demo.train")
MEAN = STD = (0.5, 0.5, 0.5)
EVAL_SEED = 1_000_003  # held-out scenes for the progress log; the final scores use another seed


@dataclass
class Recipe:
    image_size: int = 96
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: int = 4
    global_pool: str = "token"
    # Early-convolution stem widths (Xiao et al. 2021), the allowed fallback: the plain
    # linear embedding reached 54 % in 8000 steps and 0.28 training accuracy at step 400, where the
    # stem reached 0.71. "" gives the paper's linear patch embedding.
    conv_stem: str = "48,96,192"
    steps: int = 16000
    batch_size: int = 64
    lr: float = 5e-4  # with the conv stem; a plain ViT needed 1.5e-4 (3e-4 and 1e-3 stayed at chance)
    min_lr: float = 1e-5
    warmup: int = 500
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    # Curriculum: difficulty starts at 0 (one large shape on a smooth background) and rises by
    # `curriculum_step` whenever the training accuracy of the last log window reaches
    # `curriculum_acc`; 1 is the full task. Set curriculum_step = 1 to train on the full task only.
    # Difficulty never lags a linear ramp that reaches 1 at `full_task_at` of the steps, so the
    # last part of training is always on the full task.
    curriculum_acc: float = 0.8
    curriculum_step: float = 0.1
    full_task_at: float = 0.6
    seed: int = 0
    bf16: bool = True
    pool: int = 0  # 0: fresh scenes every step; n > 0: cycle through n fixed batches (smoke runs)
    # Token labeling (Jiang et al. 2021): an auxiliary linear head on the final patch tokens,
    # used only in training, predicts the target class on patches that the target covers by at
    # least token_label_min, "background" elsewhere. The shipped model is a plain ViT; the
    # classifier and every view read the class token.
    token_label_weight: float = 0.5
    token_label_min: float = 0.25

    def config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_ratio * self.embed_dim,
            num_classes=len(CLASSES),
            global_pool=self.global_pool,
            conv_stem=tuple(int(c) for c in self.conv_stem.split(",") if c.strip()),
        )


# Seconds: a small model memorizes two fixed batches of scenes, so the loss must fall.
SMOKE = dict(
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    steps=40,
    batch_size=32,
    warmup=5,
    lr=3e-3,
    pool=2,
    curriculum_step=1.0,
    label_smoothing=0.0,
    conv_stem="8,16",
)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalized with MEAN/STD."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - 0.5) / 0.5


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def batch_for(step: int, r: Recipe, difficulty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> pixels (B, 3, S, S), labels (B,), patch labels (B, N): class on the target, 8 elsewhere."""
    seq = np.random.SeedSequence([r.seed, step % r.pool if r.pool else step])
    images, labels, masks = make_batch(seq, r.batch_size, size=r.image_size, difficulty=difficulty)
    on_target = patch_shares(masks, r.patch_size).reshape(len(labels), -1) >= r.token_label_min
    patch_labels = np.where(on_target, labels[:, None], len(CLASSES))
    return to_pixels(images), torch.from_numpy(labels), torch.from_numpy(patch_labels)


def build(r: Recipe) -> VisionTransformer:
    torch.manual_seed(r.seed)
    model = VisionTransformer(r.config())
    model.init_weights(seed=r.seed)
    with torch.no_grad():  # a zero head starts every class at equal odds (as timm does)
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


def optimizer_for(model: VisionTransformer, r: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "token" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "token" not in n)
    ]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.999))


@torch.no_grad()
def evaluate(model: VisionTransformer, r: Recipe, n: int = 512, seed: int = EVAL_SEED) -> float:
    model.eval()
    images, labels, _ = make_batch(seed, n, size=r.image_size, difficulty=1.0)
    correct = 0
    for i in range(0, n, 128):
        x = to_pixels(images[i : i + 128])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
            logits = model(x, output_attentions=False).logits
        correct += int((logits.argmax(-1) == torch.from_numpy(labels[i : i + 128])).sum())
    model.train()
    return correct / n


def export(model: VisionTransformer, r: Recipe, out: Path, info: dict) -> None:
    """Weights + config in ViT Lens format (loads through load_checkpoint)."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    pre = Preprocessing(
        input_size=(r.image_size, r.image_size), crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD
    )
    config = {
        "format": "vit-lens",
        "name": "ViT Lens demo: shape scenes",
        "family": "ViT",
        "config": model.config.to_dict(),
        "preprocessing": pre.to_dict(),
        "labels": list(CLASSES),
        "training": {"recipe": asdict(r), **info},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def train(
    r: Recipe, out: Path, *, ckpt_every: int = 500, log_every: int = 50, eval_every: int = 1000, eval_n: int = 512
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = build(r)
    aux = torch.nn.Linear(r.embed_dim, len(CLASSES) + 1)  # training only: token labels
    torch.nn.init.zeros_(aux.weight)
    torch.nn.init.zeros_(aux.bias)
    opt = optimizer_for(model, r)
    opt.add_param_group({"params": list(aux.parameters()), "weight_decay": 0.0})
    state_path = out / "state.pt"
    step, elapsed, history = 0, 0.0, []
    difficulty = 1.0 if r.curriculum_step >= 1 else 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["recipe"] != asdict(r):
            raise SystemExit(f"{state_path} was written by another recipe; use a new --out folder")
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        difficulty = state["difficulty"]
        log.info("resumed at step %d (%.0f s trained)", step, elapsed)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "recipe": asdict(r),
                "model": model.state_dict(),
                "aux": aux.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "difficulty": difficulty,
            },
            tmp,
        )
        tmp.replace(state_path)

    stop = {"now": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    model.train()
    t_last, seen, loss_sum, correct = time.monotonic(), 0, 0.0, 0
    try:
        while step < r.steps and not stop["now"]:
            difficulty = max(difficulty, min(1.0, step / max(1.0, r.full_task_at * r.steps)))
            x, y, y_patch = batch_for(step, r, difficulty)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, r)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
                fwd = model(x, output_attentions=False, output_tokens=r.token_label_weight > 0)
            logits = fwd.logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
            if r.token_label_weight > 0:
                patch_logits = aux(fwd.tokens[:, model.config.num_prefix_tokens :].float())  # (B, N, 9)
                loss = loss + r.token_label_weight * F.cross_entropy(patch_logits.flatten(0, 1), y_patch.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *aux.parameters()], 1.0)
            opt.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            now = time.monotonic()
            if step % log_every == 0 or step == r.steps:
                elapsed += now - t_last
                entry = {
                    "step": step,
                    "loss": loss_sum / seen,
                    "train_acc": correct / seen,
                    "lr": lr_at(step - 1, r),
                    "difficulty": difficulty,
                    "img_s": seen / (now - t_last),
                    "elapsed_s": elapsed,
                }
                if entry["train_acc"] >= r.curriculum_acc and difficulty < 1.0:
                    difficulty = min(1.0, round(difficulty + r.curriculum_step, 6))
                if step % eval_every == 0 or step == r.steps:
                    entry["eval_acc"] = evaluate(model, r, n=eval_n)
                history.append(entry)
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
                t_last, seen, loss_sum, correct = time.monotonic(), 0, 0.0, 0
            if step % ckpt_every == 0:
                save()
    finally:
        signal.signal(signal.SIGINT, previous)
        save()
    if step >= r.steps:
        export(model, r, out, {"steps": step, "train_time_s": round(elapsed, 1), "history": history})
    return {"step": step, "elapsed_s": elapsed, "history": history}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-lens demo-train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the same code")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = dict(SMOKE) if a.smoke else {}
    for name in ("steps", "batch_size", "lr", "seed"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    fields = Recipe.__dataclass_fields__
    for item in a.set:
        name, _, value = item.partition("=")
        if name not in fields:
            p.error(f"unknown recipe field {name!r}")
        kind = type(getattr(Recipe(), name))
        kw[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if a.smoke:
        result = train(Recipe(**kw), a.out, log_every=5, eval_every=20, eval_n=64)
    else:
        result = train(Recipe(**kw), a.out)
    return 0 if result["step"] >= Recipe(**kw).steps else 1


if __name__ == "__main__":
    raise SystemExit(main())
