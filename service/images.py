"""Checking and decoding untrusted image uploads.

Order of checks, cheapest first, so that nothing expensive happens to a hostile file:

1. empty file;
2. format sniffed from the magic bytes, against the allowlist (PNG, JPEG, BMP, WebP, GIF);
3. the part's declared content type, which must agree with the sniffed format when it names one;
4. the dimensions the header announces, read by :func:`header_dimensions` before PIL sees the
   file: zero sizes, and width × height against the pixel cap; checked again on what PIL's lazy
   ``open`` (header only) reports, with PIL's own decompression-bomb guard as a last line;
   for JPEG also a file too short for the frame it announces, and more scans than
   :data:`JPEG_MAX_SCANS` (each a decoding pass over the image); for every format the count of the
   container's parts that PIL reads one at a time in Python (:data:`MAX_PARTS`), and RLE-compressed
   BMP, which PIL decodes pixel by pixel in Python;
5. decoding (first frame only), where truncated or corrupt data fails;
6. conversion to the model's input spec by :func:`detector.images.to_model_array`.

Every failure raises :class:`ImageRejected` carrying the HTTP status and a message that says what
was wrong; the caller turns it into a 4xx JSON answer.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin

from detector.images import to_model_array, upright

__all__ = [
    "ALLOWED_FORMATS",
    "JPEG_MAX_METADATA_BYTES",
    "JPEG_MAX_SCANS",
    "MAX_EXIF_BYTES",
    "MAX_PARTS",
    "ImageRejected",
    "UploadInfo",
    "check_format",
    "container_parts",
    "jpeg_header",
    "decode_image",
    "decode_upload",
    "header_dimensions",
    "jpeg_min_bytes",
    "jpeg_scans",
    "sniff_format",
]

# PIL format name → content types that declare it.
ALLOWED_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": ("image/png", "image/x-png", "image/apng"),
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "BMP": ("image/bmp", "image/x-bmp", "image/x-ms-bmp"),
    "WEBP": ("image/webp",),
    "GIF": ("image/gif",),
}
# Progressive JPEGs have about ten scans; each one more costs the decoder a pass over the image. The
# limit is nvImageCodec's default (NVIMGCODEC_MAX_JPEG_SCANS), set after an audit of libjpeg-turbo.
JPEG_MAX_SCANS = 256

# PIL reads PNG chunks, the JPEG segments before the first scan (and the bytes it skips between them)
# and GIF blocks before the first image one at a time in Python, at 3–8 µs each: a 10 MB file of empty
# ones held a decode thread for 6–16 s. Images have tens of them, a large PNG a few thousand.
MAX_PARTS = 10_000

# PIL parses EXIF whole (a JPEG's on open, every format's to turn the image upright), a Python step per
# entry: 0.79 MB of entries held a decode thread for 4.5 s. One APP1 segment, the JPEG standard's room for
# EXIF, holds 64 kB.
MAX_EXIF_BYTES = 65_536
# Metadata before a JPEG's first scan (EXIF, ICC profile, XMP, Photoshop blocks, tables), some of which PIL
# parses byte by byte in Python: 10 MB of Photoshop records or quantisation tables held it 1.6 s.
JPEG_MAX_METADATA_BYTES = 2 * 1024 * 1024

# Content types that make no claim about the format.
_NEUTRAL_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}


# Between Image.MAX_IMAGE_PIXELS and twice that PIL only warns (above, it raises); the explicit cap
# in decode_image decides, so the warning is noise.  (A process-wide filter: catch_warnings is not
# thread-safe and decoding runs in threads.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(ValueError):
    """An upload that cannot be served; ``status`` is the HTTP status, ``code`` a stable keyword."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes announce (PIL's name), or ``None`` when unrecognised.

    Allowed formats and a few common others (so that the error can name them) are recognised.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
        return "ISO media (video or HEIF)"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    return None


