"""Names and places inside a run's storage, the way `data/layout.py` names a dataset's files.

    <checkpoint.storage>/
      <job name>/                     the run directory (`run_uri`)
        checkpoint_000000100/         one checkpoint per saved step (`checkpoint_dir_name`)
        metrics.jsonl                 rank 0's metric records
        .smolvla-lease.json           the one-writer lease of the run writing here (`LEASE_FILE`)
        .smolvla-shared-storage.json  what every node must see before step 1 (`SHARED_MARKER`)
        .smolvla-wandb-run.json       the W&B run id, kept for resumes (`WANDB_RUN_FILE`)
        tensorboard/                  TensorBoard event files
        eval/eval_000000100.json      the full table of each held-out evaluation (`EVAL_DIR`)
        best/                         copies of the best checkpoints and `best.json`
                                      (`BEST_DIR`, checkpoint.keep_best)
        checkpoint_manager_snapshot.json
                                      Ray Train's own bookkeeping (`RAY_RUN_STATE`): left
                                      alone, except that a stale one is moved aside to
                                      `<name>.stale-<time>` (checkpoint/recovery.py)
      feature-cache/<key>/            frozen vision features, shared by runs (`cache_root`)

Everything that reads or writes a run directory takes its names from here, so `checkpoints`,
`report`, resume and retention agree on what is a checkpoint and what is not. Files of the
run directory that are neither checkpoints nor metrics are control files (`CONTROL_FILES`)
and are ignored by listings.
"""

from __future__ import annotations

import re

from smolvla_ray.storage import join

CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
BEST_DIR = "best"
BEST_FILE = "best.json"
FEATURE_CACHE_DIR = "feature-cache"
WRITE_PROBE = ".smolvla-write-probe"
# Ray Train V2's checkpoint bookkeeping in the run directory
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME; a test checks it).
RAY_RUN_STATE = "checkpoint_manager_snapshot.json"
STALE_SUFFIX = ".stale-"
# Who is writing this run directory, until when (`lease.py`); one writer per run.
LEASE_FILE = ".smolvla-lease.json"
# The driver's token that every node must read back before step 1 (`shared_storage.py`).
SHARED_MARKER = ".smolvla-shared-storage.json"
# The W&B run this run logs to, so that a resume continues it (`train/metrics.py`).
WANDB_RUN_FILE = ".smolvla-wandb-run.json"
# Files in the run directory that are neither checkpoints nor metrics; listings skip them.
CONTROL_FILES: tuple[str, ...] = (WRITE_PROBE, LEASE_FILE, SHARED_MARKER, WANDB_RUN_FILE)


def run_uri(storage: str, name: str) -> str:
    """The run's directory: where Ray Train puts its checkpoints, and our metrics."""
    return join(storage, name)


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint at `step` (sortable)."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name, None for anything else."""
    match = CHECKPOINT_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def cache_root(storage: str, key: str) -> str:
    """Where the feature cache with `key` lives under the storage root."""
    return join(storage, FEATURE_CACHE_DIR, key)


def metrics_lines(text: str, where: str) -> list[str]:
    """The complete records of a `metrics.jsonl` text, one JSON object per line.

    A torn last line (a writer killed mid-write on storage without atomic writes) is
    dropped: the record is logged again when the run resumes. Any other line that is not a
    JSON object is corruption and raises ValueError naming `where` and the line."""
    import json

    lines = [ln for ln in text.splitlines() if ln.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            if number == len(lines):
                return lines[:-1]
            raise ValueError(
                f"{where}: line {number} is not a metrics record ({line[:60]!r}); delete that "
                "line, or the file to start the log afresh"
            )
    return lines


def eval_table_name(step: int) -> str:
    """File name of the evaluation table of `step` under `EVAL_DIR` (sortable)."""
    return f"eval_{step:09d}.json"
