"""Turning an image of any mode into the uint8 array a model's input spec asks for: a decoded PIL image
(:func:`to_model_array`), or an image file read as the service reads an upload (:func:`read_image`)."""

from __future__ import annotations

import os
import posixpath

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "image_files", "read_image", "to_model_array", "upright"]

#: The service's default cap on an upload's width × height, and the offline scan's.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: What counts as an image file in a folder (by suffix, case-insensitive).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

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


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says, as viewers show it (phone photos are stored sideways);
    a malformed EXIF block leaves it as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 -- a broken EXIF block does not make the pixels unusable
        return im


def read_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None,
               max_pixels: int | None = None) -> np.ndarray:
    """The image file at ``path`` as the service decodes an upload: its first frame, upright
    (:func:`upright`), then :func:`to_model_array`.  ``max_pixels`` refuses larger images from the
    header, before decoding; PIL's own decompression-bomb check applies too.

    Raises ``OSError`` (PIL's ``UnidentifiedImageError`` among them), ``ValueError`` or PIL's
    ``DecompressionBombError`` for a file that is not a usable image.
    """
    with Image.open(path) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ValueError(f"{im.width}×{im.height} pixels, more than the {max_pixels:,} allowed")
        im.seek(0)  # the first frame of an animation
        im.load()
        return to_model_array(upright(im), channels, size)


def image_files(root: str | os.PathLike) -> list[str]:
    """The image files under ``root`` (by :data:`IMAGE_SUFFIXES`), as ``/``-separated paths relative to
    it, sorted by folder, then name.  Symbolic links to folders are followed, each real folder once (a link loop or a
    second link to the same folder adds nothing); hidden files and folders (``.name``, such as macOS's
    ``._photo.jpg`` resource forks) are not images and are left out."""
    root = os.fspath(root)
    seen, found = set(), []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                path = os.path.join(folder, name)
                if os.path.isfile(path):  # not a dangling link
                    found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    # torchvision's ImageFolder order (a folder's own files, then each subfolder's): positions in a split
    # stay what they were for bundles that recorded them.
    return sorted(found, key=lambda rel: (posixpath.dirname(rel), posixpath.basename(rel)))