def header_dimensions(data: bytes, fmt: str) -> tuple[int, int] | None:
    """``(width, height)`` as the file's own header announces them, read without PIL.

    ``None`` when the header is too short or malformed to say (PIL then gets to reject it).
    For WebP this is the canvas, for GIF the logical screen, for JPEG the first SOF frame.
    """
    try:
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            (dib_size,) = struct.unpack("<I", data[14:18])
            if dib_size == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # negative height: top-down rows
        if fmt == "WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L" and data[20:21] == b"\x2f":
                (bits,) = struct.unpack("<I", data[21:25])
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
            return None
        if fmt == "JPEG":
            i = _jpeg_frame_header(data)
            if i is None:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
    except struct.error:
        return None
    return None


# PIL's own table: which markers its JPEG reader knows, and which of them carry a segment.
_PIL_JPEG_MARKERS = JpegImagePlugin.MARKER
_JPEG_FRAMES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # SOFn
_JPEG_STANDALONE = (0x01, *range(0xD0, 0xD8))  # TEM, RSTn: markers without a length
# Between segments, any 0xFF not followed by 0x00 is a marker; libjpeg (and PIL) skip other bytes.
_JPEG_ANY_MARKER = re.compile(rb"\xff(?=[^\x00])")


def _jpeg_frame_header(data: bytes) -> int | None:
    """Where the JPEG's frame header (SOFn marker) starts, walking the segments as libjpeg reads them
    (bytes between segments skipped as it skips them), or ``None`` when a scan, the end of the image, a
    length below 2 or the end of the data comes first."""
    i, steps = 2, 0
    while i + 4 <= len(data) and steps <= MAX_PARTS:  # past the cap the upload is refused anyway
        steps += 1
        if data[i] != 0xFF or data[i + 1] == 0x00:  # not a marker: skipped, as libjpeg does (with a warning)
            found = _JPEG_ANY_MARKER.search(data, i + 1)
            if found is None:
                return None
            i = found.start()
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            return None
        if marker in _JPEG_FRAMES:
            return i
        i += 2 + length
    return None


@dataclass(frozen=True)
class JpegHeader:
    """What PIL's JPEG reader walks before the first scan, one step at a time in Python."""

    steps: int  # markers, and bytes skipped between them (counted no further than the cap + 1)
    metadata_bytes: int  # bytes from the start of the file to the first scan
    exif_bytes: int  # of the APP1 Exif segments, which PIL joins and parses whole


def jpeg_header(data: bytes, stop_after: int = MAX_PARTS) -> JpegHeader:
    """The walk PIL's JPEG reader makes to the first scan (``JpegImagePlugin._open``, with PIL's own table
    of which markers carry a segment), counting its steps no further than ``stop_after + 1``."""
    i, steps, exif = 2, 0, 0
    while i + 1 < len(data) and steps <= stop_after:
        if data[i] != 0xFF:  # junk: PIL reads it a byte at a time
            found = data.find(b"\xff", i)
            if found < 0:
                i = len(data)
                break
            steps, i = steps + found - i, found
            continue
        marker = data[i + 1]
        steps += 1
        if marker in (0xFF, 0x00):  # fill byte, or an escaped 0xFF
            i += 1 if marker == 0xFF else 2
            continue
        entry = _PIL_JPEG_MARKERS.get(0xFF00 | marker)
        if entry is None or marker == 0xDA:  # not a marker PIL knows (it stops there), or the first scan
            break
        if entry[2] is None:  # a marker without a segment: SOI, EOI, RSTn, JPGn (PIL reads on past EOI)
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            exif += max(length - 2, 0)
        i += 2 + max(length, 2)
    return JpegHeader(min(steps, stop_after + 1), min(i, len(data)), exif)


