"""bytes -> RGB image -> the tensor the model sees, keeping the geometry to map results back."""

from __future__ import annotations

import io
import math
import re
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Preprocessing
from .errors import ViTLensError

# Raster formats we decode; everything else (SVG, PDF, EPS, ...) is refused before decoding.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG also opens MPO
MAX_PIXELS = 50_000_000  # about 8660 x 5773; decompression bombs claim far more
MAX_BYTES = 50 * 1024 * 1024
# Decode work is bounded apart from pixel count, because a small file can make the decoder loop:
# - a progressive JPEG decodes every scan over the whole image; encoders write about 10 scans (a
#   spectral-selection and successive-approximation script per component), so 100 is generous;
# - a TIFF's strip and tile tables are read whole before any pixel; a table longer than the image
#   can have (one strip per row, one 16 x 16 tile per 256 pixels, per plane) is a lie;
# - whatever gets past those stops when decoding has taken DECODE_SECONDS (checked on every read
#   the decoder makes, that is every 64 kB of the file).
MAX_JPEG_SCANS = 100
MAX_TIFF_ENTRIES = 4096
DECODE_SECONDS = 15.0
_clock = time.monotonic  # the decode deadline's clock (a test replaces it)
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ViTLensError):
    """An upload is not an image we can read."""


