"""``detector-scan``: score every image of a dataset split or a folder with a bundle, offline.

The batch counterpart of ``POST /predict`` for auditing a store of uploads: the same
:meth:`detector.Bundle.detect` call, one row per image (``index``, ``position`` or ``path``,
``label``, ``class_name``, ``confidence``, ``adversarial``, ``adversarial_score``,
``uncanny_valley``, ``relative_sharpness``), written as JSON Lines or, where pyarrow is installed,
Parquet.  A folder is scanned as uploads are served: every image file under it, decoded and
resized to the bundle's input as the service does; a file that is not a readable image gets a row
with its ``error`` instead.

Resumable: rows go to ``<out>.parts/`` as they are scored, one file per rank, flushed per batch;
a rerun of the same command scores only what is missing there, then writes ``<out>`` in scan order
(every image exactly once) and removes the parts.  Under ``torchrun`` each rank scores its share.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from detector import BundleError, distributed, load_bundle
from detector.datasets import DatasetNotFoundError
from detector.images import DEFAULT_MAX_PIXELS, image_files, read_image

from .cli import HelpFormatter, add_trust_flag, positive_int, seed_int, trusted_names
from .options import PipelineError, TrainOptions, resolve_device
from .prepare import load_splits

__all__ = ["FORMATS", "ScanSource", "build_parser", "dataset_source", "folder_source", "main", "scan"]

FORMATS = ("jsonl", "parquet")


@dataclass
class ScanSource:
    """What to scan: ``keys`` identify the images (dataset positions or relative paths) in scan order;
    ``load(keys)`` gives the batch ``[N, C, H, W]`` of [0, 1] images that could be read, which of
    the keys those are, and an error message for each of the others."""

    description: str
    key_name: str  # "position" or "path"
    keys: list
    load: Callable[[list], tuple[torch.Tensor, list, dict[Any, str]]]


def dataset_source(spec: str, data_dir: str, split: str, input_shape: tuple[int, int, int],
                   download: bool = False, seed: int = 0) -> ScanSource:
    """Every image of a split of ``digits``, ``cifar10``, ``cifar100`` or ``npz:PATH`` (``seed`` draws
    the digits split, as ``detector-train --seed`` does)."""
    train, test, _, source = load_splits(TrainOptions(data=spec, data_dir=data_dir, download=download, seed=seed))
    data = train if split == "train" else test
    if data.input_shape != tuple(input_shape):
        raise PipelineError(f"{spec} images are {data.input_shape}, the bundle takes {tuple(input_shape)}")

    def load(keys: list) -> tuple[torch.Tensor, list, dict]:
        x, _ = data.batch(torch.as_tensor(keys))
        return x, list(keys), {}

    return ScanSource(f"{spec} {split} split ({source}), {len(data)} images", "position", list(range(len(data))), load)


def folder_source(root: str | Path, input_shape: tuple[int, int, int],
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> ScanSource:
    """Every image file under ``root`` (:func:`detector.images.image_files`: recursively, by suffix,
    symbolic links followed), in sorted order of relative path, decoded as the service decodes an
    upload; a file over ``max_pixels`` gets an error row, as the service refuses it."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"no folder at {str(root)!r}")
    files = image_files(root)
    channels, height, width = input_shape

    def load(keys: list) -> tuple[torch.Tensor, list, dict]:
        arrays, good, errors = [], [], {}
        for key in keys:
            try:
                arrays.append(read_image(root / key, channels, (height, width), max_pixels))
                good.append(key)
            except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a row saying why
                errors[key] = f"{type(exc).__name__}: {exc}"[:300]
        if not arrays:
            return torch.empty((0, channels, height, width)), good, errors
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
        return x, good, errors

    return ScanSource(f"folder {root} ({len(files)} image files)", "path", files, load)


# -- part files: what has been scored so far --------------------------------------------------------
def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _read_rows(path: Path) -> Iterator[dict]:
    """The complete rows of a part file; a last line cut short by an interruption is not one."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _repair(path: Path) -> None:
    """Cut a trailing partial line (an interrupted write) so that appending starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)