def container_parts(data: bytes, fmt: str, stop_after: int = MAX_PARTS) -> int:
    """At least as many as the parts of the file PIL reads one at a time in Python before (PNG: and
    after) the pixel data, counting no further than ``stop_after + 1``: PNG chunks, JPEG segments and
    skipped bytes before the first scan, GIF extension sub-blocks and stray bytes before the first image."""
    if fmt == "PNG":
        i, parts, seen_data = 8, 0, False
        while i + 8 <= len(data) and parts <= stop_after:
            kind = data[i + 4:i + 8]
            if kind == b"IEND" or (kind == b"fcTL" and seen_data):  # the end, or an animation's next frame
                break
            parts, seen_data = parts + 1, seen_data or kind == b"IDAT"
            i += 12 + int.from_bytes(data[i:i + 4], "big")
        return min(parts, stop_after + 1)
    if fmt == "JPEG":
        return jpeg_header(data, stop_after).steps
    if fmt == "GIF" and len(data) >= 13:
        i, parts = 13, 0
        if data[10] & 0x80:  # a global colour table
            i += 3 * (2 << (data[10] & 7))
        while i < len(data) and parts <= stop_after:
            if data[i] == 0x21:  # an extension: its label, then sub-blocks up to an empty one
                i += 2
                while i < len(data) and parts <= stop_after:
                    size = data[i]
                    i, parts = i + 1 + size, parts + 1
                    if size == 0:
                        break
            elif data[i] in (0x2C, 0x3B):  # the first image, or the end
                break
            else:  # a stray byte, which PIL reads and passes over
                i, parts = i + 1, parts + 1
        return min(parts, stop_after + 1)
    return 0


