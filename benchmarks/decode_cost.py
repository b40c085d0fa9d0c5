"""Item 5: what one hostile upload costs the server to decode, at the service's pixel cap.

Each case is an image that is small on the wire and large once decoded (a solid colour compresses to
kilobytes): the worst a client can send per byte. Each goes through the service's own decoder
(:func:`service.images.decode_upload`, checks + decode + conversion to the model's input), for a
32×32 RGB model, at the default ``DETECTOR_MAX_PIXELS``. Time is the median over repeats; memory is
the growth of the process's peak RSS during the case's first decode (taken in a fresh process per case,
so that one case's peak does not hide the next).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .common import REPO, Section, Stats, Table, Target, fmt_time_stats, load_average

#: Time a worst-case image at the cap may take to decode on one core.
TARGET_SECONDS = 0.5

CASES = (
    # (name, PIL mode, format, save kwargs)
    ("PNG, 16-bit grey", "I;16", "PNG", {}),
    ("PNG, 8-bit RGB", "RGB", "PNG", {}),
    ("WebP, lossless RGB", "RGB", "WEBP", {"lossless": True}),
    ("JPEG, RGB (decoded at 1/8 scale)", "RGB", "JPEG", {"quality": 75}),
    ("JPEG, progressive RGB", "RGB", "JPEG", {"quality": 75, "progressive": True}),
    ("GIF, palette", "P", "GIF", {}),
    ("BMP, RGB", "RGB", "BMP", {}),
)

_CHILD = r"""
import io, json, resource, sys, time
from PIL import Image
from service.images import decode_upload
mode, fmt, kwargs, width, height, max_pixels, repeats = json.loads(sys.argv[1])
if fmt == "WEBP" and max(width, height) > 16383:
    width, height = 16383, max_pixels // 16383
buf = io.BytesIO()
Image.new(mode, (width, height)).save(buf, fmt, **kwargs)
data = buf.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    t = time.perf_counter()
    decode_upload(data, None, channels=3, size=(32, 32), max_pixels=max_pixels)
    times.append(time.perf_counter() - t)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes": len(data), "size": [width, height], "times": times, "rss_kib": after - before}))
"""


def run(quick: bool = False, log=print) -> Section:
    from service.settings import Settings

    started = time.perf_counter()
    load_before = load_average()
    max_pixels = Settings.model_fields["max_pixels"].default
    side = int(max_pixels ** 0.5)
    repeats = 2 if quick else 5
    section = Section(
        key="decode",
        title="5. Decode cost of one upload at the pixel cap",
        description=(
            f"Images small on the wire and {max_pixels:,} pixels ({side}×{side}, the default `DETECTOR_MAX_PIXELS`) "
            "once decoded, each through the service's own decoder (`service.images.decode_upload`: checks, decode, "
            "conversion to a 32×32 RGB model's input), in a fresh process per case; time is the median (IQR) of "
            f"{repeats} decodes on one thread, memory the growth of peak RSS during them. Lossless WebP is capped "
            "at 16383 pixels a side by the format, so its case is 16383 × (cap / 16383)."),
        command="",
        load_before=load_before,
    )
    if quick:
        side = 1024
        max_pixels = side * side
    table = Table("Decode cost per image", ["image", "bytes on the wire", "decoded size", "time", "peak RSS growth"])
    raw: list[dict[str, Any]] = []
    worst = 0.0
    for name, mode, fmt, kwargs in CASES:
        log(f"  decode: {name} …")
        arg = json.dumps([mode, fmt, kwargs, side, side, max_pixels, repeats])
        proc = subprocess.run([sys.executable, "-c", _CHILD, arg], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"decode case {name!r} failed:\n{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        st = Stats.of(result["times"])
        worst = max(worst, st.median)
        table.add(name, f"{result['bytes']:,}", "×".join(map(str, result["size"])), fmt_time_stats(st),
                  f"{result['rss_kib'] / 1024:.0f} MiB")
        raw.append({"case": name, **result})
    section.tables = [table]
    section.targets.append(Target(
        "Decode time of the worst image at the pixel cap", f"≤ {TARGET_SECONDS} s on one core",
        f"{worst:.2f} s", worst <= TARGET_SECONDS))
    section.notes.append(
        "Large images are shrunk before their mode is converted (`detector.images.to_model_array`: an integer "
        "box reduction in the upload's own mode, or a block mean for 16-bit and float data), and JPEG is decoded "
        "at up to 1/8 scale (`draft`), so the remaining cost is the format's own decoder. A `/predict/batch` "
        "request decodes at most half the decode threads' worth of images at a time, so one client's batch of "
        "such images leaves threads for the others.")
    section.raw = {"cases": raw, "max_pixels": max_pixels}
    section.seconds = time.perf_counter() - started
    section.load_after = load_average()
    return section

