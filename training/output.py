"""Writing a run: the machine it ran on, JSON that numpy values cannot break, and a bundle directory
that is replaced in one rename, never left half-written."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed

from detector import BundleError, distributed, verify_bundle
from detector.bundle import bundle_holding

from .options import PipelineError

__all__ = ["check_out_dir", "check_results_dir", "check_writable", "dump_json", "json_safe", "log", "machine_info",
           "publish", "staging_dir"]


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if distributed.is_distributed():
        devices = [None] * distributed.world_size()
        torch.distributed.all_gather_object(devices, f"{platform.node()}:{device}")
        info["distributed"] = {"world_size": distributed.world_size(), "backend": distributed.backend(),
                               "devices": devices, "launcher": "torchrun"}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def check_writable(out: Path, flag: str = "--out") -> None:
    """``out``'s folder can be made and written: found out before the work, not after it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise PipelineError(f"{flag} {str(out)!r} cannot be written: {exc.strerror or exc}") from exc


def _check_not_here(out: Path, flag: str) -> None:
    resolved, here = out.resolve(), Path.cwd().resolve()
    if not out.name or out.name in (".", "..") or resolved == here or resolved in here.parents:
        raise PipelineError(f"{flag} {str(out)!r} is the working folder or holds it: name a folder of its own")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """``out`` must be absent, empty or an earlier bundle and nothing more: it is replaced as a whole,
    and nothing else (a home directory, a project folder, files added to a bundle) may go with it.
    Checked before the work, with whether it can be written."""
    _check_not_here(out, flag)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{flag} {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            verify_bundle(out)
        except BundleError as exc:
            raise PipelineError(f"{flag} {str(out)!r} holds files and is not a bundle as it was written ({exc}); the "
                                f"run replaces the whole directory, so give an empty or new one (if it is an earlier "
                                f"bundle you mean to replace, delete it first)") from None
    inside = bundle_holding(out.parent)
    if inside is not None:
        raise PipelineError(f"{flag} {str(out)!r} lies inside the bundle {str(inside)!r}, which would no longer "
                            f"load: give a folder outside it")
    check_writable(out, flag)


def check_results_dir(out: Path, flag: str = "--out", attach_hint: bool = False) -> None:
    """``out``, a folder that files are written into (an evaluation, a trajectory), is not a file, not a
    bundle nor inside one (a file the manifest does not list makes a bundle unloadable), and can be written."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{flag} {str(out)!r} is a file, not a directory")
    inside = bundle_holding(out)
    if inside is not None:
        hint = "; --attach writes an evaluation into its bundle" if attach_hint else ""
        raise PipelineError(f"{flag} {str(out)!r} is or lies inside the bundle {str(inside)!r}, which would no longer "
                            f"load with files its manifest does not list: give a folder outside it{hint}")
    check_writable(out / "files" if out.is_dir() else out, flag)  # files go inside it


def staging_dir(out: Path) -> Path:
    """An empty sibling of ``out`` to write into before it replaces ``out`` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` to ``out``, replacing what was there (never a half-written bundle)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def log(message: str) -> None:
    """A line for the user while the run goes on (stderr, so that the summary stays on stdout); under
    torchrun the main process speaks for all."""
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


def dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(json_safe(data), indent=2) + "\n")

