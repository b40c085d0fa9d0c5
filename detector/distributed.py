"""Running under ``torchrun``: who this process is, which share of the work is its own, and gathering.

``torchrun`` starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).  :func:`init` joins the
process group from those (NCCL when the process drives a CUDA device, gloo otherwise); without
them every function here answers for a single process, so the same code runs either way.  Only the
main process (rank 0) writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["backend", "barrier", "broadcast", "broadcast_module", "init", "is_distributed", "is_main", "launched",
           "local_rank", "map_batches", "rank", "shard", "shutdown", "world_size"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number (torchrun sets it)") from None


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def init(device: torch.device | None = None) -> bool:
    """Join the process group when launched with several processes; returns whether it is distributed.

    The backend is NCCL for a CUDA ``device``, gloo otherwise.  Calling it again is harmless.
    """
    if not launched():
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else _env_int("RANK", 0) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine: the CUDA device it drives (``cuda:LOCAL_RANK``)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0: the one process that writes reports, bundles and output files."""
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if is_distributed() else None


def shard(n_or_index: int | np.ndarray) -> np.ndarray:
    """This rank's share of ``range(n)`` (or of an index array): every ``world_size``-th item from
    position ``rank``, so that shares differ in size by at most one and together hold every item once."""
    if launched() and not is_distributed():
        # Before init() the launcher's RANK is known but the world is not joined: a share taken now
        # would skip items on every rank but 0 and nothing would gather the rest.
        raise RuntimeError("launched by torchrun but distributed.init() was not called: no share can be taken yet")
    index = np.arange(n_or_index) if np.isscalar(n_or_index) else np.asarray(n_or_index)
    return index[rank()::world_size()]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def map_batches(n: int, batch_size: int, fn: Callable[[np.ndarray, int], dict[str, Any]], *,
                desc: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Run ``fn(positions, batch_number)`` over this rank's :func:`shard` of ``range(n)`` in batches,
    and return every row of every rank in position order (on every rank).

    ``fn`` returns per-row arrays (nested dicts allowed) for the positions it is given.  One process
    runs every batch; under torchrun each rank runs its share and the rows are gathered.  The
    progress bar (``desc``) is the main process's.
    """
    from tqdm.auto import tqdm

    mine = shard(n)
    starts = range(0, len(mine), batch_size)
    parts = [fn(mine[start:start + batch_size], b)
             for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False,
                                            disable=not (progress and is_main())))]
    local = _concatenate(parts) if parts else None
    if not is_distributed():
        if local is None:
            raise ValueError("map_batches needs at least one row")
        return local
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)  # pickled between our own ranks only, never from outside
    template = next((g for g in gathered if g is not None), None)
    if template is None:
        raise ValueError("map_batches needs at least one row")
    return _interleave([g if g is not None else _empty_like(template) for g in gathered], n)


def _concatenate(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: _concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate([np.asarray(p) for p in parts])


def _empty_like(template: Any) -> Any:
    if isinstance(template, dict):
        return {k: _empty_like(v) for k, v in template.items()}
    template = np.asarray(template)
    return np.empty((0, *template.shape[1:]), dtype=template.dtype)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers in ``module`` on every rank (after DDP training each rank's
    batch-norm statistics come from its own last batches)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision all ranks must take alike)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _interleave(parts: list[Any], n: int) -> Any:
    if isinstance(parts[0], dict):
        return {k: _interleave([p[k] for p in parts], n) for k in parts[0]}
    first = np.asarray(parts[0])
    out = np.empty((n, *first.shape[1:]), dtype=np.result_type(*[np.asarray(p).dtype for p in parts]))
    for r, part in enumerate(parts):
        out[r::len(parts)] = part
    return out


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if is_distributed():
        dist.destroy_process_group()
