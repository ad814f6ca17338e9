"""`eval.mode: async`: evaluations as Ray Train validation tasks (Ray 2.60, alpha API).

At an evaluation step the trainer's rank 0 reports its checkpoint with `validation=True`;
Ray runs `validate_checkpoint` on that checkpoint in a task of its own (`eval.async_resources`,
one at a time) while training goes on, with the spec's public dict, which it turns into the
run's `RunSettings`. The task rebuilds the policy from the checkpoint
(as `export` does: with its EMA weights when the run keeps an EMA), evaluates the held-out
samples on one process, writes the evaluation table (naming the weights), updates the best
checkpoints (`checkpoint/best.py`, from its local copy) and returns the `eval/...`
summaries, which Ray attaches to that checkpoint's metrics. The trainer picks
the results up at its next evaluation step (`train/loop.py::RayReporter.validated`) and
logs them then, with `eval/checkpoint_step` naming the step they belong to: a result arrives
one evaluation later.
The training step never waits for an evaluation; the cost is the task's resources.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smolvla_ray.train.evaluation import CHECKPOINT_STEP


def validate_checkpoint(
    checkpoint,
    *,
    spec_json: dict[str, Any],
    feature_cache: str | None = None,
    storage_options_ref=None,
) -> dict[str, float]:
    """Ray Train's validation function: the `eval/...` summaries of `checkpoint`."""
    import ray
    import torch

    from smolvla_ray.build import open_dataset, resolve_dataset_features
    from smolvla_ray.checkpoint.best import retain_best_with
    from smolvla_ray.checkpoint.discovery import fetch_checkpoint
    from smolvla_ray.checkpoint.export import load_trained
    from smolvla_ray.checkpoint.format import read_checkpoint
    from smolvla_ray.checkpoint.writer import upload_checkpoint
    from smolvla_ray.run_layout import checkpoint_step
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.storage import filesystem, join
    from smolvla_ray.train.evaluation import HeldOut, evaluate_batches, write_table
    from smolvla_ray.train.setup import build_held_out, fetch_feature_cache

    settings = RunSettings.from_spec_json(spec_json)
    assert settings.eval is not None
    options: Mapping[str, Any] = ray.get(storage_options_ref) if storage_options_ref else {}
    # The checkpoint's own URI in the run's storage (Ray hands a path in its filesystem).
    run = settings.run_uri
    name = str(checkpoint.path).rstrip("/").rsplit("/", 1)[-1]
    uri, step = join(run, name), checkpoint_step(name)
    assert step is not None, checkpoint.path
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(uri, options)  # the EMA weights when the run keeps an EMA
    policy = trained.policy
    meta = open_dataset(settings, storage_options=options)
    policy.feature_resolution = resolve_dataset_features(settings, meta, storage_options=options)[1]
    policy.to(device)
    features = fetch_feature_cache(settings, meta, feature_cache, options)
    held_out = build_held_out(settings, meta, policy, storage_options=options, features=features)
    if not isinstance(held_out, HeldOut):  # the spec refuses eval.mode async for mixtures
        raise RuntimeError("an async validation task evaluates one dataset's held-out samples")
    bf16 = settings.train.precision == "bf16" and device.type == "cuda"
    autocast = torch.bfloat16 if bf16 else None
    sums = evaluate_batches(
        policy, held_out.batches(), seed=settings.train.seed, device=device, autocast_dtype=autocast
    )
    summary = {**sums.summary(), "eval/seconds": time.perf_counter() - start}
    write_table(
        run, options, step=step, summary=summary, table=sums.table(), best=False,
        weights=trained.weights,
    )  # fmt: skip
    if settings.checkpoint.keep_best:
        fs, path = filesystem(uri, options)
        with tempfile.TemporaryDirectory(prefix="smolvla-validate-") as tmp:
            local = fetch_checkpoint(uri, Path(tmp), options)
            read_checkpoint(local)  # verified before it is copied
            retain_best_with(
                local, fs, path, summary,
                lambda a, b, c: upload_checkpoint(a, b, c, best=False),
            )  # fmt: skip
    return {**summary, CHECKPOINT_STEP: float(step)}
