"""Hostile inputs, round two (issue 14): tiny files that would cost gigabytes, readers that raised
library errors instead of the project's message, content echoed in messages, sizes from the
command line taken silently."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from model import CheckpointError
from model.weights import read_weights_file
from viz_app.cli import main as cli_main


def _child(code: str, timeout: float = 60) -> dict:
    """Run code in a fresh Python; it prints one JSON line. Adds the child's peak memory in MB
    (VmHWM: its own address space's high-water mark; ru_maxrss would carry the parent's over)."""
    peak = (
        "\nout['peak_mb'] = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024"
    )
    done = subprocess.run(
        [sys.executable, "-c", code + peak + "\nprint(json.dumps(out))\n"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", [(1, 400_000), (400_000, 1), (1, 65_535), (3, 50_000)])
def test_an_extreme_aspect_ratio_costs_no_gigabytes(size):
    """A 1 x 400000 strip resized whole to a 256 px short side would be 100 G pixels; only the
    region the crop keeps is resampled."""
    out = _child(
        textwrap.dedent(f"""
        import json, time
        from PIL import Image
        from model.config import Preprocessing
        from model.preprocess import prepare_image
        pre = Preprocessing(input_size=(224, 224), crop_pct=0.875, interpolation="bicubic")
        t = time.perf_counter()
        p = prepare_image(Image.new("RGB", {size}, (10, 200, 30)), pre)
        out = dict(seconds=time.perf_counter() - t, shape=list(p.view.shape), mean=float(p.view.mean()))
        """)
    )
    assert out["shape"] == [224, 224, 3]
    assert out["seconds"] < 10 and out["peak_mb"] < 1500, out
    assert abs(out["mean"] - (10 + 200 + 30) / 3) < 1  # the strip's own colour, stretched


def _save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "name, make",
    [
        ("r.pth", lambda p: p.write_bytes(b"readme\n")),
        ("r.bin", lambda p: p.write_bytes(b"\x80\x02}q\x00.")),  # a pickle of an empty dict: no tensors
        ("sparse.pth", lambda p: _save({"w": torch.eye(3).to_sparse()}, p)),
        ("quantized.pth", lambda p: _save({"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}, p)),
        ("expanded.pth", lambda p: _save({"w": torch.zeros(1).expand(4096, 4096)}, p)),
        ("nested.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 100_001) + b"{" + b"[" * 100_000)),
    ],
)
def test_any_reader_failure_is_one_checkpoint_error_naming_the_file(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(CheckpointError) as e:
        read_weights_file(path)
    assert name in str(e.value)
    assert "Traceback" not in str(e.value)


def test_messages_never_echo_a_files_bytes(tmp_path):
    """A 'model.safetensors' that is really someone's text file: the message says what is wrong,
    not what the file holds (its first 8 bytes read as a length were printed before)."""
    secret = b"root:*:2{" + b"x" * 64
    path = tmp_path / "model.safetensors"
    path.write_bytes(secret)
    with pytest.raises(CheckpointError) as e:
        read_weights_file(path)
    text = str(e.value)
    (as_length,) = struct.unpack("<Q", secret[:8])
    assert str(as_length) not in text and "root" not in text
    assert "header length is larger than the file" in text


@pytest.mark.parametrize("size", ["0", "-5", "100000"])
def test_an_image_size_out_of_range_is_a_usage_error(tmp_path, size, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    code = cli_main(
        ["analyze", "--model", "demo", "--image-size", size, "--out", str(tmp_path / "o"), str(tmp_path / "a.png")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image size" in err[0]


@pytest.mark.app
@pytest.mark.parametrize("grid", [1, 3, 4])
def test_the_embeddings_tab_opens_for_grids_without_patches_4_apart(tmp_path, grid):
    from safetensors.torch import save_file
    from test_trust import open_tab, start

    from model import VisionTransformer, ViTConfig

    cfg = ViTConfig(image_size=8 * grid, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3)
    m = VisionTransformer(cfg)
    m.init_weights(seed=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    at = open_tab(start(tmp_path), "Embeddings")  # open_tab asserts no exception and no error
    assert any(f"the {grid}x{grid} grid has no patches 4 or more apart" in c.value for c in at.caption)
