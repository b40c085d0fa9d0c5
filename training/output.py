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

from detector import distributed

from .options import PipelineError

__all__ = ["check_out_dir", "dump_json", "json_safe", "log", "machine_info", "publish", "staging_dir"]


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


def check_out_dir(out: Path) -> None:
    """``out`` must be absent, empty or an earlier bundle: it is replaced as a whole, and nothing
    else (a home directory, a project folder) may be replaced by mistake."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise PipelineError(f"--out {str(out)!r} holds other files and no bundle (no manifest.json); "
                            f"the run replaces the whole directory, so give an empty or new one")


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