def _done(parts: Path, key_name: str) -> dict:
    """Every key with a row so far; a scored row wins over an error row for the same image."""
    rows: dict = {}
    for path in sorted(parts.glob("rank*.jsonl")):
        for row in _read_rows(path):
            key = row.get(key_name)
            if key not in rows or ("error" in rows[key] and "error" not in row):
                rows[key] = row
    return rows


MANIFEST = "manifest.json"


def _describe(identity: Any) -> str:
    if not isinstance(identity, dict):
        return "unrecorded"
    return ", ".join(f"{k.replace('_', ' ')} {str(v)[:12] if k == 'bundle_sha256' else v}"
                     for k, v in identity.items() if v is not None)


def _open_parts(out: Path, parts: Path, identity: dict) -> str | None:
    """Create ``parts`` for a new scan or check that it belongs to this one; an error message, or None.

    A folder at that path that no scan made (no manifest, something else in it) is never adopted: the
    parts are deleted when the scan ends, and that must never take a user's files with them."""
    if out.exists() and not parts.is_dir():
        return (f"{out} exists and no scan of it is under way ({parts.name}/ is absent): remove it or choose "
                f"another --out; nothing was overwritten")
    if parts.exists() and not parts.is_dir():
        return f"{parts} exists and is not a folder: the scan keeps its rows there; remove it or choose another --out"
    manifest = parts / MANIFEST
    if parts.is_dir() and not manifest.is_file():
        if any(parts.glob("rank*.jsonl")):
            return f"{parts} holds rows but no {MANIFEST}: remove it to start afresh"
        if any(parts.iterdir()):
            return (f"{parts} exists and is not a scan's folder of rows (no {MANIFEST}); the scan would delete "
                    f"it when done: choose another --out")
    parts.mkdir(parents=True, exist_ok=True)
    if manifest.is_file():
        try:
            started = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            started = None
        if started != identity:
            return (f"{parts} holds the rows of another scan ({_describe(started)}); this one is "
                    f"{_describe(identity)}. Finish that one with its own command, or remove {parts} to start afresh")
    else:
        manifest.write_text(json.dumps(identity) + "\n")
    return None


def _remove_parts(parts: Path) -> None:
    """Delete what the scan wrote there (manifest, one file per rank), then the folder if nothing else is in it."""
    for path in [*parts.glob("rank*.jsonl"), parts / MANIFEST]:  # the manifest last: rows never lie unclaimed
        path.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:
        pass  # something else appeared in it: leave it to its owner


# -- the scan -------------------------------------------------------------------------------------
def _rows(bundle, source: ScanSource, keys: list, device: torch.device) -> list[dict]:
    x, good, errors = source.load(keys)
    rows = {}
    if len(good):
        answer = bundle.detect(x.to(device))
        confidence = answer.probabilities.max(axis=1)
        for i, key in enumerate(good):
            label = int(answer.labels[i])
            rows[key] = {
                source.key_name: key, "label": label, "class_name": bundle.classes[label],
                "confidence": float(confidence[i]), "adversarial": bool(answer.adversarial[i]),
                "adversarial_score": float(answer.adversarial_score[i]),
                "uncanny_valley": bool(answer.uncanny_valley[i]),
                "relative_sharpness": float(answer.sharpness[i]),
            }
    for key, message in errors.items():
        rows[key] = {source.key_name: key, "error": message}
    return [rows[k] for k in keys]


def _columns(key_name: str):
    """The Parquet schema: every column of a row, nullable (an unreadable file has only its key and error)."""
    import pyarrow as pa

    key_type = pa.int64() if key_name == "position" else pa.string()
    return pa.schema([("index", pa.int64()), (key_name, key_type), ("label", pa.int64()),
                      ("class_name", pa.string()), ("confidence", pa.float64()), ("adversarial", pa.bool_()),
                      ("adversarial_score", pa.float64()), ("uncanny_valley", pa.bool_()),
                      ("relative_sharpness", pa.float64()), ("error", pa.string())])


