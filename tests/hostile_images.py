"""Hostile and odd image files, built in memory (no binary blobs in the repository).

Each case: name -> (bytes, expectation) where expectation is "ok" (a correct analysis) or
"error" (one clear message).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 320, h: int = 240) -> Image.Image:
    """A smooth synthetic photo-like RGB image with an off-centre bright blob."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.clip(255 * xx / max(1, w - 1), 0, 255)
    g = np.clip(255 * yy / max(1, h - 1), 0, 255)
    b = 255 * np.exp(-(((xx - 0.3 * w) / (0.1 * w + 1)) ** 2 + ((yy - 0.4 * h) / (0.1 * h + 1)) ** 2))
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 40000) -> bytes:
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def exif_jpeg(orientation: int) -> bytes:
    img = photo()
    exif = img.getexif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", exif=exif, quality=95)


def rotated_jpeg(orientation: int) -> bytes:
    """The same photo with the rotation applied to the pixels (what EXIF asks for)."""
    op = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
    return _save(photo().transpose(op), "JPEG", quality=95)


def cases() -> dict[str, tuple[bytes, str]]:
    png = _save(photo(), "PNG")
    jpg = _save(photo(), "JPEG", quality=90)
    gif_frames = [photo(64, 48), Image.fromarray(255 - np.asarray(photo(64, 48)))]
    gif = io.BytesIO()
    gif_frames[0].save(gif, format="GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    tiff = io.BytesIO()
    gif_frames[0].save(tiff, format="TIFF", save_all=True, append_images=gif_frames[1:])
    pal = photo(64, 48).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    return {
        "zero_bytes.png": (b"", "error"),
        "truncated.png": (png[: len(png) // 2], "error"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "error"),
        "text_named.png": (b"Hello, I am a text file pretending to be a PNG.\n" * 10, "error"),
        "page.png": (b"<!doctype html><html><body><script>alert(1)</script></body></html>", "error"),
        "drawing.svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
            "error",
        ),
        "bomb.png": (bomb_png(), "error"),
        "big_8000x6000.jpg": (_save(photo(8000, 6000), "JPEG", quality=70), "ok"),
        "one_pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
        "thin_3x5000.png": (_save(photo(3, 5000), "PNG"), "ok"),
        "sixteen_bit.png": (_save(Image.fromarray(np.asarray(photo().convert("L"), np.uint16) * 257), "PNG"), "ok"),
        "grey.png": (_save(photo().convert("L"), "PNG"), "ok"),
        "palette_transparent.png": (_save(pal, "PNG", transparency=0), "ok"),
        "rgba.png": (_save(photo().convert("RGBA"), "PNG"), "ok"),
        "cmyk.jpg": (_save(photo().convert("CMYK"), "JPEG"), "ok"),
        "animated.gif": (gif.getvalue(), "ok"),
        "exif3.jpg": (exif_jpeg(3), "ok"),
        "exif6.jpg": (exif_jpeg(6), "ok"),
        "exif8.jpg": (exif_jpeg(8), "ok"),
        "photo.webp": (_save(photo(), "WEBP"), "ok"),
        "multipage.tiff": (tiff.getvalue(), "ok"),
        "photo.bmp": (_save(photo(), "BMP"), "ok"),
    }
