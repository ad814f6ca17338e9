"""Rank 0's `metrics.jsonl` beside the checkpoints, at any fsspec URL.

Object stores cannot append, so the file is rewritten whole at each report; a run logs a
few thousand small lines at most, which keeps that cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import fsspec

METRICS_FILE = "metrics.jsonl"


def run_uri(storage: str, name: str) -> str:
    """The run's directory: where Ray Train puts its checkpoints, and our metrics."""
    return f"{storage.rstrip('/')}/{name}"


class MetricsLog:
    """Accumulates metric records and persists them as JSON lines."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any]) -> None:
        self.fs, root = fsspec.core.url_to_fs(uri, **storage_options)
        self.path = f"{root.rstrip('/')}/{METRICS_FILE}"
        self.lines: list[str] = []
        if self.fs.exists(self.path):  # a resumed run continues its log
            self.lines = self.fs.cat_file(self.path).decode().splitlines()

    def append(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        # After a resume, drop records past the restored step: they will be logged again.
        self.lines = [ln for ln in self.lines if json.loads(ln).get("step", 0) < step]
        self.lines.append(json.dumps(dict(record), sort_keys=True))
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.path, ("\n".join(self.lines) + "\n").encode())


def read_metrics(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """The records of a run's `metrics.jsonl` (URI of the run directory)."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    path = f"{root.rstrip('/')}/{METRICS_FILE}"
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}/{METRICS_FILE} does not exist")
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line]
