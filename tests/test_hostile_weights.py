"""Hostile checkpoints and config files (issue 14): every size a file states is bounded and checked
against the tensors before anything is built; declared sizes are checked against the file before
anything is inflated; every value of a side file is checked, the message naming the file and key.

Each hostile case is a small file made here. The survival rules checked for each: refused with
one CheckpointError line that names the file or key and quotes none of the file's content, within
seconds, in a child process whose peak memory (VmHWM) stays far under 3 GB; the CLI exits 2 with
exactly one stderr line and no traceback. The unmodified base of each case loads (no regression).
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from children import run_child
from safetensors.torch import save_file

from model import CheckpointError, Preprocessing, VisionTransformer, ViTConfig, load_checkpoint
from model.config import SHOWN_CHARS
from model.weights import read_weights_file
from viz_app.cli import main as cli_main

import layouts

TINY = ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3)
SECRET = "s3cr3t-" * 40  # long content: a message may quote at most SHOWN_CHARS of a value
PEAK_MB = 1500  # a child that imports torch starts near 300 MB; the issue's bound is about 3 GB
SECONDS = 10


# ---- building blocks: valid small checkpoints of each layout, and hostile files ---------------------


def _tiny_state(cfg: ViTConfig = TINY) -> dict[str, torch.Tensor]:
    m = VisionTransformer(cfg)
    m.init_weights(seed=0)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def _timm_config(**pc) -> dict:
    return {
        "architecture": "vit_tiny_patch8_32",
        "num_classes": 3,
        "model_args": {"num_heads": 2},
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            **pc,
        },
    }


def _vitlens_config() -> dict:
    return {
        "format": "vit-lens",
        "name": "tiny",
        "family": "ViT",
        "config": TINY.to_dict(),
        "preprocessing": Preprocessing(input_size=32).to_dict(),
        "labels": ["a", "b", "c"],
    }


def _hf_base(root: Path) -> Path:
    """A transformers ViT folder (save_pretrained: model.safetensors, config.json, and a
    preprocessor_config.json from ViTImageProcessor), made once per root and copied by each case."""
    base = root / "_hf_base"
    if not base.is_dir():
        import transformers as T

        import hf_models

        hf_models.save(hf_models.build("vit", patch_size=8, image_size=32), base)  # width 96, 3 blocks, 4 heads
        T.ViTImageProcessorPil(size={"height": 32, "width": 32}, resample=2).save_pretrained(base)
    return base


def _folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    return d


def make_timm(root: Path, name: str, *, state=None, config: dict | None = None, suffix=".safetensors") -> Path:
    d = _folder(root, name)
    path = d / f"model{suffix}"
    state = _tiny_state() if state is None else state
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return path


def make_vitlens(root: Path, name: str, edit=None) -> Path:
    d = _folder(root, name)
    save_file(_tiny_state(), str(d / "model.safetensors"))
    cfg = _vitlens_config()
    if edit:
        edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def make_hf(root: Path, name: str, edit=None, pre_edit=None, extra: dict | None = None) -> Path:
    """A copy of the transformers folder, its config files edited, extra tensors added to its weights."""
    from safetensors.torch import load_file

    base, d = _hf_base(root), _folder(root, name)
    if extra:
        save_file(load_file(str(base / "model.safetensors")) | extra, str(d / "model.safetensors"))
    else:
        (d / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    for file, change in (("config.json", edit), ("preprocessor_config.json", pre_edit)):
        cfg = json.loads((base / file).read_text())
        if change:
            change(cfg)
        (d / file).write_text(json.dumps(cfg))
    return d


def _set(path: str, value):
    """An edit of a nested JSON dict: 'a.b' = value ('a.b' deleted when value is DELETE)."""

    def edit(d: dict) -> None:
        *outer, last = path.split(".")
        for k in outer:
            d = d[k]
        if value is DELETE:
            d.pop(last, None)
        else:
            d[last] = value

    return edit


DELETE = object()


# npz / zip bombs, written by hand: a member of zeros deflated with full flushes repeats one block,
# so a 3 MB file inflating to 3.2 GB takes a second to make (most of it the CRC).


def _deflated_zeros(head: bytes, zeros: int, chunk: int = 16_000_000) -> tuple[bytes, int, int]:
    assert zeros % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    data += block * (zeros // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc, z = zlib.crc32(head), bytes(chunk)
    for _ in range(zeros // chunk):
        crc = zlib.crc32(z, crc)
    return data, crc, len(head) + zeros


def _stored(data: bytes) -> tuple[bytes, int, int]:
    return data, zlib.crc32(data), len(data)


def write_zip(path: Path, members: list[tuple[str, tuple[bytes, int, int], int]]) -> Path:
    """members: (name, (data, crc, uncompressed size), method 0 stored | 8 deflated)."""
    out, central = io.BytesIO(), b""
    for name, (data, crc, size), method in members:
        n, off = name.encode(), out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0))
        out.write(n + data)
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(data),
            size,
            len(n),
            0,
            0,
            0,
            0,
            0,
            off,
        )
        central += n
    start = out.tell()
    out.write(central)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0))
    path.write_bytes(out.getvalue())
    return path


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def make_npz_bomb(root: Path, name: str) -> Path:
    """The issue's example: one deflated member of 800 M float32 zeros, a 3 MB file."""
    n = 800_000_000
    return write_zip(root / name, [("embedding/kernel.npy", _deflated_zeros(npy_header((n,)), 4 * n), 8)])


