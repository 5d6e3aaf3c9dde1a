"""load_checkpoint: any supported source -> a ready model with its config, preprocessing and labels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import PRETRAINED, Preprocessing, ViTConfig
from ..device import resolve_device, resolve_dtype
from ..errors import CheckpointError, IncompatibleCheckpointError
from ..linear import pack_linears
from ..pos_embed import resample_pos_embed
from ..resources import DEMO_DIR, IMAGENET_CLASSES
from ..vit import VisionTransformer
from . import convert
from .configs import DEFAULT_PREPROCESSING, Hints, hf_hints, hf_preprocessing, read_json, timm_hints
from .hub import WEIGHT_FILES, download_repo, parse_hub_id
from .infer import infer_config
from .readers import read_weights_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")
VITLENS_FORMAT = "vit-lens"


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, parameters frozen) and everything that travels with it."""

    model: VisionTransformer
    config: ViTConfig
    preprocessing: Preprocessing
    labels: list[str] | None
    family: str
    source: str
    format: str
    name: str

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_embed.dtype


MAX_IMAGE_SIDE = 4096  # pixels; a ViT-B/16 at 4096 px has 65536 tokens, already beyond any memory here


def _check_image_size(image_size) -> None:
    """image_size must be None, a side or (height, width), each an integer in 1..MAX_IMAGE_SIDE
    (0 used to be taken as 'not given')."""
    if image_size is None:
        return
    sides = (image_size, image_size) if isinstance(image_size, int) else image_size
    try:
        ok = len(sides) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in sides
        )
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"image size must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}, got {image_size!r}")


