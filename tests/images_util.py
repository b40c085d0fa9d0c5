"""Image bytes for the service tests: real encodings in every format and mode, and hostile files.

Hostile headers are written byte by byte (valid CRCs where the format has them), so the service
sees exactly what an attacker would send: a header announcing a huge or empty image with next to
no data behind it.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = [
    "FORMATS",
    "MIME",
    "animated_gif",
    "bmp_header",
    "encode",
   
    "gif_header",
    "jpeg_with_scans",
    "jpeg_with_size",
    "png_header",
   
    "to_mode",
    "webp_header",
]

FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "WEBP": "image/webp", "GIF": "image/gif"}


def to_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """A uint8 H×W grey image in ``mode`` (RGB, RGBA, L, LA, P, 1, I;16, CMYK…), same picture."""
    base = Image.fromarray(grey, "L")
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16, the full 16-bit range
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(200)
        return rgba
    return base.convert(mode)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    """``im`` encoded as ``fmt`` (lossless where the format allows, unless options say otherwise)."""
    buf = io.BytesIO()
    if fmt == "WEBP":
        options.setdefault("lossless", True)
    if fmt == "JPEG":
        options.setdefault("quality", 95)
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def animated_gif(frames: list[np.ndarray]) -> bytes:
    """An animated GIF of grey frames (the service must answer for the first)."""
    images = [Image.fromarray(f, "L").convert("P") for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG announcing ``width × height`` grey pixels, with a tiny (or given) IDAT and valid CRCs."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame are ``width × height``, with almost no LZW data."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00"
    return screen + frame + b"\x02\x02\x4c\x01\x00\x3b"


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP announcing ``width × height`` with a few bytes of pixels."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return head + info + pixels


def webp_header(width: int, height: int) -> bytes:
    """A lossless WebP (VP8L) announcing ``width × height`` (each at most 16384)."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    chunk = b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is rewritten to announce ``width × height``."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker found")


def jpeg_with_scans(n: int, side: int = 64) -> bytes:
    """A progressive grey ``side × side`` JPEG whose last scan is repeated until it has ``n`` scans:
    each repeat adds a few bytes to the file and a pass over the image to its decoding."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=50)
    scans = data.count(b"\xff\xda")
    last = data.rfind(b"\xff\xda")
    assert data.endswith(b"\xff\xd9") and n >= scans
    return data[:-2] + data[last:-2] * (n - scans) + b"\xff\xd9"


def with_parts(data: bytes, fmt: str, n: int) -> bytes:
    """A real ``fmt`` image with ``n`` empty parts of the kind PIL reads one at a time added: PNG chunks
    (unknown, ancillary, CRC-valid), JPEG comment segments before the frame, GIF comment sub-blocks."""
    if fmt == "PNG":
        return data[:33] + _chunk(b"zzZz", b"") * n + data[33:]  # after IHDR
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe\x00\x02" * n + data[2:]
    if fmt == "GIF":
        start = 13 + (3 * (2 << (data[10] & 7)) if data[10] & 0x80 else 0)
        return data[:start] + b"\x21\xfe" + b"\x01c" * (n - 1) + b"\x00" + data[start:]
    raise ValueError(fmt)


def rle_bmp() -> bytes:
    """A 2×2 8-bit BMP compressed with RLE8 (two runs of two pixels)."""
    pixels = b"\x02\x00\x00\x00" + b"\x02\x01\x00\x01"  # 2 × index 0, end of line; 2 × index 1, end of bitmap
    palette = b"\x00\x00\x00\x00" + b"\xff\xff\xff\x00" + b"\x00" * 4 * 254
    info = struct.pack("<IiiHHIIiiII", 40, 2, 2, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