def make_npz_lying_header(root: Path, name: str) -> Path:
    """A stored member whose .npy header claims 10^9 floats but which holds 16 bytes."""
    return write_zip(root / name, [("embedding/kernel.npy", _stored(npy_header((10**9,)) + bytes(16)), 0)])


def make_pth_bomb(root: Path, name: str) -> Path:
    """A PyTorch zip checkpoint whose one storage record is 800 M float32 zeros, deflated."""
    src = root / f"{name}.src.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(4)}, src)
    import zipfile

    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    src.unlink()
    n = 800_000_000
    pkl_name = next(k for k in members if k.endswith("data.pkl"))
    prefix = pkl_name.removesuffix("data.pkl")
    pkl = members[pkl_name].replace(b"K\x04", b"J" + struct.pack("<i", n))  # the storage's numel and the size
    out = []
    for k, v in members.items():
        if k == pkl_name:
            out.append((k, _stored(pkl), 0))
        elif k == prefix + "data/0":
            out.append((k, _deflated_zeros(b"", 4 * n), 8))
        else:
            out.append((k, _stored(v), 0))
    return write_zip(root / name, out)


def make_aliased_pth(root: Path, name: str) -> Path:
    """2000 keys viewing one 1 MB storage: 1 MB on disk, 2 GB once each is converted on its own."""
    s = torch.zeros(1 << 18)
    path = root / name
    torch.save({f"blocks.{i}.attn.qkv.weight": s for i in range(2000)} | {"patch_embed.proj.weight": s}, path)
    return path


# ---- the cases -------------------------------------------------------------------------------------


def _blocks(extra: dict) -> dict:
    return _tiny_state() | extra


def _huge_index_state() -> dict:
    return _tiny_state() | {"blocks." + "9" * 5000 + ".norm1.weight": torch.ones(32)}


def _lone_block_state() -> dict:  # the issue's 99 kB file: a patch embedding, a position embedding, one block key
    return {
        "patch_embed.proj.weight": torch.randn(32, 3, 8, 8),
        "pos_embed": torch.randn(1, 17, 32),
        "cls_token": torch.randn(1, 1, 32),
        "blocks.300000.norm1.weight": torch.ones(32),
    }


