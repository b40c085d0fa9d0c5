"""Turning a decoded PIL image of any mode into the uint8 array a model's input spec asks for."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_model_array"]

_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth greyscale (16-bit PNG, 32-bit int or float TIFF) to 8-bit by scaling, not clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 65535.0
    else:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr.astype(np.float64)
        elif hi > 255 or lo < 0:
            scaled = (arr.astype(np.float64) - min(lo, 0.0)) / max(hi - min(lo, 0.0), 1e-12)
        else:
            scaled = arr.astype(np.float64) / 255.0
    return Image.fromarray(np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8), mode="L")


def to_model_array(im: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 ``H×W×C`` array with ``channels`` (1 or 3) at ``size`` = ``(height, width)``.

    Palette images are expanded, alpha is dropped, 16-bit images are scaled to 8 bits, colour is
    converted to grey (ITU-R 601 luma) or grey replicated to RGB as the model needs; images of
    another size are resized bilinearly.
    """
    if channels not in (1, 3):
        raise ValueError(f"models take 1 or 3 channels, not {channels}")
    if im.mode in _HIGH_DEPTH:
        im = _to_8bit(im)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