def _write(out: Path, rows: list[dict], fmt: str, key_name: str) -> None:
    """Write ``out`` whole, durably, then put it in place: readers never see half a file, and the part
    files are removed only once it is on disk."""
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=_columns(key_name)), temp)
        else:
            with open(temp, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, out)
        directory = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temp.unlink(missing_ok=True)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def summarize(rows: list[dict]) -> dict[str, Any]:
    scored = [r for r in rows if "error" not in r]
    flagged = sum(r["adversarial"] for r in scored)
    return {
        "images": len(rows),
        "scored": len(scored),
        "unreadable": len(rows) - len(scored),
        "flagged": flagged,
        "flag_rate": flagged / len(scored) if scored else None,
        "uncanny_valley": sum(r["uncanny_valley"] for r in scored),
        "per_class": dict(sorted(Counter(r["class_name"] for r in scored).items())),
        "flagged_per_class": dict(sorted(Counter(r["class_name"] for r in scored if r["adversarial"]).items())),
    }


def scan(bundle, source: ScanSource, out: Path, *, fmt: str = "jsonl", batch_size: int = 256,
         device: torch.device | str = "cpu", progress: bool = True, identity: dict | None = None,
         log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Score every image of ``source`` not already in ``<out>.parts/`` (images that could not be read
    are tried again), then write ``out`` (rank 0).  ``identity`` (bundle hash, data, split) is kept
    with the parts: a rerun resumes only the same scan.

    Returns the summary (flag rate, per-class counts) on the main process.
    """
    if fmt not in FORMATS:
        raise PipelineError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PipelineError("--format parquet needs pyarrow: pip install pyarrow (or write JSON Lines)") from None
    if batch_size < 1:
        raise PipelineError("--batch-size must be at least 1")
    if fmt == "parquet" and source.key_name == "path":
        # Parquet strings are UTF-8: a name the file system holds as other bytes would fail the write
        # after every image was scored.  JSON Lines keeps such names (as \udcXX escapes).
        unnamed = [k for k in source.keys if not _utf8(k)]
        if unnamed:
            raise PipelineError(f"{len(unnamed)} file names are not UTF-8 (e.g. {unnamed[0]!r}), which Parquet "
                                f"cannot hold: write JSON Lines (--out FILE.jsonl) or rename them")
    parts = _parts_dir(out)
    # Rank 0 decides (the parts folder, what is left to do) and tells the others, so that every rank
    # splits the same list.
    problem = _open_parts(out, parts, identity or {}) if distributed.is_main() else None
    problem = distributed.broadcast(problem)
    if problem:
        raise PipelineError(problem)
    mine_file = parts / f"rank{distributed.rank()}.jsonl"
    _repair(mine_file)
    distributed.barrier()
    plan = None
    if distributed.is_main():
        done = _done(parts, source.key_name)
        retry = sum("error" in row for row in done.values())
        todo = [k for k in source.keys if k not in done or "error" in done[k]]
        if done:
            log(f"resuming: {len(done) - retry} of {len(source.keys)} images already scored, {len(todo)} to go"
                + (f" ({retry} unreadable before, tried again)" if retry else ""))
        plan = todo
    todo = distributed.broadcast(plan)
    mine = [todo[i] for i in distributed.shard(len(todo))]
    with open(mine_file, "a") as f:
        starts = range(0, len(mine), batch_size)
        for start in tqdm(starts, desc="scan", unit="batch", disable=not (progress and distributed.is_main())):
            for row in _rows(bundle, source, mine[start:start + batch_size], device):
                f.write(json.dumps(row) + "\n")
            f.flush()
    distributed.barrier()
    if not distributed.is_main():
        return {}
    done = _done(parts, source.key_name)
    missing = [k for k in source.keys if k not in done]
    if missing:
        raise PipelineError(f"{len(missing)} images have no row (e.g. {missing[:3]}); rerun to score them")
    rows = [{"index": i, **done[k]} for i, k in enumerate(source.keys)]
    _write(out, rows, fmt, source.key_name)
    _remove_parts(parts)
    return summarize(rows)


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detector-scan",
        description="Score every image of a dataset split or a folder with a bundle (the service's own "
                    "detection call) and write one row per image: JSON Lines, or Parquet where pyarrow is "
                    "installed. Resumable; under torchrun every rank scores its share.",
        formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle directory")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="digits, cifar10, cifar100, npz:PATH, or folder:PATH (every image file under PATH)")
    p.add_argument("--data-dir", default="data", help="where cifar10/cifar100 live")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--split", choices=("test", "train"), default="test", help="dataset split (not for folder:)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="the seed that draws the digits split (default: the bundle's own, from its report)")
    p.add_argument("--out", required=True, metavar="FILE", help="the output file (.jsonl or .parquet)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: parquet for a .parquet --out, else jsonl)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="folder: a file of more than N pixels (width × height) gets an error row, as the service "
                        "refuses it, instead of being decoded")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps")
    add_trust_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _summary_text(summary: dict, out: Path, fmt: str) -> str:
    rate = "n/a" if summary["flag_rate"] is None else f"{summary['flag_rate']:.1%}"
    lines = [f"scanned {summary['images']} images: {summary['flagged']} flagged adversarial ({rate} of "
             f"{summary['scored']} scored), {summary['uncanny_valley']} in the uncanny valley, "
             f"{summary['unreadable']} unreadable",
             "class        predicted   flagged"]
    for name, count in summary["per_class"].items():
        lines.append(f"{name[:12]:12s} {count:9d} {summary['flagged_per_class'].get(name, 0):9d}")
    lines.append(f"written to {out} ({fmt})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``detector-scan``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    suffix_format = "parquet" if out.suffix.lower() == ".parquet" else "jsonl"
    fmt = args.format or suffix_format
    if args.format == "jsonl" and suffix_format == "parquet" or args.format == "parquet" and out.suffix.lower() in (
            ".jsonl", ".json", ".ndjson"):
        parser.exit(2, f"detector-scan: error: --out {out.name} and --format {args.format} disagree; "
                       f"name the file for its format\n")
    if out.is_dir() or not out.name or out.name in (".", ".."):
        parser.exit(2, f"detector-scan: error: --out {args.out} is a folder; name the file to write\n")
    kind, _, path = args.data.partition(":")
    if kind == "folder" and path:
        root, parts = Path(path).resolve(), _parts_dir(out.resolve())
        if parts == root or parts in root.parents:
            parser.exit(2, f"detector-scan: error: --out {args.out} keeps its rows in {parts}, which is or holds "
                           f"the scanned folder {root} (it is deleted when the scan ends): choose another --out\n")
    # SIGTERM (an orchestrator stopping the job) ends the scan as Ctrl-C does: rows so far are kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        device = resolve_device(args.device)
        distributed.init(device)
        bundle = load_bundle(args.bundle, map_location=device, trusted_architectures=trusted_names(args.trust_architecture))
        spec = bundle.input_spec
        shape = (spec.channels, spec.height, spec.width)
        split_seed = 0
        if kind == "folder":
            if not path:
                raise PipelineError("folder: needs a path, e.g. folder:/data/uploads")
            source = folder_source(path, shape, args.max_pixels)
        else:
            options = (bundle.report or {}).get("options")
            bundle_seed = options.get("seed", 0) if isinstance(options, dict) else 0
            split_seed = int(args.seed if args.seed is not None else bundle_seed)
            source = dataset_source(args.data, args.data_dir, args.split, shape, args.download, split_seed)
        source.keys = distributed.broadcast(source.keys)  # one listing of a folder, rank 0's
        if not source.keys:
            raise PipelineError(f"nothing to scan in {source.description}")
        if distributed.is_main():
            print(f"scanning {source.description} with {bundle.architecture} ({bundle.sha256[:12]}) on "
                  f"{distributed.world_size()} process(es)", file=sys.stderr, flush=True)
        identity = {"bundle_sha256": bundle.sha256, "data": args.data,
                    "split": None if kind == "folder" else args.split, "format": fmt}
        if kind != "folder" and split_seed:
            identity["seed"] = split_seed  # another seed draws another digits split
        summary = scan(bundle, source, out, fmt=fmt, batch_size=args.batch_size, device=device,
                       progress=not args.no_progress, identity=identity,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except (PipelineError, BundleError, ValueError, OSError) as exc:  # OSError: a file it cannot read or write
        parser.exit(2, f"detector-scan: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"detector-scan: interrupted; rerun {' '.join(['detector-scan', *map(shlex.quote, argv)])} "
                         f"to finish (rows scored so far are kept)\n")
    finally:
        distributed.shutdown()
    if distributed.is_main():
        print(_summary_text(summary, out, fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