# name -> (builder(root, name) -> the path to load, strings the message must contain)
CASES: dict[str, tuple] = {
    # depth from the keys
    "block_300000_alone": (lambda r, n: make_timm(r, n, state=_lone_block_state()), ("blocks.0 is missing", "300000")),
    "block_300000_added": (
        lambda r, n: make_timm(r, n, state=_blocks({"blocks.300000.norm1.weight": torch.ones(32)})),
        ("numbered up to 300000",),
    ),
    "block_gap": (
        lambda r, n: make_timm(r, n, state=_blocks({"blocks.5.norm1.weight": torch.ones(32)})),
        ("blocks.2",),
    ),
    "block_5000_digits": (lambda r, n: make_timm(r, n, state=_huge_index_state()), ("beyond any depth",)),
    "block_300000_pth": (
        lambda r, n: make_timm(r, n, state=_lone_block_state(), suffix=".pth"),
        ("model.pth", "300000"),
    ),
    "hf_layer_300000": (
        lambda r, n: make_hf(r, n, extra={"vit.encoder.layer.300000.layernorm_before.weight": torch.ones(96)}),
        ("model.safetensors", "300000"),
    ),
    # sizes of the tensors themselves
    "width_20000": (
        lambda r, n: make_timm(
            r, n, state={"patch_embed.proj.weight": torch.zeros(20000, 3, 1, 1), "blocks.0.norm1.weight": torch.ones(1)}
        ),
        ("embed_dim", "16384"),
    ),
    "tokens_300000": (
        lambda r, n: make_timm(
            r,
            n,
            state={
                "patch_embed.proj.weight": torch.zeros(1, 3, 1, 1),
                "pos_embed": torch.zeros(1, 300_000, 1),
                "blocks.0.norm1.weight": torch.ones(1),
            },
        ),
        ("300000 rows",),
    ),
    "one_channel": (
        lambda r, n: make_timm(r, n, state=_tiny_state(ViTConfig(**{**TINY.to_dict(), "in_chans": 1}))),
        ("RGB",),
    ),
    # declared sizes against the file
    "npz_bomb": (make_npz_bomb, ("npz_bomb", "compression bomb")),
    "npz_lying_header": (make_npz_lying_header, ("npz_lying_header", "do not match its size")),
    "pth_bomb": (make_pth_bomb, ("pth_bomb", "compression bomb")),
    "pth_aliased": (make_aliased_pth, ("pth_aliased", "sharing one storage")),
}


def _hf_case(key, value, *needles):
    return (lambda r, n: make_hf(r, n, edit=_set(key, value)), ("config.json", key.split(".")[-1], *needles))


def _pre_case(key, value, *needles):
    return (lambda r, n: make_hf(r, n, pre_edit=_set(key, value)), ("preprocessor_config.json", *needles))


def _timm_case(key, value, *needles, where=None):
    def build(r, n):
        cfg = _timm_config()
        _set(key, value)(cfg)
        return make_timm(r, n, config=cfg)

    return (build, (where or "config.json", *needles))


def _vitlens_case(key, value, *needles):
    return (lambda r, n: make_vitlens(r, n, _set(key, value)), ("config.json", key, *needles))


