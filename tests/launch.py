"""Starting real commands for the tests (servers on free ports, torchrun), and never leaving their workers
behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the default 8000 may be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N --no-python ARGS`` on this CPU (gloo, one thread per
    process), as a user starts it.  On a timeout the whole process group (workers too) is killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "--no-python", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} did not finish in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
