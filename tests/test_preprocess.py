"""Image decoding and preprocessing: geometry as timm/transformers do it, odd image modes."""

import io

import numpy as np
import pytest
from PIL import Image

from model import Preprocessing, load_image, prepare_image
from model.preprocess import ImageError


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_center_crop_geometry_like_timm():
    img = Image.new("RGB", (300, 200))
    p = prepare_image(img, Preprocessing(input_size=224, crop_pct=0.875))
    # shorter side -> int(224 / 0.875) = 256, longer side int(256 * 300 / 200) = 384; crop 224 centred
    assert p.resized_size == (384, 256) and p.crop_box == (80, 16, 304, 240)
    assert p.view.shape == (224, 224, 3) and p.pixels.shape == (3, 224, 224)
    assert p.to_original(0, 0) == pytest.approx((80 * 300 / 384, 16 * 200 / 256))


def test_squash_and_normalization():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    p = prepare_image(img, Preprocessing(input_size=(20, 40), mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3))
    assert p.view.shape == (20, 40, 3) and p.crop_box == (0, 0, 40, 20)
    np.testing.assert_allclose(p.pixels[:, 5, 5].numpy(), [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)


def test_exif_rotation_equals_rotated_pixels():
    base = np.zeros((40, 60, 3), np.uint8)
    base[:10, :20] = 255  # a marker in the top-left corner
    img = Image.fromarray(base)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = load_image(_png(img, format="JPEG", exif=exif, quality=100))
    rotated = load_image(_png(img.transpose(Image.Transpose.ROTATE_270), format="JPEG", quality=100))
    assert tagged.size == rotated.size == (40, 60)
    assert np.abs(np.asarray(tagged, int) - np.asarray(rotated, int)).mean() < 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)),  # 16-bit grey
        lambda: Image.new("L", (8, 8), 100),
        lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)),
        lambda: Image.new("P", (8, 8)),
        lambda: Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
    ],
)
def test_odd_modes_become_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = load_image(_png(img, format=fmt))
    assert out.mode == "RGB" and out.size == img.size


def test_transparent_pixels_become_white():
    out = load_image(_png(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "data,msg",
    [
        (b"", "empty"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "not an image"),
        (b"<html>nope</html>", "not an image"),
    ],
)
def test_bad_bytes(data, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(data, name="upload.png")


def test_truncated_png():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_without_decoding():
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)  # claims 40000 x 40000 RGB
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    assert len(data) < 1000
    with pytest.raises(ImageError, match="pixels|bomb"):
        load_image(data)


def test_transformers_defaults_without_a_preprocessor_config():
    """What each model_type gets from hf_hints when its folder has no preprocessor_config.json."""
    from model.config import CLIP_MEAN, IMAGENET_MEAN
    from model.weights.configs import hf_hints

    vit = hf_hints({"model_type": "vit"}).preprocessing
    assert (vit.mode, vit.crop_pct, vit.interpolation) == ("squash", 1.0, "bilinear")  # ViTImageProcessor
    assert vit.mean == vit.std == (0.5, 0.5, 0.5)
    for mt, mean, crop_pct in [
        ("deit", IMAGENET_MEAN, 0.875),
        ("dinov2", IMAGENET_MEAN, 224 / 256),
        ("dinov2_with_registers", IMAGENET_MEAN, 224 / 256),
        ("clip", CLIP_MEAN, 1.0),
    ]:
        cfg = {"model_type": mt, "vision_config": {"model_type": "clip_vision_model"}} if mt == "clip" else {}
        pre = hf_hints(cfg or {"model_type": mt}).preprocessing
        assert (pre.mode, pre.crop_pct, pre.interpolation, pre.mean) == ("crop", crop_pct, "bicubic", mean), mt