def load_image(data: bytes | str | Path, *, name: str = "image") -> Image.Image:
    """Decode bytes or a file into an RGB PIL image: first frame, EXIF orientation applied,
    transparency composited on white, 16-bit and CMYK converted. Raises ImageError."""
    if isinstance(data, (str, Path)):
        p = Path(data)
        name = p.name
        try:
            if p.stat().st_size > MAX_BYTES:
                raise ImageError(f"{name} is larger than {MAX_BYTES // 2**20} MB")
            data = p.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {name}: {e.strerror or e}") from None
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name} is larger than {MAX_BYTES // 2**20} MB")
    _check_decode_work(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged metadata: not for the user
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_DeadlineReader(data, name, DECODE_SECONDS), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name} is {w} x {h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels")
            if w < 1 or h < 1:
                raise ImageError(f"{name} has no pixels")
            img.seek(0)
            img = ImageOps.exif_transpose(img) or img
            img.load()
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image we can read (supported: PNG, JPEG, WebP, BMP, TIFF, GIF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name} claims too many pixels (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError(
            f"{name} is damaged or truncated: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


class _DeadlineReader(io.BytesIO):
    """The file as the decoder sees it: every read first checks that decoding has not run past its
    time (decoders pull their input in blocks, so a slow decode is stopped within one block)."""

    def __init__(self, data: bytes, name: str, seconds: float) -> None:
        super().__init__(data)
        self.name_, self.seconds, self.deadline = name, seconds, _clock() + seconds

    def read(self, size: int | None = -1) -> bytes:
        if _clock() > self.deadline:
            raise ImageError(f"{self.name_} took more than {self.seconds:g} s to decode; it was stopped")
        return super().read(size)


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in entropy-coded data: a real marker


def _check_decode_work(data: bytes, name: str) -> None:
    """Refuse, before decoding, files whose structure declares more work than their pixels need."""
    if data[:2] == b"\xff\xd8":
        scans = _jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise ImageError(f"{name} is a JPEG of {scans} scans; the limit is {MAX_JPEG_SCANS}")
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff_tables(data, name)


def _jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) of the first image in a JPEG stream, walking its segments
    (an APP segment's content, e.g. an EXIF thumbnail, is skipped, not counted)."""
    i, scans, n = 2, 0, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return scans  # not a marker where one must be: the decoder will say the file is damaged
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            return scans
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            scans += 1
            found = _JPEG_MARKER.search(data, i)
            if found is None:
                return scans
            i = found.start()
    return scans


_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def _check_tiff_tables(data: bytes, name: str) -> None:
    """A TIFF's first directory: its entry count, and its strip or tile tables against the number of
    strips or tiles its width, height and layout allow (libtiff and Pillow read those tables whole)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, offset)
            entry, head, fmt = 20, 8, order + "HHQ"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, offset)
            entry, head, fmt = 12, 2, order + "HHI"
        if count > MAX_TIFF_ENTRIES:
            raise ImageError(f"{name} is a TIFF whose directory has {count} entries; the limit is {MAX_TIFF_ENTRIES}")
        tags: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, first value if inline)
        for k in range(count):
            at = offset + head + k * entry
            tag, kind, n = struct.unpack_from(fmt, data, at)
            value_at = at + 12 if big else at + 8  # the value (or its offset) follows tag, type and count
            width = _TIFF_TYPE_BYTES.get(kind, 1)
            first = 0
            if width * n <= (8 if big else 4) and kind in (3, 4, 16):
                first = struct.unpack_from(order + {3: "H", 4: "I", 16: "Q"}[kind], data, value_at)[0]
            tags[tag] = (kind, n, first)
    except struct.error:
        return  # a truncated directory: the decoder reports the damage

    def value(tag: int, default: int) -> int:
        return tags[tag][2] if tag in tags and tags[tag][1] == 1 else default

    w, h = max(1, value(256, 1)), max(1, value(257, 1))
    planes = max(1, value(277, 1)) if value(284, 1) == 2 else 1
    if 322 in tags or 324 in tags:  # tiles are at least 16 x 16 pixels
        limit, what = math.ceil(w / 16) * math.ceil(h / 16) * planes, "tiles"
    else:  # a strip is at least one row
        limit, what = h * planes, "strips"
    for tag in (273, 279, 324, 325):
        if tag in tags and tags[tag][1] > limit:
            raise ImageError(
                f"{name} is a TIFF of {w} x {h} pixels that lists {tags[tag][1]} {what}; it can have at most {limit}"
            )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class PreparedImage:
    """The model input and how it was cut from the original.

    pixels: (3, H, W) float32, normalized. view: (H, W, 3) uint8, what the model sees.
    original_size and resized_size are (W, H); crop_box is (left, top, right, bottom) in the
    resized image.
    """

    pixels: torch.Tensor
    view: np.ndarray
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """A point in model-input pixels -> the same point in the original image."""
        sx = self.original_size[0] / self.resized_size[0]
        sy = self.original_size[1] / self.resized_size[1]
        return ((x + self.crop_box[0]) * sx, (y + self.crop_box[1]) * sy)


# Above this many pixels the resized image is never made whole (see prepare_image): 64 MP, 192 MB
# of RGB, far above any normal photo's resize (a 50 MP photo's shorter side becomes 256 px).
MAX_RESIZED_PIXELS = 64 * 2**20


def prepare_image(img: Image.Image, pre: Preprocessing) -> PreparedImage:
    """RGB image -> the model's input, resized and cropped as the weights expect."""
    H, W = pre.input_size
    w0, h0 = img.size
    if pre.mode == "squash":
        size, box = (W, H), (0, 0, W, H)
    else:
        # Resize so that the image covers the scaled crop, keeping aspect (timm's shorter-side
        # resize for square inputs), then center-crop.
        sh, sw = int(H / pre.crop_pct), int(W / pre.crop_pct)
        if sh == sw:
            short, long_ = (w0, h0) if w0 <= h0 else (h0, w0)
            new_long = max(sw, int(sw * long_ / short))
            size = (sw, new_long) if w0 <= h0 else (new_long, sw)
        else:
            scale = max(sw / w0, sh / h0)
            size = (max(sw, round(w0 * scale)), max(sh, round(h0 * scale)))
        left = int(round((size[0] - W) / 2.0))
        top = int(round((size[1] - H) / 2.0))
        box = (left, top, left + W, top + H)
    if size[0] * size[1] > MAX_RESIZED_PIXELS and box != (0, 0, *size):
        # An extreme aspect ratio (a 1 x 400000 strip) would make the full resize gigabytes: resample
        # only the source region that the crop keeps, at the same scale (PIL's resize with a box).
        sx, sy = size[0] / w0, size[1] / h0
        source = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
        view = np.asarray(img.resize((W, H), RESAMPLE[pre.interpolation], box=source), dtype=np.uint8)
        return _finish(view, pre, (w0, h0), size, box)
    resized = img.resize(size, RESAMPLE[pre.interpolation]) if size != (w0, h0) else img
    view = np.asarray(resized.crop(box) if box != (0, 0, *size) else resized, dtype=np.uint8)
    return _finish(view, pre, (w0, h0), size, box)


def _finish(view: np.ndarray, pre: Preprocessing, orig, resized, box) -> PreparedImage:
    x = torch.from_numpy(view.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(pre.mean, device="cpu").view(3, 1, 1)  # pixels are prepared on the host
    std = torch.tensor(pre.std, device="cpu").view(3, 1, 1)
    return PreparedImage(
        pixels=(x - mean) / std,
        view=np.ascontiguousarray(view),
        original_size=tuple(orig),
        resized_size=tuple(resized),
        crop_box=tuple(box),
    )
