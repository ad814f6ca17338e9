"""Repairing a run directory before the run (re)starts.

Ray Train V2 keeps its own checkpoint bookkeeping in the run directory (`RAY_RUN_STATE`) and,
on restart, fails with `CheckpointManagerInitializationError` when a checkpoint it remembers
is gone. Worse, when it remembers checkpoints the run is about to write again (a resume from
an older checkpoint because newer ones are corrupt), its retention deletes the new ones under
the old entries' names. So when Ray's state names a checkpoint that is missing or does not
verify, it is moved aside (renamed, never deleted) and Ray starts its bookkeeping afresh.
Checkpoint directories are left as they are: resume discovery skips the invalid ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.run_layout import RAY_RUN_STATE, STALE_SUFFIX
from smolvla_ray.storage import filesystem, join, with_retries


def remembered_checkpoints(snapshot: bytes) -> list[str]:
    """The checkpoint directory names Ray's state refers to (raises ValueError when it is
    not the JSON object Ray writes)."""
    state = json.loads(snapshot)
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    results = [*state.get("checkpoint_results", []), *state.get("pending_training_results", [])]
    if state.get("latest_checkpoint_result"):
        results.append(state["latest_checkpoint_result"])
    return list(dict.fromkeys(str(r["checkpoint_dir_name"]) for r in results))


def recover_run_dir(
    run_uri: str,
    storage_options: Mapping[str, Any],
    *,
    fallback: str | None = None,
    now: Callable[[], float] = time.time,
) -> str | None:
    """Move Ray's state aside when it names a checkpoint that is missing or invalid (or is
    unreadable). Returns the one line that says what happened and where the run starts
    (`fallback`: checkpoint.from_checkpoint); None when nothing needed repair."""
    fs, root = filesystem(run_uri, storage_options)
    snapshot = join(root, RAY_RUN_STATE)
    try:
        raw = with_retries(lambda: fs.cat_file(snapshot), what=f"read of {snapshot}")
    except FileNotFoundError:
        return None
    infos = list_checkpoints(run_uri, storage_options, hashes=False)
    by_name = {info.uri.rstrip("/").rsplit("/", 1)[-1]: info for info in infos}
    try:
        remembered = remembered_checkpoints(raw)
        bad = {n: by_name[n].problem if n in by_name else "missing" for n in remembered}
        bad = {n: problem for n, problem in bad.items() if problem is not None}
    except (ValueError, KeyError, TypeError) as err:
        bad = {RAY_RUN_STATE: f"unreadable: {err}"}
    if not bad:
        return None
    # Invalid checkpoints Ray does not remember are skipped all the same: name them too.
    bad.update({n: i.problem for n, i in by_name.items() if not i.valid and n not in bad})
    stale = _free_name(
        fs, f"{snapshot}{STALE_SUFFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now()))}"
    )
    with_retries(lambda: fs.mv(snapshot, stale), what=f"rename of {snapshot}")
    problems = ", ".join(f"{name}: {problem}" for name, problem in sorted(bad.items()))
    moved = f"Ray Train's stale run state moved to {stale.rsplit('/', 1)[-1]}"
    valid = [info for info in infos if info.valid]
    if valid:
        return f"resuming from step {valid[-1].step}; ignoring invalid ({problems}); {moved}"
    start = f"starting from {fallback}" if fallback else "starting from step 0"
    return f"no checkpoint of {run_uri} verifies ({problems}); {start}; {moved}"


def _free_name(fs, path: str) -> str:
    """`path`, or `path-1`, `path-2`, ... when taken (an earlier repair is never overwritten)."""
    candidate, n = path, 0
    while fs.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate
