"""Golden values of Transformer Attribution computed by the authors' own code.

Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021.
Authors' repository: https://github.com/hila-chefer/Transformer-Explainability, commit
c3e578f76b954e8528afeaaee26de3f07e3fe559 (baselines/ViT/ViT_LRP.py, baselines/ViT/ViT_explanation_generator.py,
modules/layers_ours.py). Their code is run, not copied: this script imports it from a checkout.

The exact command, from the root of this repository (einops goes into a throwaway folder, never
into .venv or the requirements):

    mkdir -p /tmp/chefer
    git -C /work/.mirror/hila-chefer+Transformer-Explainability/repo archive \\
        c3e578f76b954e8528afeaaee26de3f07e3fe559 | tar -x -C /tmp/chefer
    .venv/bin/python -m pip install --target /tmp/pydeps einops
    PYTHONPATH=/tmp/pydeps .venv/bin/python tests/reference/chefer_lrp_golden.py /tmp/chefer

It writes tests/reference/chefer_lrp_golden.npz (next to this script: tests/artifacts/ is git-ignored
and wiped by `make clean`, it holds screenshots): for each configuration in CONFIGS, the weights (our
parameter names, which are theirs and timm's), the inputs, the classes and start layers asked for,
their logits and their maps (LRP(model).generate_LRP(x, index=class, method="transformer_attribution",
start_layer=s), one image at a time: their code reads image 0 only), computed twice: by their model in
float32 ('maps') and by the same model in float64 ('maps64'; their code runs unchanged in either).

Why float64 too: the rules divide by sums that nearly cancel (the residual sums x + y of the Add
rule above all), so below the top layer the maps amplify rounding. On the 'pre32' model a relative
change of 1e-7 in the attention scores moves a float32 map by up to ~1e-3 of its maximum, so two
correct float32 implementations that order their operations differently (or one run at batch 1 and
at batch 3) agree only that far. In float64 the same amplification leaves them ~1e-12 apart, which
is what shows that the rules are the same.

To keep the file small, every tensor (weights and pixels) is stored as int8 codes times a power of
two per tensor: the values are exactly representable in float32, so both models load the same
numbers bit for bit. Their model's .cuda() calls are made a no-op on the CPU (torch.Tensor.cuda
returns the tensor itself while their code runs). Their model is used as it is, including the
final LayerNorm's eps of 1e-5 (the blocks' norms use 1e-6); the npz records both.

tests/test_lrp.py loads the npz and compares transformer_attribution on our VisionTransformer with
these maps; with CHEFER_REPO=<checkout> (and einops importable) it also runs their code directly
through the functions below.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

AUTHORS_COMMIT = "c3e578f76b954e8528afeaaee26de3f07e3fe559"
OUT = Path(__file__).resolve().parent / "chefer_lrp_golden.npz"
BLOCK_NORM_EPS = 1e-6  # their Block's LayerNorms
FINAL_NORM_EPS = 1e-5  # their VisionTransformer.norm = LayerNorm(embed_dim), torch's default eps

# Two models (image side, patch, width, depth, heads, MLP ratio, qkv bias, classes) and how their
# weights are drawn: "timm" as timm and the authors initialise (N(0, 0.02) truncated at 2 std,
# LayerNorms 1 and 0, biases 0: the relevances of a barely trained model are tiny), "pretrained" at
# the scale of a trained model (N(0, 1/fan_in) weights, LayerNorm gains 1 +- 0.25, biases and
# tokens away from zero), so that gradients and relevances are far from 0 and the maps far from flat.
CONFIGS = {
    "timm48": dict(
        img=32, patch=8, embed=48, depth=3, heads=3, mlp_ratio=4, qkv_bias=True, classes=10, style="timm",
        seed=0, inputs=3, start_layers=(0,),
    ),
    "pre32": dict(
        img=24, patch=8, embed=32, depth=4, heads=4, mlp_ratio=4, qkv_bias=False, classes=10, style="pretrained",
        seed=1, inputs=3, start_layers=(0, 2),
    ),
}  # fmt: skip


def load_authors(repo: str | Path):
    """Their VisionTransformer (ViT_LRP.py) and LRP (ViT_explanation_generator.py) from a checkout.
    The checkout goes first on sys.path (their modules are 'baselines' and 'modules')."""
    repo = str(Path(repo).resolve())
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from baselines.ViT.ViT_explanation_generator import LRP
    from baselines.ViT.ViT_LRP import VisionTransformer

    return VisionTransformer, LRP


@contextlib.contextmanager
def cuda_is_cpu():
    """Their generate_LRP calls .cuda(): on this CPU-only machine it returns the tensor itself."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def their_model(vit_class, spec: dict):
    return vit_class(
        img_size=spec["img"],
        patch_size=spec["patch"],
        in_chans=3,
        num_classes=spec["classes"],
        embed_dim=spec["embed"],
        depth=spec["depth"],
        num_heads=spec["heads"],
        mlp_ratio=spec["mlp_ratio"],
        qkv_bias=spec["qkv_bias"],
    ).eval()


