"""Finding, verifying and fetching checkpoints in a run's storage (any fsspec URL).

Retention is Ray Train's (`CheckpointConfig(num_to_keep)`); this module only reads. A
checkpoint counts as valid only when its manifest exists and every file it lists has the
listed size and sha256, so an upload cut short (whatever order the files landed in) or an
altered file is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolvla_ray.checkpoint.format import MANIFEST, manifest_problem, verify_checkpoint
from smolvla_ray.run_layout import checkpoint_step
from smolvla_ray.storage import filesystem, join, with_retries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory in storage and what its manifest says of it."""

    uri: str
    step: int | None
    num_bytes: int
    problem: str | None  # None: verified

    @property
    def valid(self) -> bool:
        return self.problem is None


def _sha256_remote(fs, path: str) -> str:
    def digest_once() -> str:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    return with_retries(digest_once, what=f"read of {path}")


def inspect_checkpoint(
    uri: str, storage_options: Mapping[str, Any] | None = None, *, hashes: bool = True
) -> CheckpointInfo:
    """Check a checkpoint against its manifest where it is stored (sizes, and with
    `hashes` also sha256, streaming each file once)."""
    fs, root = filesystem(uri, storage_options or {})
    step = checkpoint_step(root)
    try:
        raw = with_retries(lambda: fs.cat_file(join(root, MANIFEST)), what=f"read of {uri}")
        manifest = json.loads(raw)
        files = manifest["files"]
        step = int(manifest.get("step", step))
    except FileNotFoundError:
        if not fs.exists(root):
            return CheckpointInfo(uri, step, 0, "it does not exist")
        return CheckpointInfo(uri, step, 0, "no manifest.json (unfinished checkpoint)")
    except (ValueError, KeyError, TypeError) as err:
        return CheckpointInfo(uri, step, 0, f"manifest.json is malformed: {err}")
    sizes = {Path(p).name: int(d["size"]) for p, d in _listing(fs, root).items()}
    sha256_of = (lambda name: _sha256_remote(fs, join(root, name))) if hashes else None
    problem = manifest_problem(files, sizes.get, sha256_of, present=sizes)
    total = sum(entry["size"] for entry in files.values()) if problem is None else 0
    return CheckpointInfo(uri, step, total, problem)


def _listing(fs, root: str) -> dict[str, dict]:
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), what=f"listing of {root}")
        return {e["name"]: e for e in entries if e.get("type") == "file"}
    except FileNotFoundError:
        return {}


def list_checkpoints(
    run_uri: str, storage_options: Mapping[str, Any] | None = None, *, hashes: bool = True
) -> list[CheckpointInfo]:
    """Every checkpoint of a run, oldest first, each verified against its manifest."""
    fs, root = filesystem(run_uri, storage_options or {})
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), what=f"listing of {run_uri}")
    except FileNotFoundError:
        return []
    protocol = run_uri.split("://", 1)[0] + "://" if "://" in run_uri else ""
    infos = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and checkpoint_step(name) is not None:
            uri = f"{protocol}{entry['name'].rstrip('/')}" if protocol else entry["name"]
            infos.append(inspect_checkpoint(uri, storage_options, hashes=hashes))
    return sorted(infos, key=lambda info: (info.step is None, info.step or 0, info.uri))


def latest_valid_checkpoint(
    run_uri: str, storage_options: Mapping[str, Any] | None = None
) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; newer broken ones are skipped with a warning."""
    for info in reversed(list_checkpoints(run_uri, storage_options)):
        if info.valid:
            return info
        message = f"warning: skipping checkpoint {info.uri}: {info.problem}"
        log.warning(message)
        sys.stderr.write(f"[smolvla-ray] {message}\n")
    return None


def fetch_checkpoint(
    uri: str, destination: Path, storage_options: Mapping[str, Any] | None = None
) -> Path:
    """Copy a checkpoint to a local directory and verify it there."""
    fs, root = filesystem(uri, storage_options or {})
    if not with_retries(lambda: fs.exists(join(root, MANIFEST)), what=f"read of {uri}"):
        raise FileNotFoundError(f"{uri} is not a checkpoint: it has no {MANIFEST}")
    destination.mkdir(parents=True, exist_ok=True)
    for path in _listing(fs, root):
        local = str(destination / Path(path).name)
        with_retries(lambda path=path, local=local: fs.get(path, local), what=f"download of {path}")
    problem = verify_checkpoint(destination)
    if problem is not None:
        raise ValueError(f"checkpoint {uri} is not valid: {problem}")
    return destination
