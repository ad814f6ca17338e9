"""A debugging record of the samples each step trained on: with `SMOLVLA_RAY_SAMPLE_LOG` set
to a local file path in the driver's environment, every worker appends one JSON line per
step, `{"step", "rank", "world_size", "index"}` (`index`: the dataset's `index` column of
the step's samples on that worker, micro-batches in order). The union over ranks of a step
is its global batch, so two runs (say, one resumed on another number of workers) can be
compared sample by sample. A mixture's lines add `"dataset"`, each sample's dataset
position in `data.datasets` (two datasets share index values). Off by default; the file
grows by one line per step and worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from smolvla_ray.keys import DATASET_INDEX

SAMPLE_LOG_ENV = "SMOLVLA_RAY_SAMPLE_LOG"


def sample_log_path() -> str | None:
    """The file `SMOLVLA_RAY_SAMPLE_LOG` names in this process's environment, if any."""
    return os.environ.get(SAMPLE_LOG_ENV) or None


def append_samples(
    path: str, *, step: int, rank: int, world_size: int, micro_batches: Sequence[dict[str, Any]]
) -> None:
    """One line for this worker's samples of `step`."""
    index = [i for batch in micro_batches for i in batch["index"].tolist()]
    record: dict[str, Any] = {"step": step, "rank": rank, "world_size": world_size, "index": index}
    if all(DATASET_INDEX in batch for batch in micro_batches):
        record["dataset"] = [d for batch in micro_batches for d in batch[DATASET_INDEX].tolist()]
    line = json.dumps(record)
    with open(path, "a") as handle:  # one O_APPEND write per line: workers do not interleave
        handle.write(line + "\n")
