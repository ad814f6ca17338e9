"""Best-checkpoint retention (`checkpoint.keep_best`), beside Ray Train's `keep_last`.

Ray Train owns the run's `checkpoint_*` directories and its bookkeeping of them; deleting
one behind its back would leave the run pointing at a checkpoint that is gone. So the best
checkpoints are *copies*, under `<run>/best/`, which Ray never sees: a checkpoint that
ranks among the `keep_best` best by `eval.metric` is uploaded a second time there, right
after its own upload, and a copy that drops out of the ranking is deleted. `best/best.json`
holds the ranking. Ray's rotation of the last checkpoints, and therefore resume, is
untouched; a best copy is an ordinary checkpoint directory (export, evaluate, from_checkpoint
all take it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smolvla_ray.checkpoint.format import STATE
from smolvla_ray.run_layout import BEST_DIR, BEST_FILE, checkpoint_dir_name
from smolvla_ray.storage import join, with_retries


def checkpoint_evaluation(local: Path) -> tuple[int, dict[str, Any], dict[str, float]]:
    """A checkpoint directory's step, the spec it was written with, and its own evaluation
    (empty when the step was not evaluated)."""
    state = json.loads((local / STATE).read_text())
    evaluation = dict(state.get("counters", {}).get("evaluation") or {})
    return int(state["step"]), state.get("spec", {}), evaluation


def read_ranking(fs, run_root: str) -> list[dict[str, Any]]:
    """`best/best.json`: the kept best checkpoints, best first ([] before any)."""
    path = join(run_root, BEST_DIR, BEST_FILE)
    if not with_retries(lambda: fs.exists(path), what=f"lookup of {path}"):
        return []
    return list(json.loads(fs.cat_file(path))["best"])


def retain_best(
    local: Path, fs, destination: str, upload: Callable[[Path, Any, str], None]
) -> list[dict[str, Any]] | None:
    """After `local` was uploaded to `destination` (a `checkpoint_*` directory of a run):
    copy it into the run's `best/` if it ranks among `checkpoint.keep_best` by `eval.metric`,
    and drop the copies that fell out. Returns the new ranking (None: nothing to do)."""
    return retain_best_with(local, fs, destination, None, upload)


def retain_best_with(
    local: Path,
    fs,
    destination: str,
    evaluation: Mapping[str, float] | None,
    upload: Callable[[Path, Any, str], None],
) -> list[dict[str, Any]] | None:
    """`retain_best` with the checkpoint's evaluation given (an async evaluation happens
    after the checkpoint was written); None: the one the checkpoint holds."""
    step, spec, held = checkpoint_evaluation(local)
    evaluation = held if evaluation is None else evaluation
    keep = int((spec.get("checkpoint") or {}).get("keep_best") or 0)
    ev = spec.get("eval") or {}
    metric, mode = ev.get("metric"), ev.get("metric_mode", "min")
    if not keep or metric not in evaluation:
        return None
    run_root = destination.rstrip("/").rsplit("/", 1)[0]
    ranking = [r for r in read_ranking(fs, run_root) if r["step"] != step]
    entry = {"step": step, "metric": metric, "mode": mode, "value": evaluation[metric]}
    ranked = sorted([*ranking, entry], key=lambda r: r["value"], reverse=mode == "max")
    kept, dropped = ranked[:keep], ranked[keep:]
    best_root = join(run_root, BEST_DIR)
    if entry in kept:
        upload(local, fs, join(best_root, checkpoint_dir_name(step)))
    payload = json.dumps({"best": kept}, indent=1).encode()
    with_retries(lambda: fs.makedirs(best_root, exist_ok=True), what=f"creating {best_root}")
    with_retries(
        lambda: fs.pipe_file(join(best_root, BEST_FILE), payload),
        what=f"write of {best_root}/{BEST_FILE}",
    )
    for gone in dropped:
        if gone is entry:  # never copied
            continue
        path = join(best_root, checkpoint_dir_name(gone["step"]))
        if with_retries(lambda p=path: fs.exists(p), what=f"lookup of {path}"):
            with_retries(lambda p=path: fs.rm(p, recursive=True), what=f"removal of {path}")
    return kept


def best_checkpoint_uri(run: str, storage_options: Mapping[str, Any]) -> str | None:
    """The URI of the run's best checkpoint copy (None without keep_best results)."""
    from smolvla_ray.storage import filesystem

    fs, root = filesystem(run, storage_options)
    ranking = read_ranking(fs, root)
    if not ranking:
        return None
    return join(run.rstrip("/"), BEST_DIR, checkpoint_dir_name(int(ranking[0]["step"])))


def resolve_best(uri: str, storage_options: Mapping[str, Any]) -> str:
    """`<run>/best` stands for the run's best checkpoint copy; any other URI is itself."""
    stripped = uri.rstrip("/")
    if stripped.rsplit("/", 1)[-1] != BEST_DIR:
        return uri
    run = stripped.rsplit("/", 1)[0]
    best = best_checkpoint_uri(run, storage_options)
    if best is None:
        raise FileNotFoundError(
            f"{run} has no best checkpoint: the run kept none (checkpoint.keep_best) or no "
            "checkpoint was evaluated yet"
        )
    return best


def stored_evaluation(uri: str, storage_options: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation a checkpoint in storage holds ({} when its step was not evaluated)."""
    from smolvla_ray.storage import filesystem

    fs, root = filesystem(uri, storage_options)
    try:
        state = json.loads(fs.cat_file(join(root, STATE)))
    except (FileNotFoundError, ValueError):
        return {}
    return dict(state.get("counters", {}).get("evaluation") or {})