NAN, INF = float("nan"), float("inf")
CASES |= {
    # transformers config.json: every key it reads, with wrong types and values
    "hf_layers_1e6": _hf_case("num_hidden_layers", 1_000_000),
    "hf_layers_4": _hf_case("num_hidden_layers", 4, "depth = 4"),
    "hf_layers_0": _hf_case("num_hidden_layers", 0),
    "hf_layers_str": _hf_case("num_hidden_layers", "12"),
    "hf_layers_float": _hf_case("num_hidden_layers", 2.0),
    "hf_layers_list": _hf_case("num_hidden_layers", [2]),
    "hf_layers_bool": _hf_case("num_hidden_layers", True),
    "hf_layers_10e30": _hf_case("num_hidden_layers", 10**30),
    "hf_hidden_neg": _hf_case("hidden_size", -5),
    "hf_hidden_64": _hf_case("hidden_size", 64, "embed_dim = 64"),
    "hf_heads_0": _hf_case("num_attention_heads", 0),
    "hf_heads_5": _hf_case("num_attention_heads", 5, "does not divide"),
    "hf_heads_1e-300": _hf_case("num_attention_heads", 1e-300),
    "hf_heads_nan": _hf_case("num_attention_heads", NAN),
    "hf_mlp_1e9": _hf_case("intermediate_size", 10**9),
    "hf_patch_0": _hf_case("patch_size", 0),
    "hf_patch_16": _hf_case("patch_size", 16, "patch_size = 16"),
    "hf_image_65536": _hf_case("image_size", 65536, "4096"),
    "hf_image_str": _hf_case("image_size", "224"),
    "hf_image_3": _hf_case("image_size", [224, 224, 3]),
    "hf_channels_1": _hf_case("num_channels", 1),
    "hf_eps_0": _hf_case("layer_norm_eps", 0),
    "hf_eps_nan": _hf_case("layer_norm_eps", NAN),
    "hf_eps_1e-300": _hf_case("layer_norm_eps", 1e-300),
    "hf_eps_str": _hf_case("layer_norm_eps", "1e-12"),
    "hf_act_list": _hf_case("hidden_act", ["gelu"]),
    "hf_act_secret": _hf_case("hidden_act", SECRET),
    "hf_qkv_bias_str": _hf_case("qkv_bias", "false"),
    "hf_model_type_list": _hf_case("model_type", ["vit"]),
    "hf_model_type_secret": _hf_case("model_type", SECRET),
    "hf_dinov2_mlp_ratio_inf": (
        lambda r, n: make_hf(r, n, edit=lambda c: c.update(model_type="dinov2", mlp_ratio=INF)),
        ("config.json", "mlp_ratio"),
    ),
    "hf_dinov2_swiglu_str": (
        lambda r, n: make_hf(r, n, edit=lambda c: c.update(model_type="dinov2", use_swiglu_ffn="no")),
        ("config.json", "use_swiglu_ffn"),
    ),
    # preprocessor_config.json
    "pre_mean_2": _pre_case("image_mean", [0.5, 0.5], "image_mean"),
    "pre_mean_4": _pre_case("image_mean", [0.5] * 4, "image_mean"),
    "pre_mean_str": _pre_case("image_mean", "0.5", "image_mean"),
    "pre_mean_nan": _pre_case("image_mean", [NAN] * 3, "image_mean"),
    "pre_mean_huge": _pre_case("image_mean", [1e300] * 3, "image_mean"),
    "pre_std_0": _pre_case("image_std", [0, 0.5, 0.5], "image_std"),
    "pre_std_neg": _pre_case("image_std", [-0.5] * 3, "image_std"),
    "pre_std_1e-45": _pre_case("image_std", [1e-45] * 3, "image_std"),
    "pre_std_nan": _pre_case("image_std", [NAN] * 3, "image_std"),
    "pre_std_inf": _pre_case("image_std", [INF] * 3, "image_std"),
    "pre_std_4": _pre_case("image_std", [0.5] * 4, "image_std"),
    "pre_std_bools": _pre_case("image_std", [True] * 3, "image_std"),
    "pre_std_secret": _pre_case("image_std", [SECRET] * 3, "image_std"),
    "pre_size_16384": _pre_case("size", {"height": 16384, "width": 16384}, "size", "4096"),
    "pre_size_int_16384": _pre_case("size", 16384, "size"),
    "pre_size_0": _pre_case("size", {"height": 0, "width": 32}, "size"),
    "pre_size_list": _pre_case("size", [32], "size"),
    "pre_size_longest": _pre_case("size", {"longest_edge": 32}, "size"),
    "pre_shortest_0": _pre_case("size", {"shortest_edge": 0}, "shortest_edge"),
    "pre_shortest_str": _pre_case("size", {"shortest_edge": "32"}, "shortest_edge"),
    "pre_crop_pct_tiny": (
        lambda r, n: make_hf(r, n, pre_edit=lambda p: p.update(size={"shortest_edge": 4096}, crop_size=32)),
        ("preprocessor_config.json", "crop_size"),
    ),
    "pre_crop_0": (
        lambda r, n: make_hf(r, n, pre_edit=lambda p: p.update(size={"shortest_edge": 32}, crop_size={"height": 0})),
        ("preprocessor_config.json", "crop_size"),
    ),
    "pre_resample_7": _pre_case("resample", 7, "resample"),
    "pre_resample_str": _pre_case("resample", "bicubic", "resample"),
    "pre_resample_list": _pre_case("resample", [3], "resample"),
    "pre_center_crop_str": (
        lambda r, n: make_hf(r, n, pre_edit=lambda p: p.update(size={"shortest_edge": 32}, do_center_crop="yes")),
        ("preprocessor_config.json", "do_center_crop"),
    ),
    # timm config.json
    "timm_heads_0": _timm_case("model_args.num_heads", 0, "num_heads"),
    "timm_heads_str": _timm_case("model_args.num_heads", "2", "num_heads"),
    "timm_heads_3": _timm_case("model_args.num_heads", 3, "num_heads", "does not divide"),
    "timm_input_65536": _timm_case("pretrained_cfg.input_size", [3, 65536, 65536], "input_size", "4096"),
    "timm_input_2": _timm_case("pretrained_cfg.input_size", [32, 32], "input_size"),
    "timm_img_size_0": (
        lambda r, n: make_timm(
            r, n, config=_timm_config() | {"model_args": {"num_heads": 2, "img_size": 0}, "pretrained_cfg": {}}
        ),
        ("config.json", "img_size"),
    ),
    "timm_crop_0.001": _timm_case("pretrained_cfg.crop_pct", 0.001, "crop_pct"),
    "timm_crop_0": _timm_case("pretrained_cfg.crop_pct", 0, "crop_pct"),
    "timm_crop_2": _timm_case("pretrained_cfg.crop_pct", 2, "crop_pct"),
    "timm_crop_nan": _timm_case("pretrained_cfg.crop_pct", NAN, "crop_pct"),
    "timm_crop_str": _timm_case("pretrained_cfg.crop_pct", "0.9", "crop_pct"),
    "timm_interp_cubic": _timm_case("pretrained_cfg.interpolation", "cubic", "interpolation"),
    "timm_interp_int": _timm_case("pretrained_cfg.interpolation", 3, "interpolation"),
    "timm_mean_2": _timm_case("pretrained_cfg.mean", [0.5, 0.5], "mean"),
    "timm_std_4": _timm_case("pretrained_cfg.std", [0.5] * 4, "std"),
    "timm_std_1e-45": _timm_case("pretrained_cfg.std", [1e-45] * 3, "std"),
    "timm_crop_mode": _timm_case("pretrained_cfg.crop_mode", ["center"], "crop_mode"),
    "timm_act": _timm_case("model_args.act_layer", "relu", "act_layer"),
    "timm_pool": _timm_case("global_pool", [1], "global_pool"),
    "timm_no_embed_class_str": _timm_case("model_args.no_embed_class", "yes", "no_embed_class"),
    "timm_arch_secret": _timm_case("architecture", SECRET, "architecture"),
    "timm_pretrained_list": _timm_case("pretrained_cfg", [1, 2], "pretrained_cfg"),
    "timm_labels_str": _timm_case("label_names", "abc", "label_names"),
    # vit-lens config.json
    "vl_depth_1e6": _vitlens_case("config.depth", 1_000_000),
    "vl_depth_3": _vitlens_case("config.depth", 3, "depth = 3"),
    "vl_image_65536": _vitlens_case("config.image_size", [65536, 65536]),
    "vl_image_str": _vitlens_case("config.image_size", "32"),
    "vl_patch_str": _vitlens_case("config.patch_size", "8"),
    "vl_eps_nan": _vitlens_case("config.norm_eps", NAN),
    "vl_heads_1e-300": _vitlens_case("config.num_heads", 1e-300),
    "vl_classes_neg": _vitlens_case("config.num_classes", -1),
    "vl_act_secret": _vitlens_case("config.act", SECRET),
    "vl_unknown_field": _vitlens_case("config.secret_field", 1),
    "vl_config_list": _vitlens_case("config", [1]),
    "vl_std_1e-45": _vitlens_case("preprocessing.std", [1e-45] * 3),
    "vl_std_2": _vitlens_case("preprocessing.std", [0.5, 0.5]),
    "vl_mean_inf": _vitlens_case("preprocessing.mean", [INF] * 3),
    "vl_crop_0.001": _vitlens_case("preprocessing.crop_pct", 0.001),
    "vl_input_16384": _vitlens_case("preprocessing.input_size", [16384, 16384]),
    "vl_interp": _vitlens_case("preprocessing.interpolation", "magic"),
    "vl_pre_unknown": _vitlens_case("preprocessing.secret", 1),
    "vl_labels_int": _vitlens_case("labels", 5),
    "vl_name_list": _vitlens_case("name", ["x"]),
    "vl_family_long": _vitlens_case("family", SECRET),
}


