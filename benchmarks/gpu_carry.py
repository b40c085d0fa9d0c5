"""What the GPU run needs to take along: CIFAR-10 small enough to travel, and the wheels the GPU machine lacks.

A GPU lease sends the working tree and at most 64 MiB beside it, and the machine reaches no package index.
The rebuilt CIFAR-10 (``../shared/data/cifar10``) is 173 MB of decoded JPEG-q75 pixels, so ``pack`` writes
it as JPEG again: mosaics of 32×32 images (each image on whole 16×16 MCUs, so no block spans two images),
quality 75 with 4:2:0 chroma, which is how its pixels were made; ``unpack`` decodes them back to the two
``.npz`` files the pipeline reads. Re-encoding decoded JPEG pixels with the same settings changes them
little; ``pack`` measures and prints by how much (mean absolute error per pixel, out of 255).

``wheels`` downloads, for the GPU machine's Python (3.12, manylinux x86-64), the project's dependencies
that its image does not hold.

::

    python -m benchmarks.gpu_carry pack --data-dir ../shared/data/cifar10 --to .carry/cifar10
    python -m benchmarks.gpu_carry wheels --to .carry/wheels
    python -m benchmarks.gpu_carry unpack --from .carry/cifar10 --to /tmp/cifar10   # on the GPU machine
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "pack", "unpack"]

GRID = 32  # images per mosaic side: 1024 images, a 1024×1024 JPEG
QUALITY = 75

#: Dependencies of the project (and of its benchmarks) missing from the GPU machine's image, pinned to
#: what was tested here; their own needs that the image lacks are listed too.
WHEELS = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "annotated-types",
    "typing-inspection", "python-multipart", "uvicorn", "httptools", "torchattacks", "skops", "prettytable",
    "wcwidth", "fastapi-offline", "adversarial-robustness-toolbox",
)


def _mosaics(x: np.ndarray) -> list[np.ndarray]:
    n, h, w, c = x.shape
    out = []
    for start in range(0, n, GRID * GRID):
        block = x[start:start + GRID * GRID]
        padded = np.zeros((GRID * GRID, h, w, c), np.uint8)
        padded[:len(block)] = block
        out.append(padded.reshape(GRID, GRID, h, w, c).transpose(0, 2, 1, 3, 4).reshape(GRID * h, GRID * w, c))
    return out


def _images(mosaic: np.ndarray, h: int, w: int) -> np.ndarray:
    c = mosaic.shape[2]
    return mosaic.reshape(GRID, h, GRID, w, c).transpose(0, 2, 1, 3, 4).reshape(GRID * GRID, h, w, c)


def pack(data_dir: Path, to: Path) -> dict:
    """Write ``to/cifar10_{split}_NNN.jpg`` and ``to/labels.json``; returns sizes and the re-encoding error."""
    from PIL import Image

    to.mkdir(parents=True, exist_ok=True)
    meta: dict = {"grid": GRID, "quality": QUALITY}
    for split in ("train", "test"):
        with np.load(data_dir / f"cifar10_{split}.npz", allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
        errors, size = [], 0
        for i, mosaic in enumerate(_mosaics(x)):
            buffer = io.BytesIO()
            Image.fromarray(mosaic).save(buffer, "JPEG", quality=QUALITY, subsampling=2)
            data = buffer.getvalue()
            (to / f"cifar10_{split}_{i:03d}.jpg").write_bytes(data)
            size += len(data)
            back = _images(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), *x.shape[1:3])
            block = x[i * GRID * GRID:(i + 1) * GRID * GRID]
            errors.append(np.abs(back[:len(block)].astype(np.int16) - block).mean() * len(block))
        meta[split] = {"n": int(len(x)), "shape": list(x.shape[1:]), "labels": y.astype(int).tolist(),
                       "bytes": size, "mae": float(sum(errors) / len(x))}
    (to / "labels.json").write_text(json.dumps(meta))
    return {split: {k: v for k, v in meta[split].items() if k != "labels"} for split in ("train", "test")}


def unpack(source: Path, to: Path) -> None:
    """Decode the mosaics back to ``to/cifar10_{train,test}.npz`` (``x`` uint8 NHWC, ``y`` int64)."""
    from PIL import Image

    meta = json.loads((source / "labels.json").read_text())
    to.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        info = meta[split]
        h, w, _ = info["shape"]
        parts = [_images(np.asarray(Image.open(path).convert("RGB")), h, w)
                 for path in sorted(source.glob(f"cifar10_{split}_*.jpg"))]
        x = np.concatenate(parts)[:info["n"]]
        np.savez(to / f"cifar10_{split}.npz", x=x, y=np.asarray(info["labels"], dtype=np.int64))


def wheels(to: Path) -> None:
    """``pip download`` the wheels of :data:`WHEELS` for CPython 3.12 on manylinux x86-64."""
    from importlib.metadata import version

    to.mkdir(parents=True, exist_ok=True)
    specs = []
    for name in WHEELS:
        try:
            specs.append(f"{name}=={version(name)}")
        except Exception:
            specs.append(name)
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for x in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(to), *specs], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_carry", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data-dir", type=Path, required=True)
    a.add_argument("--to", type=Path, required=True)
    b = sub.add_parser("unpack")
    b.add_argument("--from", dest="source", type=Path, required=True)
    b.add_argument("--to", type=Path, required=True)
    c = sub.add_parser("wheels")
    c.add_argument("--to", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "pack":
        print(json.dumps(pack(args.data_dir, args.to), indent=1))
    elif args.command == "unpack":
        unpack(args.source, args.to)
    else:
        wheels(args.to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