def jpeg_min_bytes(data: bytes) -> int | None:
    """The fewest bytes a complete JPEG of the frame its SOF announces can have, or ``None``.

    Every 8×8 block of every component costs at least one bit of entropy-coded data (its DC code; a
    sequential scan adds an end-of-block code). A file shorter than that was cut: libjpeg decodes such
    a file without an error when it ends in an EOI marker, filling what is missing with grey.
    """
    i = _jpeg_frame_header(data)
    if i is None:
        return None
    try:
        height, width, n = struct.unpack(">HHB", data[i + 5:i + 10])
        factors = [(data[i + 11 + 3 * c] >> 4, data[i + 11 + 3 * c] & 0x0F) for c in range(n)]
    except (struct.error, IndexError):
        return None
    if not factors or min(min(f) for f in factors) == 0:  # no component, or a zero sampling factor
        return None
    h_max, v_max = max(f[0] for f in factors), max(f[1] for f in factors)
    blocks = sum(-(-width * h // (8 * h_max)) * -(-height * v // (8 * v_max)) for h, v in factors)
    return blocks // 8


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """At least as many as the scans libjpeg can decode in the file, counting no further than ``stop_after + 1``.

    A progressive JPEG refines the whole image once per scan, so the decoder's work grows with their
    number while the file grows by a few bytes per scan. Every scan starts with the bytes FF DA, which
    entropy-coded data cannot hold (an FF there is followed by 00 or a restart marker), so counting the
    pair bounds the scans however the segments around them are crafted: libjpeg skips junk between
    segments, short lengths and unknown markers at restart points, which a parse of the segments could
    be led to miss. Metadata (an EXIF thumbnail, an ICC profile) may hold the pair too, and counts.
    """
    return min(data.count(b"\xff\xda"), stop_after + 1)


def _check_dimensions(fmt: str, width: int, height: int, max_pixels: int, source: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageRejected(400, "invalid_dimensions",
                            f"the {fmt} {source} announces {width}×{height} pixels: an image needs both "
                            "dimensions above zero")
    if width * height > max_pixels:
        raise ImageRejected(
            413, "image_too_large",
            f"the {fmt} {source} announces {width}×{height} = {width * height:,} pixels, over the limit "
            f"of {max_pixels:,} (DETECTOR_MAX_PIXELS); it was not decoded",
        )


def _declared_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _describe(head: bytes) -> str:
    text = head[:16]
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        return f"it starts with text {text.decode('ascii')!r}"
    return f"its first bytes are {text.hex(' ')}"


def check_format(data: bytes, content_type: str | None) -> str:
    """Steps 1 to 3: the sniffed, allowed format, or :class:`ImageRejected`."""
    if not data:
        raise ImageRejected(400, "empty_file", "the uploaded file is empty")
    fmt = sniff_format(data[:32])
    allowed = ", ".join(name if name != "WEBP" else "WebP" for name in ALLOWED_FORMATS)
    if fmt is None:
        raise ImageRejected(415, "not_an_image",
                            f"the upload is not a recognised image ({_describe(data)}); send one of {allowed}")
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(415, "unsupported_format", f"{fmt} images are not supported; send one of {allowed}")
    declared = _declared_type(content_type)
    if declared not in _NEUTRAL_TYPES and declared not in ALLOWED_FORMATS[fmt]:
        raise ImageRejected(
            415, "content_type_mismatch",
            f"the part's declared content type is {declared!r} but the data is a {fmt} image "
            f"(declare {ALLOWED_FORMATS[fmt][0]!r} or application/octet-stream)",
        )
    return fmt


@dataclass(frozen=True)
class UploadInfo:
    """What the upload was before it became the model's input."""

    format: str
    width: int
    height: int
    mode: str
    resized: bool  # to the model's input size
    converted: bool  # to the model's channels (colour to grey, grey to RGB, palette, alpha, 16-bit)


def decode_image(
    data: bytes,
    content_type: str | None,
    *,
    channels: int,
    size: tuple[int, int],
    max_pixels: int,
) -> np.ndarray:
    """Check and decode one upload to the uint8 ``H×W×C`` array the model's input spec asks for.

    ``size`` is ``(height, width)``.  Raises :class:`ImageRejected` for anything unservable.
    """
    return decode_upload(data, content_type, channels=channels, size=size, max_pixels=max_pixels)[0]


def decode_upload(
    data: bytes,
    content_type: str | None,
    *,
    channels: int,
    size: tuple[int, int],
    max_pixels: int,
) -> tuple[np.ndarray, UploadInfo]:
    """:func:`decode_image`, and what the upload was: format, size and mode, and whether it was
    resized or converted on the way."""
    fmt = check_format(data, content_type)
    if fmt == "BMP" and len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40 \
            and int.from_bytes(data[30:34], "little") in (1, 2):
        raise ImageRejected(415, "unsupported_format",
                            "RLE-compressed BMP images are not supported: the decoder expands them pixel by pixel "
                            "in Python (a 17 kB file held it for 6 s); send the BMP uncompressed, or a PNG")
    if fmt == "JPEG":
        header = jpeg_header(data)
        if header.exif_bytes > MAX_EXIF_BYTES or header.metadata_bytes > JPEG_MAX_METADATA_BYTES:
            raise ImageRejected(400, "metadata_too_large",
                                f"the JPEG carries {header.exif_bytes:,} bytes of EXIF and {header.metadata_bytes:,} "
                                f"bytes before its image data; at most {MAX_EXIF_BYTES:,} and "
                                f"{JPEG_MAX_METADATA_BYTES:,} are read (the decoder parses them in Python): "
                                "strip the metadata and send it again")
    if container_parts(data, fmt) > MAX_PARTS:
        part = {"PNG": "chunks", "JPEG": "segments and skipped bytes before its first scan",
                "GIF": "blocks before its first image"}[fmt]
        raise ImageRejected(400, "too_many_parts",
                            f"the {fmt} has more than {MAX_PARTS:,} {part} (an image has tens, a large PNG a few "
                            f"thousand); the decoder reads each one on its own, so it was not decoded")
    announced = header_dimensions(data, fmt)
    if announced is not None:  # the pixel cap, before PIL touches the file
        _check_dimensions(fmt, *announced, max_pixels, "header")
    if fmt == "JPEG":
        needed = jpeg_min_bytes(data)
        if needed is not None and len(data) < needed:
            w, h = announced or (0, 0)
            raise ImageRejected(400, "corrupt_image",
                                f"the JPEG is truncated: a complete {w}×{h} JPEG has at least {needed:,} bytes of "
                                f"image data, this file has {len(data):,} bytes in all")
        if jpeg_scans(data, JPEG_MAX_SCANS) > JPEG_MAX_SCANS:
            raise ImageRejected(400, "too_many_scans",
                                f"the JPEG has more than {JPEG_MAX_SCANS} scans (a progressive JPEG has about ten); "
                                "each one costs a pass over the whole image, so it was not decoded")
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:  # frames that enlarge a GIF's screen, past twice the cap
        raise ImageRejected(413, "image_too_large",
                            f"the {fmt} image's frames make it larger than the limit of {max_pixels:,} pixels "
                            f"(DETECTOR_MAX_PIXELS); it was not decoded") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected(400, "corrupt_image",
                            f"the data starts like a {fmt} image but its header is invalid") from exc
    except Exception as exc:  # SyntaxError, struct.error, OSError… on a broken header
        raise ImageRejected(400, "corrupt_image", f"the {fmt} header cannot be read: {_reason(exc)}") from exc
    try:
        # Again as PIL read it (GIF frames may enlarge the screen; a header we could not parse).
        _check_dimensions(fmt, *im.size, max_pixels, "image")
        exif = len(im.info.get("exif") or b"")
        raw_exif = len(im.info.get("Raw profile type exif") or "") // 2  # hex digits, as some PNG writers keep it
        if max(exif, raw_exif) > MAX_EXIF_BYTES:
            raise ImageRejected(400, "metadata_too_large",
                                f"the {fmt} carries {max(exif, raw_exif):,} bytes of EXIF; at most {MAX_EXIF_BYTES:,} "
                                "are read (the decoder parses them in Python): strip the metadata and send it again")
        original, mode = im.size, im.mode  # before JPEG draft mode shrinks them
        try:
            if fmt == "JPEG":
                # Let the JPEG decoder downscale by up to 8 in the DCT domain when the image is far
                # larger than the model's input: less work and memory, same result after resizing.
                im.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
            im.seek(0)  # the first frame of an animation
            im.load()
        except ImageRejected:
            raise
        except Exception as exc:  # OSError (truncated), SyntaxError, zlib.error, EOFError…
            raise ImageRejected(400, "corrupt_image",
                                f"the {fmt} image is truncated or corrupt: {_reason(exc)}") from exc
        oriented = upright(im)
        try:
            array = to_model_array(oriented, channels, size)
        except Exception as exc:
            raise ImageRejected(400, "unsupported_mode",
                                f"the {fmt} image's mode {im.mode!r} cannot be converted: {_reason(exc)}") from exc
        width, height = original
        if oriented.size != im.size and oriented.size == (im.size[1], im.size[0]):  # EXIF rotated it
            width, height = height, width
        info = UploadInfo(fmt, width, height, mode, resized=(height, width) != tuple(size),
                          converted=mode != ("L" if channels == 1 else "RGB"))
        return array, info
    finally:
        im.close()


def _reason(exc: BaseException) -> str:
    """What went wrong, in our words: the decoder's own message names its internals, not the client's file."""
    if isinstance(exc, (EOFError, OSError)) and "truncated" in str(exc).lower():
        return "the data ends before the image does"
    if isinstance(exc, zlib.error):
        return "its compressed data is corrupt"
    if isinstance(exc, (SyntaxError, struct.error, EOFError)):
        return "its structure is malformed"
    if isinstance(exc, ValueError) and "decompressed data too large" in str(exc).lower():
        return "a compressed metadata chunk (text or colour profile) decompresses past the decoder's limit"
    if isinstance(exc, ValueError):
        return "it uses a feature the decoder does not support"
    return "its data does not decode"