def quantize(values: np.ndarray) -> tuple[np.ndarray, int]:
    """values -> (int8 codes, e) with codes * 2**e close to values (exact in float32)."""
    top = float(np.abs(values).max()) if values.size else 0.0
    e = math.ceil(math.log2(top / 127)) if top > 0 else 0
    codes = np.clip(np.round(values / 2.0**e), -127, 127).astype(np.int8)
    return codes, e


def dequantize(codes: np.ndarray, e: int) -> np.ndarray:
    return codes.astype(np.float32) * np.float32(2.0**e)


def draw_weights(shapes: dict[str, tuple[int, ...]], style: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Float weights of every parameter name, by the rules of CONFIGS' styles."""
    out = {}
    for name, shape in shapes.items():
        normal = rng.standard_normal(shape)
        is_norm = "norm" in name and len(shape) == 1
        if style == "timm":
            if is_norm:
                w = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
            elif name.endswith("bias"):
                w = np.zeros(shape)
            else:
                w = np.clip(0.02 * normal, -0.04, 0.04)
        elif style == "pretrained":
            if is_norm:
                w = 1.0 + 0.25 * normal if name.endswith("weight") else 0.1 * normal
            elif name.endswith("bias"):
                w = 0.1 * normal
            elif name in ("cls_token", "pos_embed"):
                w = 0.5 * normal
            else:  # linear (out, in) and the patch convolution (out, 3, p, p)
                w = normal / math.sqrt(int(np.prod(shape[1:])))
        else:
            raise ValueError(f"unknown weight style {style!r}")
        out[name] = w
    return out


def their_maps(model, lrp, pixels: torch.Tensor, classes: list[int], start_layers) -> tuple[np.ndarray, np.ndarray]:
    """Their maps for one image (1, 3, H, W): (len(classes), len(start_layers), N) and their logits,
    in the dtype of the model and pixels (float32 or float64: their code runs in either)."""
    with cuda_is_cpu():
        maps = [
            [
                lrp.generate_LRP(pixels, index=c, method="transformer_attribution", start_layer=s).detach()[0].numpy()
                for s in start_layers
            ]
            for c in classes
        ]
    logits = model(pixels)[0].detach().numpy()  # their forward registers hooks: it needs autograd
    return np.asarray(maps), logits


def make_case(repo, name: str, spec: dict) -> dict[str, np.ndarray]:
    """Everything the test needs of one configuration, keyed '<name>.<what>'."""
    vit_class, lrp_class = load_authors(repo)
    torch.manual_seed(spec["seed"])  # their constructor draws its own init; ours replaces all of it
    model = their_model(vit_class, spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(spec["seed"])
    floats = draw_weights(shapes, spec["style"], rng)
    arrays, exps = {}, {}
    state = {}
    for k, w in floats.items():
        codes, e = quantize(w)
        arrays[f"{name}.w.{k}"] = codes
        exps[k] = e
        state[k] = torch.from_numpy(dequantize(codes, e))
    model.load_state_dict(state, strict=True)
    lrp = lrp_class(model)
    pix_codes, pix_e = quantize(rng.standard_normal((spec["inputs"], 3, spec["img"], spec["img"])))
    pixels = torch.from_numpy(dequantize(pix_codes, pix_e))
    model64 = their_model(vit_class, spec).double()
    model64.load_state_dict(state, strict=True)
    lrp64 = lrp_class(model64)
    all_maps, all_maps64, all_logits, all_classes = [], [], [], []
    for i in range(spec["inputs"]):
        x = pixels[i : i + 1]
        top = int(model(x)[0].argmax())
        other = (top + 1 + 3 * i) % spec["classes"]
        maps, logits = their_maps(model, lrp, x, [top, other], spec["start_layers"])
        all_maps.append(maps)
        all_maps64.append(their_maps(model64, lrp64, x.double(), [top, other], spec["start_layers"])[0])
        all_logits.append(logits)
        all_classes.append([top, other])
    meta = {k: v for k, v in spec.items() if k != "start_layers"}
    meta.update(
        start_layers=list(spec["start_layers"]),
        block_norm_eps=BLOCK_NORM_EPS,
        final_norm_eps=FINAL_NORM_EPS,
        weight_exps=exps,
        pixel_exp=pix_e,
    )
    arrays[f"{name}.meta"] = np.array(json.dumps(meta))
    arrays[f"{name}.pixels"] = pix_codes
    arrays[f"{name}.classes"] = np.asarray(all_classes, np.int64)  # (inputs, 2)
    arrays[f"{name}.maps"] = np.asarray(all_maps, np.float32)  # (inputs, 2 classes, start layers, N)
    arrays[f"{name}.maps64"] = np.asarray(all_maps64, np.float64)  # the same in float64
    arrays[f"{name}.logits"] = np.asarray(all_logits, np.float32)  # (inputs, classes)
    return arrays


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: chefer_lrp_golden.py <checkout of hila-chefer/Transformer-Explainability>")
    torch.set_num_threads(1)
    arrays = {"names": np.array(json.dumps(list(CONFIGS))), "authors_commit": np.array(AUTHORS_COMMIT)}
    for name, spec in CONFIGS.items():
        arrays.update(make_case(argv[0], name, spec))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
