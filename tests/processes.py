"""Process helpers for tests that start their own servers and Ray clusters: free ports, and
finding and stopping exactly the processes a test started (never `ray stop`, which would also
kill the session's embedded Ray and other sessions' clusters)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

# Ray Train's controller takes one `ray.train.report` per poll of its workers, every 2 s by
# default; at the tests' checkpoint every few 0.1 s steps, the reports queue up and each
# run ends that much later. Polling more often changes nothing else a test looks at.
QUICK_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def marked_pids(marker: str, *, cmdline_fragment: str | None = None) -> set[int]:
    """Processes carrying `marker` in their environment (or `cmdline_fragment` in their
    command line), and all their descendants: Ray workers and agents rename themselves,
    which hides their environment, but their parents carry the marker."""
    children: dict[int, list[int]] = {}
    roots = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = read_proc(pid, "stat")
        if not stat:
            continue
        children.setdefault(int(stat.rsplit(b")", 1)[1].split()[1]), []).append(pid)
        if marker.encode() in read_proc(pid, "environ").split(b"\0") or (
            cmdline_fragment and cmdline_fragment.encode() in read_proc(pid, "cmdline")
        ):
            roots.add(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    found.discard(os.getpid())
    return found


def kill_pids(pids: set[int], *, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
