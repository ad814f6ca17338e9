"""The Ray adapter: what Ray Train's TorchTrainer runs on every worker. It turns the spec's
public dict of the loop config back into the run's `RunSettings`, reads the worker's
context, installs the SIGTERM/preemption handling and hands `trainer.train` a reporter that
turns each report that saves into `ray.train.report` (rank 0's checkpoint uploaded by our
retrying upload function, asynchronously unless an interrupt needs it to land first)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint
from ray.train.v2._internal.execution import context as ray_train_context
from ray.train.v2.api.report_config import CheckpointConsistencyMode, CheckpointUploadMode
from ray.train.v2.api.reported_checkpoint import ReportedCheckpointStatus

from smolvla_ray.checkpoint.writer import upload_checkpoint
from smolvla_ray.run_layout import checkpoint_dir_name
from smolvla_ray.settings import RunSettings
from smolvla_ray.shared_storage import marker_problem, not_shared_message
from smolvla_ray.storage import filesystem
from smolvla_ray.train.evaluation import CHECKPOINT_STEP
from smolvla_ray.train.interrupt import Interrupts
from smolvla_ray.train.sample_log import sample_log_path


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config` comes from `loop_config(settings, ...)`."""
    # Imported here, on the worker: the driver imports this module only to name this
    # function, and the model's imports (transformers) would cost it seconds on every run.
    from smolvla_ray.train.trainer import WorkerContext, train

    # Ray Train logs every report, whole metrics dict included, at INFO on every worker, and
    # Ray forwards it to the driver's console; our progress lines say what matters. (Its
    # logger is named after the module's file, not its dotted name.)
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)

    settings = RunSettings.from_spec_json(loop_config["spec"])
    storage_options = ray.get(loop_config["storage_options_ref"])
    ray_context = ray.train.get_context()
    device = ray.train.torch.get_device() if settings.use_gpu else torch.device("cpu")
    context = WorkerContext(
        rank=ray_context.get_world_rank(),
        world_size=ray_context.get_world_size(),
        device=device,
        storage_options=storage_options,
        feature_cache=loop_config.get("feature_cache"),
        sample_log=loop_config.get("sample_log"),
    )
    check_shared_storage(settings, loop_config.get("shared_token"), storage_options)
    reporter = RayReporter(settings, storage_options)
    interrupts = Interrupts(device=device, stop_key=loop_config.get("stop_key"), rank=context.rank)
    train(settings, reporter, context, interrupts=interrupts)


class RayReporter:
    """`trainer.Reporter` over `ray.train.report`."""

    def __init__(self, settings: RunSettings, storage_options: Mapping[str, Any]) -> None:
        self.upload_fn = checkpoint_upload_fn(settings.checkpoint.storage, storage_options)
        self.mode = (
            CheckpointUploadMode.ASYNC
            if settings.checkpoint.upload_mode == "async"
            else CheckpointUploadMode.SYNC
        )
        self._seen: set[int] = set()  # checkpoint steps whose async evaluation was handed on

    def report(
        self,
        metrics: Mapping[str, Any],
        checkpoint: Path | None,
        *,
        save: bool,
        sync: bool,
        validate: bool = False,
    ) -> None:
        """Only reports that save reach Ray: Ray Train V2 takes one report per worker-group
        poll (every 2 s) through a queue of one, so reporting every log step made runs wait
        out the backlog (a 20-step tiny run: 40 s after its last step). Metrics reach their
        sinks from rank 0 (`train/metrics.py`); Ray needs the checkpoints, and the last
        step always saves, so `Result.metrics` is still the final step's. `save` is agreed by
        all ranks (and implied by `sync`), so they all skip the same reports."""
        if not save:
            return
        ray.train.report(
            dict(metrics),
            checkpoint=Checkpoint.from_directory(str(checkpoint)) if checkpoint else None,
            checkpoint_dir_name=checkpoint_dir_name(int(metrics["step"])) if save else None,
            checkpoint_upload_mode=CheckpointUploadMode.SYNC if sync else self.mode,
            checkpoint_upload_fn=self.upload_fn,
            delete_local_checkpoint_after_upload=checkpoint is not None,
            validation=validate and checkpoint is not None,  # rank 0's checkpoint only
        )

    def validated(self, *, wait: bool) -> list[tuple[int, dict[str, float]]]:
        """The async evaluations (`eval.mode: async`, evaluation/validation.py) not handed
        on yet, by checkpoint step: without `wait`, what is finished now (this waits only
        for the last checkpoint's upload); with `wait`, after the last checkpoint's
        validation too (the run's end)."""
        mode = CheckpointConsistencyMode.VALIDATED if wait else CheckpointConsistencyMode.COMMITTED
        out = []
        for reported in ray.train.get_all_reported_checkpoints(consistency_mode=mode):
            metrics = reported.metrics or {}
            if reported.status != ReportedCheckpointStatus.VALIDATED:
                continue
            step = int(metrics.get(CHECKPOINT_STEP, -1))
            if step >= 0 and step not in self._seen:
                self._seen.add(step)
                out.append(
                    (step, {k: float(v) for k, v in metrics.items() if k.startswith("eval/")})
                )
        return sorted(out)


def checkpoint_upload_fn(
    storage_uri: str, storage_options: Mapping[str, Any]
) -> Callable[[Checkpoint, str], Checkpoint]:
    """`ray.train.report(checkpoint_upload_fn=...)` for the run's storage: uploads with
    `upload_checkpoint` to where Ray Train expects the checkpoint (its experiment path on its
    storage filesystem), so Ray's retention and `Result.checkpoint` keep working."""
    fs, _ = filesystem(storage_uri, storage_options)

    def upload(checkpoint: Checkpoint, checkpoint_dir_name: str) -> Checkpoint:
        storage = ray.train.get_context().get_storage()
        destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        upload_checkpoint(Path(checkpoint.path), fs, destination)
        return Checkpoint(destination, filesystem=storage.storage_filesystem)

    return upload


def loop_config(
    settings: RunSettings,
    storage_options: Mapping[str, Any],
    *,
    feature_cache: str | Mapping[str, str] | None = None,
    stop_key: str | None = None,
    shared_token: str | None = None,
) -> dict[str, Any]:
    """The train_loop_config for the run of `settings`: its spec's public dict, without
    secrets (Ray records this config in its run state; each worker validates it again into
    `RunSettings`), a reference to `storage_options` (secrets revealed) in Ray's object
    store, which workers read from memory, the key the driver's stop request is written
    under, the token of the run directory's shared-storage marker (None: a single-node
    private Ray), and the driver's `SMOLVLA_RAY_SAMPLE_LOG` (train/sample_log.py), which
    workers of a Ray started earlier would not inherit."""
    return {
        "spec": dict(settings.spec_json),
        "storage_options_ref": ray.put(dict(storage_options)),
        "feature_cache": feature_cache,
        "stop_key": stop_key,
        "shared_token": shared_token,
        "sample_log": sample_log_path(),
    }


def check_shared_storage(
    settings: RunSettings, token: str | None, options: Mapping[str, Any]
) -> None:
    """Refuse to train on a node that does not see the driver's run directory (a node that
    joined after the driver's check); see shared_storage.py."""
    if token is None:
        return
    problem = marker_problem(settings.run_uri, token, options)
    if problem:
        node = ray.util.get_node_ip_address()
        raise ValueError(not_shared_message(settings.checkpoint.storage, node, problem))
