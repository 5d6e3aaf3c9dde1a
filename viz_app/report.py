"""One analysis, one report format: what the app shows, what its Download tab writes and what the
batch CLI writes, for one image or a batch.

`analyze_batch(lm, fwd, settings)` turns one forward pass of a batch into every per-image array
of the schema below (batch first); `Report` holds one image's arrays with the metadata that
produced them, and `Report.npz_bytes()` writes them (the Download tab and the CLI call the same
function). SCHEMA lists every key with shape, dtype, units and convention; the README and the
Download tab print it from here.

Shapes: L layers, H heads, T tokens, (gh, gw) the patch grid, C classes, F features, (Hpx, Wpx)
the model input in pixels. Token order: [class, distillation, registers..., patches row-major].
"""

from __future__ import annotations

import io
import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import Tensor

from model.weights.load import LoadedModel
from viz_app import analysis as A
from viz_app.pipeline import Forward, run_forward

SCHEMA_VERSION = 1
FUSIONS = ("mean", "max", "min")
# Class-specific maps: method -> what the page calls it (docs/DEFINITIONS.md)
CLASS_MAPS = {
    "gradient": "gradient rollout (Chefer et al., ICCV 2021)",
    "lrp": "Transformer Attribution: LRP with attention gradients (Chefer et al., CVPR 2021)",
}
CLASS_METHODS = tuple(CLASS_MAPS)
READOUTS = ("auto", "cls", "dist", "mean", "patches")