# Unmodified bases: each loads (the refusals above come from the modification, not the base).
CONTROLS = {
    "timm": lambda r, n: make_timm(r, n),
    "timm_config": lambda r, n: make_timm(r, n, config=_timm_config()),
    "timm_pth": lambda r, n: make_timm(r, n, suffix=".pth"),
    "hf": lambda r, n: make_hf(r, n),
    "vitlens": lambda r, n: make_vitlens(r, n),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return {name: build(root, name) for name, (build, _) in CASES.items()} | {
        f"control_{name}": build(root, f"control_{name}") for name, build in CONTROLS.items()
    }


@pytest.fixture(scope="module")
def loaded_in_a_child(built) -> dict:
    """Every case loaded in one child process: per case the seconds, the error type and message."""
    paths = {name: str(p) for name, p in built.items()}
    return run_child(
        textwrap.dedent(f"""
        import json, time
        from model import load_checkpoint
        out = {{"cases": {{}}}}
        for name, path in {paths!r}.items():
            t = time.perf_counter()
            try:
                load_checkpoint(path)
                kind, message = None, ""
            except Exception as e:
                kind, message = type(e).__name__, str(e)
            out["cases"][name] = dict(seconds=time.perf_counter() - t, kind=kind, message=message)
        """),
        timeout=300,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hostile_file_is_refused_quickly_with_one_line_naming_it(loaded_in_a_child, name):
    case = loaded_in_a_child["cases"][name]
    message = case["message"]
    assert case["kind"] == "CheckpointError", case
    assert case["seconds"] < SECONDS, case
    assert "\n" not in message and len(message) < 400, message
    for needle in CASES[name][1]:
        assert needle in message, (needle, message)
    assert SECRET[:SHOWN_CHARS] not in message and "Traceback" not in message, message


def test_all_of_them_together_stay_far_under_3_gb(loaded_in_a_child):
    assert loaded_in_a_child["peak_mb"] < PEAK_MB, loaded_in_a_child["peak_mb"]


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_the_unmodified_base_of_each_case_loads(loaded_in_a_child, name):
    case = loaded_in_a_child["cases"][f"control_{name}"]
    assert case["kind"] is None, case


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.new("RGB", (40, 30), (120, 80, 40)).save(path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cli_exits_2_with_one_line(built, image, tmp_path, capsys, name):
    code = cli_main(["analyze", "--model", str(built[name]), "--out", str(tmp_path / "out"), str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0] and "cannot load model" in err[0], err
    assert SECRET[:SHOWN_CHARS] not in err[0]
    assert not any((tmp_path / "out").glob("cat*")), "no image may be analysed with a refused model"


def _cli_child(args: list[str], peak_file: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m viz_app <args>` itself, with its peak memory written at exit."""
    code = (
        "import atexit, sys, runpy\n"
        f"atexit.register(lambda: open({str(peak_file)!r}, 'w').write("
        "[x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM')][0]))\n"
        f"sys.argv = ['viz_app', *{args!r}]\n"
        "runpy.run_module('viz_app', run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["block_300000_alone", "hf_layers_1e6", "npz_bomb", "pre_std_1e-45"])
def test_python_m_viz_app_refuses_the_issues_examples(built, image, tmp_path, name):
    peak = tmp_path / "peak"
    done = _cli_child(["analyze", "--model", str(built[name]), "--out", str(tmp_path / "o"), str(image)], peak)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert int(peak.read_text()) / 1024 < PEAK_MB


# ---- the pieces on their own --------------------------------------------------------------------------


def test_the_npz_bomb_is_refused_from_the_zip_directory(tmp_path):
    path = make_npz_bomb(tmp_path, "bomb.npz")
    assert path.stat().st_size < 4 * 2**20
    out = run_child(
        textwrap.dedent(f"""
        import json, time
        from model.weights import read_weights_file
        t = time.perf_counter()
        try:
            read_weights_file({str(path)!r})
            message = ""
        except Exception as e:
            message = type(e).__name__ + ": " + str(e)
        out = dict(seconds=time.perf_counter() - t, message=message)
        """)
    )
    assert out["message"].startswith("CheckpointError: bomb.npz") and "compression bomb" in out["message"], out
    assert out["seconds"] < 5 and out["peak_mb"] < PEAK_MB, out


def test_a_valid_npz_still_reads_with_its_dtypes(tmp_path):
    """Written by numpy (compressed and not, Fortran order, big-endian, bfloat16 as void): read as before."""
    arrays = {
        "a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "be": np.arange(4, dtype=">f4"),
        "i": np.arange(5, dtype=np.int64),
        "bf16": torch.tensor([1.0, -2.5]).bfloat16().view(torch.int16).numpy().view("V2"),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        got = read_weights_file(path)
        for k in ("a/kernel", "f", "be", "i"):
            np.testing.assert_array_equal(got[k].numpy(), arrays[k].astype(arrays[k].dtype.newbyteorder("=")))
        assert got["bf16"].tolist() == [1.0, -2.5]


def test_a_valid_google_npz_still_loads(tmp_path):
    import hf_models

    hf = hf_models.build("vit", patch_size=16, image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    path = tmp_path / "ViT.npz"
    np.savez_compressed(path, **layouts.hf_vit_to_google_npz(hf, heads=4))
    assert load_checkpoint(path).config.depth == 3


def test_a_scanned_npz_with_uneven_stacks_is_refused(tmp_path):
    import hf_models

    hf = hf_models.build("vit", patch_size=16, image_size=64)
    w = layouts.hf_vit_to_big_vision_npz(hf, heads=4, scanned=True)
    key = "params/Transformer/encoderblock/MlpBlock_0/Dense_0/bias"
    w[key] = w[key][:1]
    np.savez(tmp_path / "bv.npz", **w)
    with pytest.raises(CheckpointError, match="does not stack 3 layers"):
        load_checkpoint(tmp_path / "bv.npz")


def test_a_resampled_position_embedding_is_bounded_before_it_is_made(tmp_path, monkeypatch):
    """A checkpoint asked to run at a larger size: the position embedding it would need beyond its own
    is checked (arithmetic) before resampling; the image size as such is bounded by the token count."""
    from model.weights import load

    path = make_timm(tmp_path, "m")
    with pytest.raises(CheckpointError, match="cannot run at image size"):  # 512 x 512 patches of 8 px
        load_checkpoint(path, image_size=4096)
    monkeypatch.setattr(load, "MAX_UNBACKED_BYTES", 1 << 20)
    with pytest.raises(CheckpointError, match="MB of position embeddings beyond the checkpoint's own"):
        load_checkpoint(path, image_size=1024)  # 16385 x 32 floats: 2 MB
    assert load_checkpoint(path, image_size=128).config.grid == (16, 16)  # 33 kB


CONFIG_VARIANTS = [
    {},
    {"conv_stem": (4, 8), "patch_size": 8},
    {"num_registers": 4, "pos_embed_prefix": 1, "layer_scale": True},
    {"distill_token": True, "distilled_head": True, "pos_embed_prefix": None},
    {"global_pool": "token_avg"},
    {"class_token": False, "global_pool": "avg", "fc_norm": True, "pos_embed_prefix": None},
    {"representation_size": 48, "projection_dim": 24, "pre_norm": True, "patch_bias": False, "qkv_bias": False},
    {"num_classes": 0},
]


@pytest.mark.parametrize("kw", CONFIG_VARIANTS)
def test_param_count_is_what_the_model_holds(kw):
    from model.weights.infer import param_count

    c = ViTConfig(**{**TINY.to_dict(), **kw})
    with torch.device("meta"):
        m = VisionTransformer(c)
    assert param_count(c) == sum(v.numel() for v in m.state_dict().values())


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth", 1_000_000),
        ("depth", 0),
        ("depth", "12"),
        ("depth", 12.0),
        ("embed_dim", 10**9),
        ("num_heads", True),
        ("mlp_dim", 10**7),
        ("image_size", 65536),
        ("image_size", (224,)),
        ("patch_size", -1),
        ("num_registers", 10**6),
        ("num_classes", 10**8),
        ("norm_eps", float("nan")),
        ("norm_eps", 0.0),
        ("act", ["gelu"]),
        ("qkv_bias", "false"),
        ("conv_stem", (8,) * 20),
    ],
)
def test_vit_config_bounds_every_size(field, value):
    with pytest.raises(ValueError, match=f"invalid ViTConfig: {field} must be"):
        ViTConfig(**{**TINY.to_dict(), field: value})


def test_vit_config_bounds_the_token_count():
    with pytest.raises(ValueError, match="tokens"):
        ViTConfig(image_size=4096, patch_size=1, embed_dim=8, depth=1, num_heads=1, mlp_dim=8)


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_size", 16384),
        ("input_size", 0),
        ("input_size", "224"),
        ("crop_pct", 0.001),
        ("crop_pct", 0.0),
        ("crop_pct", 1.5),
        ("crop_pct", float("nan")),
        ("crop_pct", "0.9"),
        ("interpolation", "cubic"),
        ("interpolation", ["bicubic"]),
        ("mode", "stretch"),
        ("mean", (0.5, 0.5)),
        ("mean", (0.5,) * 4),
        ("mean", (float("nan"),) * 3),
        ("mean", "abc"),
        ("std", (1e-45,) * 3),
        ("std", (0.0, 0.5, 0.5)),
        ("std", (float("inf"),) * 3),
        ("std", (1e-300,) * 3),
        ("std", (True, True, True)),
    ],
)
def test_preprocessing_checks_itself(field, value):
    """No path (config file, curated table, code) can make a Preprocessing that breaks prepare_image."""
    with pytest.raises(ValueError, match=f"invalid preprocessing: {field} must be"):
        Preprocessing(**{field: value})


def test_preprocessing_keeps_its_valid_values():
    p = Preprocessing(input_size=[20, 40], mode="squash", crop_pct=1, mean=[0, 0.5, 1], std=[1 / 255, 0.5, 2])
    assert p.input_size == (20, 40) and p.crop_pct == 1.0 and p.mean == (0.0, 0.5, 1.0)
    assert p.std == (1 / 255, 0.5, 2.0)


def test_a_config_file_nested_past_the_recursion_limit_is_one_message(tmp_path):
    folder = make_vitlens(tmp_path, "m")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json is not a usable JSON file"):
        load_checkpoint(folder)
    (folder / "config.json").write_text('{"format": "vit-lens", "config": {"depth": ' + "9" * 5000 + "}}")
    with pytest.raises(CheckpointError, match="config.json is not a usable JSON file"):
        load_checkpoint(folder)


def test_an_unreadable_config_file_is_one_message(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    folder = make_vitlens(tmp_path, "m")
    (folder / "config.json").chmod(0)
    with pytest.raises(CheckpointError, match="config.json cannot be read"):
        load_checkpoint(folder)


def test_long_key_names_are_cut_in_messages(tmp_path):
    state = {"x" * 5000: torch.zeros(2), "y" * 5000: torch.zeros(2)}
    path = tmp_path / "keys.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert len(str(e.value)) < 400 and "x" * 50 not in str(e.value)
