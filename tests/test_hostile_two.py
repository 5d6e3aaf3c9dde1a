"""Hostile inputs, round two (issue 14): tiny files that would cost gigabytes, readers that raised
library errors instead of the project's message, content echoed in messages, sizes from the
command line taken silently."""

from __future__ import annotations

import json
import struct
import textwrap

import pytest
import torch
from children import run_child

from model import CheckpointError
from model.weights import read_weights_file
from viz_app.cli import main as cli_main


@pytest.mark.parametrize("size", [(1, 400_000), (400_000, 1), (1, 65_535), (3, 50_000)])
def test_an_extreme_aspect_ratio_costs_no_gigabytes(size):
    """A 1 x 400000 strip resized whole to a 256 px short side would be 100 G pixels; only the
    region the crop keeps is resampled."""
    out = run_child(
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


# --- decode work (issue 14, group 1): structure that declares more work than the pixels need ---


def _jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG's segments between SOI and EOI, each scan with its entropy-coded data."""
    i, out = 2, []
    while data[i + 1] != 0xD9:
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        j = i + 2 + length
        if data[i + 1] == 0xDA:
            while not (data[j] == 0xFF and data[j + 1] not in (0x00, *range(0xD0, 0xD8))):
                j += 1
        out.append(data[i:j])
        i = j
    return out


def _progressive_jpeg(size=(64, 48)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", progressive=True, quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("repeats", [91, 500, 5000])
def test_a_jpeg_with_too_many_scans_is_refused_before_decoding(repeats):
    """Scans are counted by walking the segments; each one would be decoded over the whole image."""
    from model.preprocess import MAX_JPEG_SCANS, ImageError, load_image

    segments = _jpeg_segments(_progressive_jpeg())
    scan = next(s for s in reversed(segments) if s[1] == 0xDA)
    data = b"\xff\xd8" + b"".join(segments) + scan * repeats + b"\xff\xd9"
    scans = sum(s[1] == 0xDA for s in segments) + repeats
    assert scans > MAX_JPEG_SCANS
    with pytest.raises(ImageError, match=f"JPEG of {scans} scans; the limit is {MAX_JPEG_SCANS}"):
        load_image(data, name="scans.jpg")


def test_scans_inside_an_exif_thumbnail_are_not_counted():
    """An APP1 segment holding a whole (progressive) JPEG: its SOS markers are content, skipped."""
    from model.preprocess import _jpeg_scans, load_image

    thumb = _progressive_jpeg((16, 16))
    segments = _jpeg_segments(thumb)
    inner = b"\xff\xd8" + b"".join(segments) + b"".join(s for s in segments if s[1] == 0xDA) * 20 + b"\xff\xd9"
    app1 = b"\xff\xe1" + (len(inner) + 2).to_bytes(2, "big") + inner
    outer = _progressive_jpeg()
    data = outer[:2] + app1 + outer[2:]
    assert _jpeg_scans(data) == _jpeg_scans(outer) == 10
    assert load_image(data).size == (64, 48)


def _strip_tiff(n: int, w: int = 8, h: int = 8, short: bool = False) -> bytes:
    """An 8-bit grey little-endian TIFF whose StripOffsets and StripByteCounts list n entries."""
    code, kind, width = ("H", 3, 2) if short else ("I", 4, 4)
    pixels = bytes(k % 256 for k in range(w * h))
    data_at = 8 + 2 + 8 * 12 + 4
    rows = max(1, -(-h // n))
    sizes = [max(0, min(rows, h - k * rows)) * w for k in range(n)]
    offsets = [data_at + min(k * rows, h - 1) * w for k in range(n)]

    def entry(tag, t, count, value):
        return struct.pack("<HHII", tag, t, count, value)

    def table(values, at):
        packed = struct.pack(f"<{n}{code}", *values)
        return (b"", struct.unpack("<I", packed.ljust(4, b"\0"))[0]) if len(packed) <= 4 else (packed, at)

    offsets_bytes, offsets_value = table(offsets, data_at + len(pixels))
    sizes_bytes, sizes_value = table(sizes, data_at + len(pixels) + len(offsets_bytes))
    ifd = struct.pack("<H", 8) + b"".join(
        [
            entry(256, 3, 1, w),
            entry(257, 3, 1, h),
            entry(258, 3, 1, 8),
            entry(259, 3, 1, 1),
            entry(262, 3, 1, 1),
            entry(273, kind, n, offsets_value),
            entry(278, 3, 1, rows),
            entry(279, kind, n, sizes_value),
        ]
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 4 + pixels + offsets_bytes + sizes_bytes


@pytest.mark.parametrize("strips", [1, 2, 8])
def test_a_tiff_with_as_many_strips_as_rows_loads(strips):
    from model.preprocess import load_image

    img = load_image(_strip_tiff(strips))
    assert img.size == (8, 8) and img.getpixel((7, 7)) == (63, 63, 63)


@pytest.mark.parametrize(("strips", "short"), [(9, False), (100_000, False), (2_000_000, True)])
def test_a_tiff_listing_more_strips_than_rows_is_refused_quickly(tmp_path, strips, short):
    """Pillow reads a strip table whole into Python ints: 3 M entries took 16 s and 1 GB here."""
    path = tmp_path / "strips.tif"
    path.write_bytes(_strip_tiff(strips, short=short))
    out = run_child(
        textwrap.dedent(f"""
        import json, time
        from model.preprocess import ImageError, load_image
        t = time.perf_counter()
        try:
            load_image({str(path)!r})
            message = None
        except ImageError as e:
            message = str(e)
        out = dict(seconds=time.perf_counter() - t, message=message)
        """)
    )
    assert out["message"] == f"strips.tif is a TIFF of 8 x 8 pixels that lists {strips} strips; it can have at most 8"
    assert out["seconds"] < 2 and out["peak_mb"] < 400, out


def test_decoding_stops_at_its_deadline(monkeypatch):
    """Whatever gets past the structural checks stops once decoding has taken DECODE_SECONDS: the
    clock is made to jump 10 s per read, so the deadline passes while the image is decoded."""
    import itertools
    import time as real_time

    from model import preprocess
    from model.preprocess import ImageError, load_image

    data = _progressive_jpeg((256, 256))
    assert load_image(data).size == (256, 256)
    ticks = itertools.count(real_time.monotonic(), 10.0)
    monkeypatch.setattr(preprocess, "_clock", lambda: next(ticks))
    with pytest.raises(ImageError, match=r"slow.jpg took more than 15 s to decode; it was stopped"):
        load_image(data, name="slow.jpg")


def test_overlays_on_a_large_original_are_drawn_at_most_16_mp():
    """The app's 'rollout on the original' download and the CLI's _rollout.png reduce the original
    by a whole factor first (drawing cost 28 bytes a pixel: 1.4 GB for a 50 MP photo)."""
    import numpy as np
    from PIL import Image

    from model.config import Preprocessing
    from model.preprocess import prepare_image
    from viz_app import render

    original = np.zeros((4500, 4000, 3), np.uint8)  # 18 MP
    original[:, 2000:] = 200
    prepared = prepare_image(Image.fromarray(original), Preprocessing())
    small, geometry = render.reduced_original(original, prepared)
    assert small.shape == (2250, 2000, 3) and geometry.original_size == (2000, 2250)
    assert geometry.crop_box == prepared.crop_box and geometry.resized_size == prepared.resized_size
    assert small[:, 999].max() == 0 and small[:, 1000].min() == 200  # a box filter: the edge stays put
    out = render.overlay_on_original(small, geometry, np.ones(prepared.view.shape[0] // 16 * np.ones(2, int)))
    assert out.shape == small.shape
    tiny = original[:100, :100]
    assert render.reduced_original(tiny, prepared)[0] is tiny


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_a_checkpoint_that_does_not_fit_its_config_is_one_line_in_the_cli(tmp_path, change, capsys):
    """Missing, unexpected and wrong-shape keys are listed on one line (the CLI's error is one line)."""
    from safetensors.torch import save_file

    from model import VisionTransformer, ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3)
    m = VisionTransformer(cfg)
    m.init_weights(seed=0)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    if change == "drop":
        del state["blocks.1.norm1.weight"]
    elif change == "extra":
        state["blocks.1.surprise"] = torch.zeros(3)
    else:
        state["blocks.1.norm1.weight"] = torch.zeros(33)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"format": "vit-lens", "config": cfg.to_dict()}))
    image = tmp_path / "x.png"
    __import__("PIL.Image").Image.new("RGB", (40, 40)).save(image)
    rc = cli_main(["analyze", "--model", str(tmp_path), "--out", str(tmp_path / "out"), str(image)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "blocks.1." in err, err  # the key that does not fit is named


def test_a_damaged_file_gives_the_message_and_no_library_warning():
    """Pillow's UserWarning about corrupt EXIF went to stderr beside the one-line message."""
    import warnings

    from model.preprocess import ImageError, load_image

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="text.tif is not an image we can read"):
            load_image(b"II*\x00" + b"\xff" * 20, name="text.tif")
    assert [str(w.message) for w in seen] == []
