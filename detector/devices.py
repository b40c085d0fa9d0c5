"""One reading of a device name for every command: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

from __future__ import annotations

import torch

from . import distributed

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``spec``; ``auto`` is cuda when available, else cpu.

    Under torchrun ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``: each process drives its own GPU.
    Raises :class:`DeviceError` when the name is not a device or an explicit device is not there.
    """
    spec = spec.strip().lower()
    if spec in ("auto", "cuda") and distributed.launched() and torch.cuda.is_available():
        spec = f"cuda:{distributed.local_rank()}"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but torch sees no CUDA device")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {spec!r} requested but MPS is not available")
    return device
