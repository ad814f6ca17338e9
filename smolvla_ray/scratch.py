"""Local scratch directories of a run's processes, which no ending leaves behind.

A checkpoint is written to a local directory and uploaded from it; a resume fetches one
into another; TensorBoard writes event files locally. A process killed mid-way (SIGKILL,
OOM, a lost node) cannot delete its directories, and at base size each checkpoint copy
holds over a gigabyte. So every such directory lives under one root per user,
`<tmp>/smolvla-ray-<uid>/`, named `<kind>-<pid>-<random>`, and `sweep()` (run whenever a
process creates one, and by the driver when a run ends) deletes those whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


def scratch_root() -> Path:
    root = Path(tempfile.gettempdir()) / f"smolvla-ray-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def prefix(kind: str) -> str:
    """The name prefix of this process's scratch directories of `kind`."""
    return f"{kind}-{os.getpid()}-"


def make_scratch_dir(kind: str) -> Path:
    """A new scratch directory of this process (deleted by its user, or swept later)."""
    root = scratch_root()
    sweep(root)
    return Path(tempfile.mkdtemp(prefix=prefix(kind), dir=root))


def scratch_tempdir(kind: str) -> tempfile.TemporaryDirectory:
    """A `TemporaryDirectory` under the scratch root (swept if its process is killed)."""
    root = scratch_root()
    sweep(root)
    return tempfile.TemporaryDirectory(prefix=prefix(kind), dir=root)


def sweep(root: Path | None = None, *, settle_s: float = 0.0) -> list[Path]:
    """Delete the scratch directories of processes that no longer run; returns them. With
    `settle_s`, wait up to that long for the other owners to exit (processes just told to
    stop, such as the workers of a Ray that was shut down)."""
    root = root or scratch_root()
    removed: list[Path] = []
    deadline = time.monotonic() + settle_s
    while True:
        waiting = False
        for path in root.iterdir():
            parts = path.name.split("-")
            if len(parts) < 3 or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if _alive(pid):
                waiting = waiting or pid != os.getpid()
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        if not waiting or time.monotonic() >= deadline:
            return removed
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
