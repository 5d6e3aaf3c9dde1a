"""load_checkpoint: any supported source -> a ready model with its config, preprocessing and labels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import (
    MAX_IMAGE_SIDE,
    PRETRAINED,
    ConfigValueError,
    Preprocessing,
    ViTConfig,
    check_image_size,
    shown,
)
from ..device import resolve_device, to_precision
from ..errors import CheckpointError, IncompatibleCheckpointError, first_line
from ..linear import pack_linears
from ..pos_embed import resample_pos_embed
from ..resources import DEMO_DIR, IMAGENET_CLASSES
from ..vit import VisionTransformer
from . import convert
from .configs import DEFAULT_PREPROCESSING, Hints, hf_hints, hf_preprocessing, read_json, timm_hints
from .hub import WEIGHT_FILES, download_repo, parse_hub_id
from .infer import infer_config, param_count
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

    @property
    def precision(self) -> str:
        """ "fp32", "tf32", "bf16" or "fp16": the dtype, and whether TF32 products are allowed."""
        return self.model.precision


# The memory a model may take beyond what its checkpoint's tensors hold, in float32. Every parameter
# must be a tensor of the file (infer_config and the structural check below), except the position
# embedding resampled to another image size: a checkpoint of a few kB with a wide patch embedding
# asked to run at 4096 px would otherwise allocate gigabytes. A model whose resampled position
# embedding passes this has attention maps (T^2 per head and layer) far beyond any memory anyway.
MAX_UNBACKED_BYTES = 512 * 2**20
# A sanity bound on the whole model in float32 (ViT-G/14, the largest supported ViT, is 7.4 GB).
MAX_MODEL_BYTES = 16 * 2**30


def _check_image_size(image_size) -> None:
    """image_size must be None, a side or (height, width), each an integer in 1..MAX_IMAGE_SIDE
    (0 used to be taken as 'not given')."""
    if image_size is None:
        return
    try:
        check_image_size("load_checkpoint", "image_size", image_size)
    except ConfigValueError:
        raise ValueError(
            f"image size must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}, got {shown(image_size)}"
        ) from None


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
        tensors, hints, fmt, where = _read_local(path)
    elif src.startswith("hf-hub:") or (parse_hub_id(src) and not src.startswith((".", "/", "~"))):
        repo = parse_hub_id(src)
        if repo is None:
            raise CheckpointError(f"{src!r} is not a valid hub id (expected org/name)")
        folder = download_repo(repo, cache_dir=cache_dir, endpoint=endpoint, progress=progress)
        tensors, hints, fmt, where = _read_local(folder)
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
        where=where,
        image_size=image_size,
        pos_resample=pos_resample,
        overrides=overrides or {},
        device=device,
        dtype=dtype,
    )


def _read_local(path: Path) -> tuple[dict[str, Tensor], Hints, str, str]:
    """-> (tensors in source names, hints from config files, detected format, the weights file's name)."""
    try:
        return _read_local_files(path)
    except OSError as e:  # an unreadable folder or config file: one message, not a traceback
        raise CheckpointError(f"{path.name or path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _read_local_files(path: Path) -> tuple[dict[str, Tensor], Hints, str, str]:
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
    try:
        fmt = convert.detect_format(tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{weights.name}: {e}") from None
    hints = Hints()
    cfg_path = cfg_dir / "config.json"
    if cfg_path.is_file() and (path.is_dir() or fmt == "timm"):
        cfg = read_json(cfg_path)
        if cfg.get("format") == VITLENS_FORMAT:
            hints = _vitlens_hints(cfg, cfg_path.name)
        elif "model_type" in cfg or "vision_config" in cfg:
            hints = hf_hints(cfg, cfg_path.name)
            pp_path = cfg_dir / "preprocessor_config.json"
            if pp_path.is_file():
                hints.preprocessing = hf_preprocessing(read_json(pp_path), pp_path.name)
                hints.input_size = hints.preprocessing.input_size
        elif "architecture" in cfg:
            hints = timm_hints(cfg, cfg_path.name)
    if fmt == "google_npz":
        heads = convert.google_num_heads(tensors)
        if heads and "num_heads" not in hints.config:
            hints.config["num_heads"] = heads
            hints.origin["num_heads"] = f"{weights.name} (its query kernels' head axis)"
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
    return tensors, hints, fmt, weights.name


MAX_NAME_CHARS = 200  # a model's display name from its config file


def _vitlens_hints(cfg: dict, where: str = "config.json") -> Hints:
    """A config.json written by ViT Lens: a whole ViTConfig, preprocessing, labels, name, family.
    Each value is checked (ViTConfig's and Preprocessing's own checks); a failure names the key."""
    conf = cfg.get("config")
    if not isinstance(conf, dict) or "image_size" not in conf:
        raise CheckpointError(f"{where}: config must be a JSON object with the model's fields, got {shown(conf)}")
    unknown = sorted(set(conf) - set(ViTConfig.__dataclass_fields__), key=str)
    if unknown:
        raise CheckpointError(f"{where}: config.{shown(unknown[0])[1:-1]} is not a ViTConfig field")
    try:
        full = ViTConfig.from_dict(conf)
    except ConfigValueError as e:
        raise CheckpointError(e.named(where, f"config.{e.field}")) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config is not a valid ViT configuration: {first_line(e)}") from None
    hints = {k: getattr(full, k) for k in conf}  # the fields the file states, checked and normalised
    pre = cfg.get("preprocessing")
    if pre is not None and not isinstance(pre, dict):
        raise CheckpointError(f"{where}: preprocessing must be a JSON object, got {shown(pre)}")
    unknown = sorted(set(pre or {}) - set(Preprocessing.__dataclass_fields__), key=str)
    if unknown:
        raise CheckpointError(f"{where}: preprocessing.{shown(unknown[0])[1:-1]} is not a preprocessing field")
    try:
        preprocessing = Preprocessing(**pre) if pre else None
    except ConfigValueError as e:
        raise CheckpointError(e.named(where, f"preprocessing.{e.field}")) from None
    labels = cfg.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
        raise CheckpointError(f"{where}: labels must be a list of strings, got {shown(labels)}")
    name, family = cfg.get("name"), cfg.get("family", "ViT")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{where}: name must be a string, got {shown(name)}")
    if not (isinstance(family, str) and 0 < len(family) <= 40):
        raise CheckpointError(f"{where}: family must be a short string, got {shown(family)}")
    return Hints(
        config=hints,
        origin={k: f"{where} (config.{k})" for k in hints},
        name=name[:MAX_NAME_CHARS] if name else None,
        family=family,
        labels=labels,
        preprocessing=preprocessing,
    )


def _build(
    tensors: dict[str, Tensor],
    hints: Hints,
    *,
    fmt: str,
    source: str,
    name: str,
    where: str,
    image_size,
    pos_resample: str | None,
    overrides: dict,
    device,
    dtype,
) -> LoadedModel:
    """Tensors + hints -> a model. Everything a file states is checked before anything is built:
    infer_config bounds every size and refuses hints the tensors contradict, the tensors are
    compared key by key with the model's parameters (arithmetic on the meta device), and the memory
    the model needs at the target size is checked before the position embedding is resampled."""
    context = f"{fmt} checkpoint {where}"
    origin = {**hints.origin, **{k: f"overrides ({k})" for k in overrides}}
    try:
        state = convert.to_ours(tensors, fmt)
        if hints.family == "CLIP" and "head.weight" in state and "proj.weight" not in state:
            # timm stores CLIP's projection as a bias-free "head": it gives embeddings, not class logits
            bias = state.get("head.bias")
            if bias is None or not bool(bias.abs().max() > 0):
                state["proj.weight"] = state.pop("head.weight")
                state.pop("head.bias", None)
        config, src_grid = infer_config(state, {**hints.config, **overrides}, origin)
    except IncompatibleCheckpointError:
        raise
    except CheckpointError as e:  # name the weights file (a config file's name is in the message already)
        raise CheckpointError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
        # a converter meeting a tensor of an unexpected rank or a missing key: one message
        raise CheckpointError(f"{where}: not a usable {fmt} checkpoint ({type(e).__name__})") from None
    with torch.device("meta"):  # sizes bounded above; meta tensors take no memory
        check_fits(VisionTransformer(config), state, context=context)
    # The resolution the model runs at: asked for > config file > the checkpoint's own grid.
    target = image_size or hints.input_size or {**hints.config, **overrides}.get("image_size") or config.image_size
    try:
        config = config.with_image_size(target)
    except ValueError as e:
        raise CheckpointError(f"{where}: cannot run at image size {shown(target)}: {first_line(e)}") from None
    _check_model_memory(config, state, where)
    method = pos_resample or hints.pos_resample or "bicubic"
    state["pos_embed"] = resample_pos_embed(
        state["pos_embed"], src_grid=src_grid, dst_grid=config.grid, num_prefix=config.pos_embed_prefix, method=method
    )
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = VisionTransformer(config)
    load_strict(model, state, context=context, assign=True)
    family = hints.family or _guess_family(config)
    pre = hints.preprocessing or DEFAULT_PREPROCESSING.get(family, DEFAULT_PREPROCESSING["ViT"])
    pre = replace(pre, input_size=config.image_size)
    labels = _labels_for(config, hints.labels)
    dev = resolve_device(device)
    model = to_precision(model, dev, dtype).eval().requires_grad_(False)
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


def _check_model_memory(config: ViTConfig, state: dict[str, Tensor], where: str) -> None:
    """The model's float32 bytes (param_count, by arithmetic) against MAX_MODEL_BYTES, and the part
    of them the checkpoint's tensors do not hold (a position embedding resampled to a larger image)
    against MAX_UNBACKED_BYTES; before anything of that size is allocated."""
    need = 4 * param_count(config)
    held = 4 * sum(t.numel() for t in state.values())
    h, w = config.image_size
    if need > MAX_MODEL_BYTES:
        raise CheckpointError(
            f"{where}: the model at {h}x{w} px would take {need / 2**30:.1f} GB; "
            f"at most {MAX_MODEL_BYTES // 2**30} GB is accepted"
        )
    if need - held > MAX_UNBACKED_BYTES:
        raise CheckpointError(
            f"{where}: running at {h}x{w} px needs {(need - held) / 2**20:.0f} MB of position embeddings beyond "
            f"the checkpoint's own (at most {MAX_UNBACKED_BYTES // 2**20} MB); choose a smaller image size"
        )


MAX_KEY_CHARS = 80  # a key quoted in a mismatch report is cut to this


def _key(k: str) -> str:
    return k if len(k) <= MAX_KEY_CHARS else k[: MAX_KEY_CHARS - 3] + "..."


def check_fits(model: torch.nn.Module, state: dict[str, Tensor], *, context: str = "") -> None:
    """Raise one IncompatibleCheckpointError naming every missing, unexpected and wrong-shape key.
    Compares names and shapes only: works on a model built on the meta device."""
    expected = model.state_dict()
    missing = [_key(k) for k in expected if k not in state]
    unexpected = [_key(k) for k in state if k not in expected]
    wrong = [
        (_key(k), tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise IncompatibleCheckpointError(missing=missing, unexpected=unexpected, wrong_shape=wrong, context=context)


def load_strict(model: torch.nn.Module, state: dict[str, Tensor], *, context: str = "", assign: bool = False) -> None:
    """load_state_dict(strict=True), but a mismatch raises one report of every bad key.

    assign: the model's tensors become the (contiguous, dtype-matched) checkpoint tensors instead
    of being copied into; use it for a model built on the meta device (peak memory = one copy)."""
    check_fits(model, state, context=context)
    expected = model.state_dict()
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
