"""Frames -> animated GIF and MP4 bytes, for the "layers in motion" views.

Frames are equal-size RGB uint8 pictures (what the page shows, one per layer). GIF: Pillow, each
frame with its own 256-colour palette (median cut, no dithering), looping forever. OpenCV writes
GIFs too, but with one fixed palette: on six overlays of random maps on chelsea.jpg its frames were 16/255
off per channel on average, Pillow's 2.5/255 (measured when this was written; tests/test_staples.py
holds Pillow's GIFs to 4/255). MP4: OpenCV, MPEG-4 Part 2 ('mp4v', the codec
the opencv-python wheels can encode without a hardware H.264 encoder); it plays in VLC, mpv,
QuickTime and most editors, though not in every browser's <video>. MPEG-4 needs even sides:
a frame with an odd side gets one white row or column.
"""

from __future__ import annotations

import io
import os
import tempfile

import cv2
import numpy as np
from PIL import Image


def _frames(frames: list[np.ndarray]) -> list[np.ndarray]:
    if not frames:
        raise ValueError("an animation needs at least one frame")
    shape = frames[0].shape
    if len(shape) != 3 or shape[2] != 3 or any(f.shape != shape for f in frames):
        raise ValueError(f"frames must be equal-size RGB pictures, got {sorted({f.shape for f in frames})}")
    return [np.ascontiguousarray(f[..., ::-1], dtype=np.uint8) for f in frames]  # OpenCV wants BGR


def gif_bytes(frames: list[np.ndarray], fps: float) -> bytes:
    """An animated GIF of the frames at `fps` frames per second, looping forever."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _frames(frames)  # checked
    pictures = [
        Image.fromarray(np.ascontiguousarray(f, dtype=np.uint8)).quantize(
            256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        for f in frames
    ]
    buf = io.BytesIO()
    pictures[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=pictures[1:],
        duration=int(round(1000 / fps)),
        loop=0,
        disposal=1,  # each frame replaces the last whole
        optimize=False,
    )
    return buf.getvalue()


def mp4_bytes(frames: list[np.ndarray], fps: float) -> bytes:
    """An MP4 (MPEG-4 Part 2) of the frames at `fps` frames per second."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    bgr = _frames(frames)
    h, w = bgr[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="vit-lens-")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (W, H))
        if not writer.isOpened():
            raise ValueError("this OpenCV build cannot write MP4")
        for f in bgr:
            if (H, W) != (h, w):
                f = cv2.copyMakeBorder(f, 0, H - h, 0, W - w, cv2.BORDER_CONSTANT, value=(255, 255, 255))
            writer.write(f)
        writer.release()
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)