@dataclass(frozen=True)
class Settings:
    """Every choice that changes a number in a report; the defaults are the paper's settings.

    Layers and heads are counted from 1 here and on the page; patch rows and columns from 0.
    """

    rollout_fusion: str = "mean"  # mean | max | min over heads
    rollout_discard: float = 0.0  # share of the lowest fused entries zeroed per layer
    rollout_readout: str = "auto"  # auto | cls | dist | mean | patches
    rollout_first_layer: int = 1  # 1-based, inclusive
    rollout_last_layer: int | None = None  # 1-based, inclusive; None = the last layer
    query_patch: tuple[int, int] | None = None  # (row, col) of a patch query; None = the read-out token
    drop_prefix: bool = False  # per-head maps renormalized over the patches
    grad_rollout: bool = False  # also the gradient rollout (one backward pass)
    grad_class: int | None = None  # its class; None = each image's top-1
    save_attentions: bool = False  # also every attention map (L, H, T, T)
    mask_tau: float = 0.6  # share of the attention mass each mass-threshold mask keeps (DINO's 0.6)
    class_method: str = "gradient"  # the class-specific maps: gradient (ICCV 2021) | lrp (CVPR 2021)
    class_maps: int = 0  # the maps of the top-k classes side by side (0 = none)
    contrast_classes: tuple[int, int] | None = None  # (A, B) of the contrastive map; None = none
    high_norm_factor: float = 2.0  # a patch token is high-norm above this x its layer's median patch norm
    budget_queries: str = "patches"  # whose attention token_budget averages: patches | readout | all

    def __post_init__(self) -> None:
        problems = []
        if self.rollout_fusion not in FUSIONS:
            problems.append(f"rollout_fusion must be one of {FUSIONS}")
        if not 0.0 <= self.rollout_discard < 1.0:
            problems.append("rollout_discard must be in [0, 1)")
        if self.rollout_readout not in READOUTS:
            problems.append(f"rollout_readout must be one of {READOUTS}")
        if self.rollout_first_layer < 1:
            problems.append("rollout_first_layer counts from 1")
        if not 0.0 < self.mask_tau <= 1.0:
            problems.append("mask_tau must be in (0, 1]")
        if self.class_method not in CLASS_METHODS:
            problems.append(f"class_method must be one of {CLASS_METHODS}")
        if self.class_maps < 0:
            problems.append("class_maps must be 0 or more")
        if not self.high_norm_factor > 0:
            problems.append("high_norm_factor must be positive")
        if self.budget_queries not in A.tokens.QUERIES:
            problems.append(f"budget_queries must be one of {A.tokens.QUERIES}")
        if problems:
            raise ValueError("; ".join(problems))
        for name in ("query_patch", "contrast_classes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("query_patch", "contrast_classes"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**d)

    def layer_range(self, depth: int) -> tuple[int, int]:
        """(first, last), 1-based inclusive, checked against the model's depth."""
        last = depth if self.rollout_last_layer is None else self.rollout_last_layer
        if not 1 <= self.rollout_first_layer <= last <= depth:
            raise ValueError(f"rollout layers {self.rollout_first_layer}-{last} are outside 1-{depth}")
        return self.rollout_first_layer, last


@dataclass(frozen=True)
class Field:
    key: str
    shape: str
    dtype: str
    units: str
    convention: str
    when: str = "always"


SCHEMA: tuple[Field, ...] = (
    Field("logits", "(C,)", "float32", "logit", "the classifier's output", "models with a classifier"),
    Field("probabilities", "(C,)", "float32", "probability", "softmax of logits", "models with a classifier"),
    Field(
        "top5_classes", "(k,)", "int64", "class index", "k = min(5, C), most probable first", "models with a classifier"
    ),
    Field(
        "top5_probabilities",
        "(k,)",
        "float32",
        "probability",
        "the probabilities of top5_classes",
        "models with a classifier",
    ),
    Field("features", "(F,)", "float32", "-", "the pooled features the classifier reads (pre-logits)"),
    Field(
        "rollout",
        "(gh, gw)",
        "float32",
        "share of read-out attention",
        "attention rollout with the settings' fusion, discard ratio, read-out and layers; the read-out row of the rolled-out matrix over the patches",
    ),
    Field(
        "grad_rollout",
        "(gh, gw)",
        "float32",
        "relevance (unnormalized)",
        "gradient rollout (Chefer et al. ICCV 2021) for grad_class",
        "settings.grad_rollout",
    ),
    Field(
        "transformer_attribution",
        "(gh, gw)",
        "float32",
        "relevance (unnormalized)",
        "Transformer Attribution (Chefer et al. CVPR 2021): LRP relevance of each layer's attention times its "
        "gradient, positive part, head mean, rolled out with the identity added; for grad_class",
        "settings.grad_rollout and class_method lrp (CLI: --grad-rollout --class-method lrp)",
    ),
    Field(
        "grad_class",
        "()",
        "int64",
        "class index",
        "the class of grad_rollout or transformer_attribution",
        "settings.grad_rollout",
    ),
    Field(
        "class_maps",
        "(k, gh, gw)",
        "float32",
        "relevance (unnormalized)",
        "the class-specific map (settings.class_method) of each of the top-k classes, most probable first",
        "settings.class_maps > 0 (the Classes tab; CLI: --class-maps K)",
    ),
    Field("class_map_classes", "(k,)", "int64", "class index", "the classes of class_maps", "settings.class_maps > 0"),
    Field(
        "contrastive_map",
        "(gh, gw)",
        "float32",
        "share of relevance",
        "class A's map divided by its total minus class B's divided by its total (sums to 0; > 0: more for A)",
        "settings.contrast_classes (the Classes tab; CLI: --contrast A B)",
    ),
    Field(
        "contrastive_classes", "(2,)", "int64", "class index", "(A, B) of contrastive_map", "settings.contrast_classes"
    ),
    Field(
        "readout_attention",
        "(L, H, gh, gw)",
        "float32",
        "attention probability",
        "each head's read-out row over the patches (prefix columns left out; renormalized over the patches when settings.drop_prefix)",
    ),
    Field(
        "query_attention",
        "(L, H, gh, gw)",
        "float32",
        "attention probability",
        "each head's row of the query patch settings.query_patch, as readout_attention",
        "settings.query_patch",
    ),
    Field(
        "head_masks",
        "(L, H, gh, gw)",
        "bool",
        "patch kept",
        "mass-threshold mask (DINO) of each map of query_attention, else readout_attention: the smallest set of "
        "patches holding settings.mask_tau of the map's patch mass",
    ),
    Field(
        "rollout_per_layer",
        "(L, gh, gw)",
        "float32",
        "share of read-out attention",
        "the rollout (settings' fusion, discard and read-out) from layer 1 to each layer; the last equals the "
        "rollout over all layers",
    ),
    Field("rollout_mask", "(gh, gw)", "bool", "patch kept", "mass-threshold mask of rollout at settings.mask_tau"),
    Field(
        "mask_iou_heads",
        "(L, H)",
        "float32",
        "IoU in [0, 1]",
        "pixel IoU of each head_masks mask with the scene's ground-truth target mask",
        "demo scenes (the app)",
    ),
    Field("mask_iou_rollout", "()", "float32", "IoU in [0, 1]", "the same for rollout_mask", "demo scenes (the app)"),
    Field(
        "token_budget",
        "(L, H, P+1)",
        "float32",
        "share in [0, 1]",
        "mean over the queries settings.budget_queries names (default: the patch queries) of the attention on "
        "each prefix token (class, distillation, registers, in token order), then on the high-norm patch tokens "
        "of the layer's input (last column)",
    ),
    Field(
        "high_norm_patches",
        "(L, N)",
        "bool",
        "patch is high-norm",
        "patch tokens at each layer's input whose norm exceeds settings.high_norm_factor x the layer's median "
        "patch-token norm (Darcet et al. 2024)",
    ),
    Field(
        "mean_attention_distance",
        "(L, H)",
        "float32",
        "pixels of the model input",
        "mean over patch queries of the attention-weighted distance to patches; mass on prefix tokens counts as distance 0 (the authors' convention)",
    ),
    Field(
        "mean_attention_distance_renormalized",
        "(L, H)",
        "float32",
        "pixels of the model input",
        "the same with each query's patch attention renormalized to sum 1",
    ),
    Field(
        "prefix_mass_share",
        "(L, H)",
        "float32",
        "share in [0, 1]",
        "mean over patch queries of the attention mass on prefix tokens; where it is high the two distance conventions disagree",
    ),
    Field("attention_entropy", "(L, H)", "float32", "nats", "mean over all queries of each attention row's entropy"),
    Field(
        "token_norms",
        "(L+1, T)",
        "float32",
        "L2 norm",
        "each token's norm after the embedding (row 0) and after each block",
    ),
    Field("model_view", "(Hpx, Wpx, 3)", "uint8", "RGB", "the image the model sees, after resize and crop"),
    Field(
        "attentions",
        "(L, H, T, T)",
        "float32",
        "attention probability",
        "every post-softmax map, rows sum to 1",
        "settings.save_attentions",
    ),
    # the second model of the Compare tab (the first model's arrays are the report's own)
    Field(
        "compare_layers",
        "(2,)",
        "int64",
        "layer (from 1)",
        "the per-head maps' layers: first, second model; the second at the same relative depth",
        "a second model (the Compare tab)",
    ),
    Field(
        "compare_heads",
        "(2,)",
        "int64",
        "head (from 1)",
        "the heads shown large: first, second model",
        "a second model",
    ),
    Field(
        "compare_rollout_b",
        "(gh_b, gw_b)",
        "float32",
        "share of read-out attention",
        "the second model's rollout with the settings' fusion, discard and read-out, its layers at the same relative depth as rollout's",
        "a second model",
    ),
    Field(
        "compare_rollout_layers_b",
        "(2,)",
        "int64",
        "layer (from 1)",
        "first and last layer of compare_rollout_b",
        "a second model",
    ),
    Field(
        "compare_readout_attention_b",
        "(L_b, H_b, gh_b, gw_b)",
        "float32",
        "attention",
        "as readout_attention, the second model",
        "a second model",
    ),
    Field(
        "compare_query_patch_b",
        "(2,)",
        "int64",
        "patch (row, col) from 0",
        "the second model's patch under the centre of query_patch in the original image (the nearest one outside its crop)",
        "a second model and settings.query_patch",
    ),
    Field(
        "compare_query_attention_b",
        "(L_b, H_b, gh_b, gw_b)",
        "float32",
        "attention",
        "as query_attention, the second model, for compare_query_patch_b",
        "a second model and settings.query_patch",
    ),
    Field(
        "compare_mean_attention_distance_b",
        "(L_b, H_b)",
        "float32",
        "pixels",
        "as mean_attention_distance, the second model",
        "a second model",
    ),
    Field(
        "compare_mean_attention_distance_renormalized_b",
        "(L_b, H_b)",
        "float32",
        "pixels",
        "as mean_attention_distance_renormalized, the second model",
        "a second model",
    ),
    Field(
        "compare_prefix_mass_share_b",
        "(L_b, H_b)",
        "float32",
        "share",
        "as prefix_mass_share, the second model",
        "a second model",
    ),
    Field(
        "compare_grad_rollout_b",
        "(gh_b, gw_b)",
        "float32",
        "relevance (unnormalized)",
        "as grad_rollout, the second model, for compare_grad_class_b",
        "a second model with a classifier, class_method gradient",
    ),
    Field(
        "compare_transformer_attribution_b",
        "(gh_b, gw_b)",
        "float32",
        "relevance (unnormalized)",
        "as transformer_attribution, the second model, for compare_grad_class_b",
        "a second model with a classifier, class_method lrp",
    ),
    Field(
        "compare_grad_class_b",
        "()",
        "int64",
        "class index",
        "the second model's class: grad_class when both models have the same classes, else its own top-1",
        "a second model with a classifier",
    ),
    Field(
        "report_json",
        "()",
        "str",
        "-",
        "JSON: schema version, settings, display, model, preprocessing, image, device, dtype, versions",
    ),
)
KEYS = tuple(f.key for f in SCHEMA)
DTYPES = {f.key: f.dtype for f in SCHEMA}


def schema_markdown() -> str:
    """The schema as a markdown table (README, Download tab)."""
    rows = ["| key | shape | dtype | units | what | present |", "|---|---|---|---|---|---|"]
    rows += [f"| `{f.key}` | {f.shape} | {f.dtype} | {f.units} | {f.convention} | {f.when} |" for f in SCHEMA]
    return "\n".join(rows)


def _distances(attn: Tensor, lm: LoadedModel) -> dict[str, Tensor]:
    """Both distance conventions and the prefix share, each from its own definition (a shortcut
    through 1 - share is exact only for rows that sum to 1, which bf16 rows do not quite), in one
    pass over the maps (A.distance_statistics)."""
    c = lm.config
    s = A.distance_statistics(attn, num_prefix=c.num_prefix_tokens, grid=c.grid, patch_size=c.patch_size)
    return {
        "mean_attention_distance": s["as_is"],
        "mean_attention_distance_renormalized": s["renormalized"],
        "prefix_mass_share": s["prefix_mass_share"],
    }


def rollout_options(config, settings: Settings) -> dict:
    """attention_rollout's keywords for these settings (its layers counted from 0); the page's
    rollout views and analyze_batch all take them from here."""
    first, last = settings.layer_range(config.depth)
    return dict(
        num_prefix=config.num_prefix_tokens,
        grid=config.grid,
        readout_tokens=config.readout_tokens,
        readout=settings.rollout_readout,
        head_fusion=settings.rollout_fusion,
        discard_ratio=settings.rollout_discard,
        start=first - 1,
        end=last - 1,
    )


def per_layer_options(config, settings: Settings) -> dict:
    """rollout_per_layer's keywords for these settings: rollout_options without the layer range
    (every map starts at layer 1 and ends at each layer in turn)."""
    return {k: v for k, v in rollout_options(config, settings).items() if k not in ("start", "end")}


def analyze_batch(lm: LoadedModel, fwd: Forward, settings: Settings) -> dict[str, np.ndarray]:
    """Every schema array for a batch, batch first, as numpy (report_json excepted).

    fwd: run_forward's output for the batch, with gradients when settings.grad_rollout (the
    gradient of settings.grad_class, or of each image's top-1)."""
    c = lm.config
    attn = fwd.attentions  # (B, L, H, T, T)
    kw = dict(num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens)
    options = rollout_options(c, settings)
    rollouts = A.rollout_per_layer(attn, **per_layer_options(c, settings))  # (B, L, gh, gw): from layer 1 to each layer
    whole = options["start"] == 0 and options["end"] == c.depth - 1  # then the last one is the rollout
    out: dict[str, Tensor] = {
        "features": fwd.features,
        "rollout": rollouts[:, -1] if whole else A.attention_rollout(attn, **options),
        "rollout_per_layer": rollouts,
        "readout_attention": A.attention_maps(attn, drop_prefix=settings.drop_prefix, **kw),
        **_distances(attn, lm),
        "attention_entropy": A.attention_entropy(attn),
        "token_norms": fwd.token_norms,
    }
    if fwd.logits is not None:
        probs = fwd.logits.float().softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        out |= {
            "logits": fwd.logits,
            "probabilities": probs,
            "top5_classes": top.indices,
            "top5_probabilities": top.values,
        }
    if settings.query_patch is not None:
        r, col = settings.query_patch
        gh, gw = c.grid
        if not (0 <= r < gh and 0 <= col < gw):
            raise ValueError(f"query patch ({r}, {col}) is outside the {gh}x{gw} grid")
        q = c.num_prefix_tokens + r * gw + col
        out["query_attention"] = A.attention_maps(attn, query=q, drop_prefix=settings.drop_prefix, **kw)
    shown = out.get("query_attention", out["readout_attention"])
    out["head_masks"] = A.mass_threshold_mask(shown, settings.mask_tau)
    out["rollout_mask"] = A.mass_threshold_mask(out["rollout"], settings.mask_tau)
    out["token_budget"] = A.token_budgets(
        attn,
        fwd.token_norms,
        num_prefix=c.num_prefix_tokens,
        factor=settings.high_norm_factor,
        queries=settings.budget_queries,
        readout_tokens=c.readout_tokens,
    )
    norms = fwd.token_norms[:, :-1]  # (B, L, T): the input of each layer
    out["high_norm_patches"] = A.token_norm_outliers(
        norms, num_prefix=c.num_prefix_tokens, factor=settings.high_norm_factor
    )
    if settings.grad_rollout and settings.class_method == "gradient":  # lrp: class_arrays
        if fwd.grads is None:
            raise ValueError("settings.grad_rollout needs a forward pass with gradients")
        out["grad_rollout"] = A.gradient_rollout(attn, fwd.grads, **kw)
        out["grad_class"] = fwd.target
    if settings.save_attentions:
        out["attentions"] = attn
    return {k: v.detach().cpu().numpy().astype(DTYPES[k], copy=False) for k, v in out.items()}


def class_maps(lm: LoadedModel, pixels: Tensor, target: Tensor, method: str) -> Tensor:
    """The class-specific map of `method` (CLASS_METHODS) for each image's class, (B, gh, gw):
    gradient rollout from one forward and backward pass, or Transformer Attribution (LRP)."""
    c = lm.config
    if method == "gradient":
        fwd = run_forward(lm.model, pixels, gradients=True, target=target)
        kw = dict(num_prefix=c.num_prefix_tokens, grid=c.grid, readout_tokens=c.readout_tokens)
        return A.gradient_rollout(fwd.attentions, fwd.grads, **kw)
    if method == "lrp":
        return A.transformer_attribution(lm.model, pixels, target)
    raise ValueError(f"class_method must be one of {CLASS_METHODS}, got {method!r}")


def class_arrays(lm: LoadedModel, pixels: Tensor, fwd: Forward, settings: Settings) -> dict[str, np.ndarray]:
    """The class-specific arrays analyze_batch cannot make from a forward pass alone (each class
    is another backward pass), batch first: transformer_attribution (settings.grad_rollout with
    class_method lrp; analyze_batch makes grad_rollout itself), class_maps of each image's top-k
    classes and the contrastive map of settings.contrast_classes. pixels (B, 3, H, W) on the
    model's device and dtype; fwd its forward pass. {} for a model without a classifier."""
    if fwd.logits is None:
        return {}
    B = len(pixels)
    device = pixels.device
    out: dict[str, Tensor] = {}
    if settings.grad_rollout and settings.class_method == "lrp":
        target = fwd.target if fwd.target is not None else fwd.logits.argmax(-1)
        if settings.grad_class is not None:
            target = torch.full((B,), settings.grad_class, dtype=torch.long)
        out["transformer_attribution"] = class_maps(lm, pixels, target.to(device), "lrp")
        out["grad_class"] = target
    if settings.class_maps:
        k = min(settings.class_maps, fwd.logits.shape[-1])
        top = fwd.logits.float().softmax(-1).topk(k, dim=-1).indices  # (B, k), most probable first
        maps = [class_maps(lm, pixels, top[:, j].to(device), settings.class_method) for j in range(k)]
        out["class_maps"] = torch.stack(maps, dim=1)
        out["class_map_classes"] = top
    if settings.contrast_classes is not None:
        pair = [
            class_maps(lm, pixels, torch.full((B,), cls, dtype=torch.long, device=device), settings.class_method)
            for cls in settings.contrast_classes
        ]
        out["contrastive_map"] = A.contrastive_map(*pair)
        out["contrastive_classes"] = torch.tensor(settings.contrast_classes).expand(B, 2)
    return {k: v.detach().cpu().numpy().astype(DTYPES[k], copy=False) for k, v in out.items()}


def versions() -> dict[str, str]:
    import cv2
    import PIL

    return {
        "vit_lens_schema": str(SCHEMA_VERSION),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
    }


def model_meta(lm: LoadedModel, source: str) -> dict:
    return {
        "name": lm.name,
        "source": source,
        "family": lm.family,
        "format": lm.format,
        "config": lm.config.to_dict(),
        "preprocessing": lm.preprocessing.to_dict(),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "precision": lm.precision,  # fp32, tf32, bf16 or fp16 (docs/PRECISION.md)
    }


@dataclass
class Report:
    """One image's arrays (schema keys, no batch axis) and what produced them."""

    arrays: dict[str, np.ndarray]
    settings: Settings
    model: dict
    image: dict  # name, sha256 prefix, original size
    display: dict = field(default_factory=dict)  # colour map, upsampling, opacity, shown layer/head

    def meta(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "settings": self.settings.to_dict(),
            "display": self.display,
            "model": self.model,
            "image": self.image,
            "keys": sorted(self.arrays),
            "versions": versions(),
        }

    def npz_bytes(self) -> bytes:
        """The report as an uncompressed .npz (floats barely compress): the arrays and report_json."""
        unknown = set(self.arrays) - set(KEYS)
        if unknown:
            raise ValueError(f"arrays outside the schema: {sorted(unknown)}")
        buf = io.BytesIO()
        np.savez(buf, report_json=np.array(json_text(self.meta(), indent=2)), **self.arrays)
        return buf.getvalue()


def json_safe(x) -> tuple[object, int]:
    """x with every NaN or infinite float replaced by None (numpy scalars and arrays as plain
    values), and how many were replaced."""
    count = 0

    def walk(v):
        nonlocal count
        if isinstance(v, dict):
            return {k: walk(u) for k, u in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(u) for u in v]
        if isinstance(v, np.ndarray):
            return walk(v.tolist())
        if isinstance(v, (float, np.floating)):
            if math.isfinite(v):
                return float(v)
            count += 1
            return None
        if isinstance(v, np.integer):
            return int(v)
        return v

    return walk(x), count


def json_text(obj, **kw) -> str:
    """obj as strict JSON: `NaN` and `Infinity` are not JSON (strict parsers refuse the file), so
    non-finite numbers become null and an object gets "non_finite_as_null": how many. Without any,
    the text is json.dumps's own."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:  # a non-finite float
        pass
    safe, n = json_safe(obj)
    if isinstance(safe, dict):
        safe["non_finite_as_null"] = n
    return json.dumps(safe, allow_nan=False, **kw)


def json_bytes(obj) -> bytes:
    """A summary file's bytes: json_text with the summaries' indent."""
    return json_text(obj, indent=2).encode()


def split(arrays: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """Image b of a batch's arrays, copied (a batch's arrays may be views of a reused block)."""
    return {k: np.array(v[b], copy=True) for k, v in arrays.items()}


def read_report(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """A written report -> (arrays, metadata)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "report_json"}
        meta = json.loads(str(z["report_json"]))
    return arrays, meta
