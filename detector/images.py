"""Turning a decoded PIL image of any mode into the uint8 array a model's input spec asks for."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_model_array"]

_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


#: Larger images are first shrunk by an integer factor (a box filter: cheap) to at least this many
#: times the target size, then resized; PIL documents its own two-step resize (``reducing_gap``) at 3
#: as indistinguishable from a direct resize in most cases.
REDUCING_GAP = 3.0


def _block_mean(arr: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """``arr`` ``[H, W]`` averaged over ``f × f`` blocks (the last ones partial), ``f`` the largest factor
    that keeps it at least :data:`REDUCING_GAP` times ``size``, in float32 without widening the full
    image; and the box the original extent covers in the reduced image (for the resize after)."""
    f = 1 if size is None else int(min(arr.shape[0] / size[0], arr.shape[1] / size[1]) / REDUCING_GAP)
    if f < 2:
        return arr.astype(np.float32), None
    h, w = arr.shape
    rows = np.add.reduceat(arr, np.arange(0, h, f), axis=0, dtype=np.float32)
    sums = np.add.reduceat(rows, np.arange(0, w, f), axis=1, dtype=np.float32)
    counts = np.outer(np.minimum(f, h - np.arange(0, h, f)), np.minimum(f, w - np.arange(0, w, f)))
    return sums / counts, (0.0, 0.0, w / f, h / f)


def _to_8bit(im: Image.Image, size: tuple[int, int] | None) -> tuple[Image.Image, tuple[float, ...] | None]:
    """High-bit-depth greyscale (16-bit PNG, 32-bit int or float TIFF) to 8-bit by scaling, not clipping;
    a large image is block-averaged towards ``size`` first (see :func:`_block_mean`)."""
    arr = np.asarray(im)
    small, box = _block_mean(arr, size)
    if im.mode.startswith("I;16"):
        scaled = small / 65535.0
    else:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = small
        elif hi > 255 or lo < 0:
            scaled = (small - min(lo, 0.0)) / max(hi - min(lo, 0.0), 1e-12)
        else:
            scaled = small / 255.0
    return Image.fromarray(np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8), mode="L"), box


def to_model_array(im: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 ``H×W×C`` array with ``channels`` (1 or 3) at ``size`` = ``(height, width)``.

    Palette images are expanded, alpha is dropped, 16-bit images are scaled to 8 bits, colour is
    converted to grey (ITU-R 601 luma) or grey replicated to RGB as the model needs; images of
    another size are resized bilinearly. Large grey, RGB and high-depth images are shrunk before their
    mode is converted, so that conversions work on few pixels.
    """
    if channels not in (1, 3):
        raise ValueError(f"models take 1 or 3 channels, not {channels}")
    box = None
    if im.mode in _HIGH_DEPTH:
        im, box = _to_8bit(im, size)
    elif size is not None and im.mode in ("L", "RGB") and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=REDUCING_GAP)
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR, box=box, reducing_gap=REDUCING_GAP)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