def load_checkpoint(
    source: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    pos_resample: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "fp32",
    overrides: dict | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a ViT from any supported source.

    source: "demo"; a key of model.PRETRAINED; a Google/AugReg .npz; a timm .pth/.bin/.safetensors
        (config.json beside it is used when present); a transformers folder; a folder written by
        ViT Lens; or a hub id ("hf-hub:timm/...", "google/vit-base-patch16-224"), downloaded only here.
    image_size: run at another resolution; position embeddings are resampled with pos_resample
        (default: bicubic with antialias as in timm, or the family's own method).
    overrides: ViTConfig fields to force where shapes cannot tell (e.g. {"num_heads": 16}).
    """
    _check_image_size(image_size)
    src = str(source)
    name = src
    curated = PRETRAINED.get(src)
    if src == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError("the embedded demo model is not installed (assets/demo/ is missing)")
        src = str(DEMO_DIR)
    elif curated is not None:
        name, src = curated.title, curated.source
    path = Path(src).expanduser()
    if path.exists():
        if name == src:  # a local file or folder: its name is the readable part
            name = path.name or src
        tensors, hints, fmt = _read_local(path)
    elif src.startswith("hf-hub:") or (parse_hub_id(src) and not src.startswith((".", "/", "~"))):
        repo = parse_hub_id(src)
        if repo is None:
            raise CheckpointError(f"{src!r} is not a valid hub id (expected org/name)")
        folder = download_repo(repo, cache_dir=cache_dir, endpoint=endpoint, progress=progress)
        tensors, hints, fmt = _read_local(folder)
        if curated is not None:  # the curated table states the preprocessing these weights expect
            hints.preprocessing = curated.preprocessing
            hints.family = curated.family
    else:
        raise CheckpointError(f"no such file or folder, and not a hub id: {src}")
    if progress:
        progress("building the model")
    name = hints.name or name
    return _build(
        tensors,
        hints,
        fmt=fmt,
        source=str(source),
        name=name,
        image_size=image_size,
        pos_resample=pos_resample,
        overrides=overrides or {},
        device=device,
        dtype=dtype,
    )


def _read_local(path: Path) -> tuple[dict[str, Tensor], Hints, str]:
    """-> (tensors in source names, hints from config files, detected format)."""
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            if len(found) != 1:
                raise CheckpointError(
                    f"{path.name}/: expected one weights file ({', '.join(WEIGHT_FILES)} or *.npz/*.pth), "
                    f"found {len(found)}"
                )
            weights = found[0]
        cfg_dir = path
    else:
        weights, cfg_dir = path, path.parent
    tensors = read_weights_file(weights)
    fmt = convert.detect_format(tensors)
    hints = Hints()
    cfg_path = cfg_dir / "config.json"
    if cfg_path.is_file() and (path.is_dir() or fmt == "timm"):
        cfg = read_json(cfg_path)
        if cfg.get("format") == VITLENS_FORMAT:
            hints = _vitlens_hints(cfg)
        elif "model_type" in cfg or "vision_config" in cfg:
            hints = hf_hints(cfg)
            pp_path = cfg_dir / "preprocessor_config.json"
            if pp_path.is_file():
                hints.preprocessing = hf_preprocessing(read_json(pp_path), pp_path.name)
                hints.input_size = hints.preprocessing.input_size
        elif "architecture" in cfg:
            hints = timm_hints(cfg)
    if fmt == "google_npz":
        heads = convert.google_num_heads(tensors)
        if heads:
            hints.config.setdefault("num_heads", heads)
        hints.config.setdefault("act", "gelu_tanh")  # Flax nn.gelu is the tanh approximation
        hints.family = hints.family or "ViT"
        hints.pos_resample = hints.pos_resample or "bilinear"  # as the original JAX code resizes
        # The original evaluation resized straight to the input size (no crop), bilinear, to [-1, 1].
        hints.preprocessing = hints.preprocessing or Preprocessing(
            mode="squash", crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3
        )
    elif fmt == "openai_clip":
        # OpenAI's towers were trained with QuickGELU and LayerNorm eps 1e-5; override "act" for
        # open_clip towers trained with plain GELU.
        hints.config.setdefault("act", "quick_gelu")
        hints.config.setdefault("norm_eps", 1e-5)
        hints.family = hints.family or "CLIP"
    return tensors, hints, fmt


def _vitlens_hints(cfg: dict) -> Hints:
    try:
        conf = dict(cfg["config"])
        conf["image_size"] = tuple(conf["image_size"])
        pre = cfg.get("preprocessing")
        return Hints(
            config=conf,
            name=cfg.get("name"),
            family=cfg.get("family", "ViT"),
            labels=cfg.get("labels"),
            preprocessing=Preprocessing(**pre) if pre else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"ViT Lens config.json is malformed: {e}") from None


def _build(
    tensors: dict[str, Tensor],
    hints: Hints,
    *,
    fmt: str,
    source: str,
    name: str,
    image_size,
    pos_resample: str | None,
    overrides: dict,
    device,
    dtype,
) -> LoadedModel:
    state = convert.to_ours(tensors, fmt)
    if hints.family == "CLIP" and "head.weight" in state and "proj.weight" not in state:
        # timm stores CLIP's projection as a bias-free "head": it gives embeddings, not class logits
        bias = state.get("head.bias")
        if bias is None or not bool(bias.abs().max() > 0):
            state["proj.weight"] = state.pop("head.weight")
            state.pop("head.bias", None)
    hint_cfg = {**hints.config, **overrides}
    config, src_grid = infer_config(state, hint_cfg)
    # The resolution the model runs at: asked for > config file > the checkpoint's own grid.
    target = image_size or hints.input_size or hint_cfg.get("image_size") or config.image_size
    try:
        config = config.with_image_size(target)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    method = pos_resample or hints.pos_resample or "bicubic"
    state["pos_embed"] = resample_pos_embed(
        state["pos_embed"], src_grid=src_grid, dst_grid=config.grid, num_prefix=config.pos_embed_prefix, method=method
    )
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = VisionTransformer(config)
    load_strict(model, state, context=f"{fmt} checkpoint {Path(source).name}", assign=True)
    family = hints.family or _guess_family(config)
    pre = hints.preprocessing or DEFAULT_PREPROCESSING.get(family, DEFAULT_PREPROCESSING["ViT"])
    pre = replace(pre, input_size=config.image_size)
    labels = _labels_for(config, hints.labels)
    dev = resolve_device(device)
    model = model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval().requires_grad_(False)
    if dev.type == "cpu":
        pack_linears(model)  # oneDNN-packed weights for inference; skipped when they would not fit
    return LoadedModel(
        model=model,
        config=config,
        preprocessing=pre,
        labels=labels,
        family=family,
        source=source,
        format=fmt,
        name=name,
    )


def load_strict(model: torch.nn.Module, state: dict[str, Tensor], *, context: str = "", assign: bool = False) -> None:
    """load_state_dict(strict=True), but a mismatch raises one report of every bad key.

    assign: the model's tensors become the (contiguous, dtype-matched) checkpoint tensors instead
    of being copied into; use it for a model built on the meta device (peak memory = one copy)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise IncompatibleCheckpointError(missing=missing, unexpected=unexpected, wrong_shape=wrong, context=context)
    model.load_state_dict(
        {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, strict=True, assign=assign
    )


def _guess_family(config: ViTConfig) -> str:
    if config.distill_token:
        return "DeiT"
    if config.num_registers or config.layer_scale:
        return "DINOv2"
    if config.pre_norm:
        return "CLIP"
    return "ViT"


def _labels_for(config: ViTConfig, labels: list[str] | None) -> list[str] | None:
    if not config.num_classes:
        return None
    if labels is not None:
        if len(labels) == config.num_classes:
            return list(labels)
        log.warning("ignoring %d labels for a %d-class head", len(labels), config.num_classes)
    if config.num_classes == 1000 and IMAGENET_CLASSES.is_file():
        return IMAGENET_CLASSES.read_text(encoding="utf-8").splitlines()
    return None
