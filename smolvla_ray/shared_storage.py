"""Is the run's storage the same on every node?

Ray Train's own storage check is bypassed by our upload function, so a local
`checkpoint.storage` on a multi-node cluster would silently give every node its own run
directory: checkpoints, metrics and feature-cache shards land where they were written, and
after a failover training starts again at step 0. So the driver writes a marker with a
fresh token into the run directory, and every node must read it back before step 1: the
driver asks each alive node (a zero-CPU task pinned to it), and each training worker looks
again (a node that joins later). A node that does not see the marker refuses the run,
saying which node and what to use instead.

Test seam: `SMOLVLA_STORAGE_VIEW=FROM=TO` in a node's environment makes that node look for
the marker under TO where the driver wrote it under FROM, as if the path named another
disk there. It only moves where this check looks; it is how the tests give one node of a
loopback cluster a storage of its own.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from smolvla_ray.run_layout import SHARED_MARKER
from smolvla_ray.storage import filesystem, join, with_retries

VIEW_ENV = "SMOLVLA_STORAGE_VIEW"


def write_marker(run_dir: str, storage_options: Mapping[str, Any]) -> str:
    """Write a new marker into `run_dir`; returns its token."""
    token = uuid.uuid4().hex
    record = {"token": token, "host": socket.gethostname(), "written_at": time.time()}
    fs, path = filesystem(join(run_dir, SHARED_MARKER), storage_options)

    def write() -> None:
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, json.dumps(record).encode())

    with_retries(write, what=f"writing {join(run_dir, SHARED_MARKER)}")
    return token


def node_view(uri: str) -> str:
    """`uri` as this node sees it: unchanged unless the test seam `SMOLVLA_STORAGE_VIEW`
    moves it."""
    view = os.environ.get(VIEW_ENV, "")
    if "=" not in view:
        return uri
    source, target = view.split("=", 1)
    source = source.rstrip("/")
    if uri == source or uri.startswith(f"{source}/"):
        return target.rstrip("/") + uri[len(source) :]
    return uri


def marker_problem(run_dir: str, token: str, storage_options: Mapping[str, Any]) -> str | None:
    """Why this node does not share `run_dir` with the driver (None when it does)."""
    where = join(node_view(run_dir), SHARED_MARKER)
    fs, path = filesystem(where, storage_options)
    try:
        seen = json.loads(fs.cat_file(path)).get("token")
    except FileNotFoundError:
        return f"does not see {join(run_dir, SHARED_MARKER)}, which the driver wrote"
    except (OSError, ValueError) as err:
        return f"cannot read {join(run_dir, SHARED_MARKER)} ({type(err).__name__}: {err})"
    if seen != token:
        return f"sees another run's {join(run_dir, SHARED_MARKER)} there"
    return None


def not_shared_message(storage: str, node: str, problem: str) -> str:
    """The refusal, with what to do instead."""
    return (
        f"checkpoint.storage={storage!r} is not shared by the cluster's nodes: node {node} "
        f"{problem}. Checkpoints, metrics and feature-cache shards would land on whichever "
        "node wrote them, and a restart would begin again at step 0. Use storage every node "
        "shares: an object store (s3://, gs://, ...) or a filesystem mounted at the same "
        "path on every node (NFS)."
    )
