"""Rank 0's metrics: one logger interface (`MetricsLog`) with sinks behind it.

Every record goes to `metrics.jsonl` beside the checkpoints (any fsspec URL); optionally to
TensorBoard event files in `<run>/tensorboard/`, to an MLflow run and to a W&B run. Object
stores cannot append, so the JSON lines are rewritten whole and the event file is re-uploaded
at each report; a run logs a few thousand small records at most, which keeps that cheap.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from smolvla_ray.run_layout import METRICS_FILE, TENSORBOARD_DIR, WANDB_RUN_FILE, metrics_lines
from smolvla_ray.scratch import scratch_root, scratch_tempdir
from smolvla_ray.storage import filesystem, join, with_retries

MLFLOW_RUN_URI_TAG = "smolvla_ray.run_uri"
MLFLOW_CHECKPOINT_TAG = "smolvla_ray.final_checkpoint"
# MLflow servers before 2.x accept 500 characters per param value.
_MLFLOW_PARAM_CHARS = 500
_MLFLOW_BATCH = 100
WANDB_CHECKPOINT_KEY = "final_checkpoint"  # in the W&B run's summary
WANDB_INSTALL = "pip install 'smolvla-ray[wandb]'"


def scalar_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a record, `step` excluded (strings like fingerprints are not
    metrics)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def tensorboard_tag(key: str) -> str:
    """TensorBoard (and W&B) tag of a metric: timings and throughput under `perf/`, the rest
    `train/`; a key that names its group already (`eval/success`) stays as it is."""
    if "/" in key:
        return key
    perf = key.endswith("_s") or key in ("samples_per_s", "comm_bytes")
    return f"{'perf' if perf else 'train'}/{key}"


class MetricSink(Protocol):
    """A backend of `MetricsLog`."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Persist one record (it has a `step`)."""

    def close(self, *, final_checkpoint: str | None) -> None:
        """Flush and release; `final_checkpoint` is the URI of the run's last checkpoint."""


class JsonlSink:
    """`metrics.jsonl`: every record as one sorted-key JSON line, plus its wall time."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any]) -> None:
        self.fs, root = filesystem(uri, storage_options)
        self.path = join(root, METRICS_FILE)
        self.lines: list[str] = []
        if self.fs.exists(self.path):  # a resumed run continues its log
            text = self.fs.cat_file(self.path).decode(errors="replace")
            self.lines = metrics_lines(text, self.path)

    def log(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        # After a resume, drop records past the restored step: they will be logged again.
        self.lines = [ln for ln in self.lines if json.loads(ln).get("step", 0) < step]
        self.lines.append(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True))
        payload = ("\n".join(self.lines) + "\n").encode()

        def write() -> None:
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(self.path, payload)

        with_retries(write, what=f"write of {self.path}")  # storage hiccups do not kill runs

    @property
    def last_step(self) -> int | None:
        """The step of the last record in the log, None while it is empty."""
        return int(json.loads(self.lines[-1])["step"]) if self.lines else None

    def close(self, *, final_checkpoint: str | None) -> None:
        pass


class TensorBoardSink:
    """Event files written locally by tensorboardX and copied to `<run>/tensorboard/` after
    every record, so TensorBoard can read them from any storage while the run goes on."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any]) -> None:
        self.fs, root = filesystem(uri, storage_options)
        self.remote_dir = join(root, TENSORBOARD_DIR)
        self._local = scratch_tempdir("tensorboard")
        self._writer: Any = None

    def log(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # After a restart the previous process's file holds steps past the restored one;
            # purge_step makes TensorBoard drop them in favour of this file's.
            resumed = int(record.get("resumed_from_step") or 0)
            self._writer = SummaryWriter(
                self._local.name,
                purge_step=resumed + 1 if resumed else None,
                filename_suffix=f".{os.getpid()}",  # unique across restarts on one host
            )
        for key, value in scalar_metrics(record).items():
            self._writer.add_scalar(tensorboard_tag(key), value, global_step=record["step"])
        self._writer.flush()
        self._upload()

    def _upload(self) -> None:
        def upload() -> None:
            self.fs.makedirs(self.remote_dir, exist_ok=True)
            for name in sorted(os.listdir(self._local.name)):
                local = os.path.join(self._local.name, name)
                self.fs.put_file(local, f"{self.remote_dir}/{name}")

        with_retries(upload, what=f"upload of TensorBoard events to {self.remote_dir}")

    def close(self, *, final_checkpoint: str | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._upload()
            self._writer = None
        self._local.cleanup()


def flatten_params(value: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b": "value"}: strings as they are, anything else as JSON."""
    out: dict[str, str] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            out.update(flatten_params(item, f"{name}."))
        else:
            text = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
            out[name] = text[:_MLFLOW_PARAM_CHARS]
    return out


class MlflowSink:
    """One MLflow run per job: params = the spec without secrets, every metric per step,
    the final checkpoint URI as a tag. A restarted worker group continues the same run."""

    def __init__(
        self,
        uri: str,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ImportError(
                f"observe.mlflow_tracking_uri={tracking_uri!r} needs MLflow on the workers: "
                "pip install 'mlflow-skinny>=2.10' (or set observe.mlflow_tracking_uri: null)"
            ) from err
        if tracking_uri.startswith("file:"):
            # MLflow 3 refuses file stores unless told; a file: URI in the spec says so.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self._running_run(experiment_id, run_name, uri)
        if self.run_id is None:
            run = self.client.create_run(
                experiment_id, run_name=run_name, tags={MLFLOW_RUN_URI_TAG: uri}
            )
            self.run_id = run.info.run_id
            self._log_params(flatten_params(params))

    def _running_run(self, experiment_id: str, run_name: str, uri: str) -> str | None:
        """The unfinished MLflow run of this job, left by a worker group that failed."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.mlflow.runName = '{run_name}'",
            max_results=50,
        )
        for run in runs:
            if run.data.tags.get(MLFLOW_RUN_URI_TAG) == uri:
                return run.info.run_id
        return None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for start in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MLFLOW_BATCH])

    def log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, int(record["step"]))
            for key, value in scalar_metrics(record).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, *, final_checkpoint: str | None) -> None:
        if final_checkpoint is not None:
            self.client.set_tag(self.run_id, MLFLOW_CHECKPOINT_TAG, final_checkpoint)
        self.client.set_terminated(self.run_id, "FINISHED")


def wandb_dir() -> Path:
    """Where W&B keeps its local run files unless WANDB_DIR says otherwise. Not W&B's default
    (the worker process's working directory, which is Ray's to choose), and not a swept
    scratch directory: offline runs are synced from here after the run."""
    path = scratch_root() / "wandb"
    path.mkdir(exist_ok=True)
    return path


def wandb_run_id(
    uri: str, storage_options: Mapping[str, Any], *, project: str, entity: str | None
) -> tuple[str, bool]:
    """The W&B run id of the run at `uri`, and whether it was made before: read from the
    run directory's `WANDB_RUN_FILE`, or made now and written there (before `wandb.init`, so
    a worker killed at any later point leaves it for the resume)."""
    fs, root = filesystem(uri, storage_options)
    path = join(root, WANDB_RUN_FILE)
    if with_retries(lambda: fs.exists(path), what=f"lookup of {path}"):
        text = with_retries(lambda: fs.cat_file(path), what=f"read of {path}")
        try:
            return str(json.loads(text)["run_id"]), True
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{uri}/{WANDB_RUN_FILE} does not hold a W&B run id; delete it to log the "
                "rest of the run to a new W&B run"
            ) from None
    run_id = uuid.uuid4().hex[:16]
    payload = json.dumps({"run_id": run_id, "project": project, "entity": entity}).encode()

    def write() -> None:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(path, payload)

    with_retries(write, what=f"write of {path}")
    return run_id, False


class WandbSink:
    """One W&B run per job: config = the spec without secrets, every metric per step under
    TensorBoard's tags, the final checkpoint URI in the run's summary.

    The run id is kept in the run directory, so a restarted worker group or a resumed rerun
    continues the same W&B run. W&B drops steps lower than ones it holds (with a warning per
    record), so after a resume the records up to `logged_until`, the last step logged before
    the restart, are not sent again."""

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, Any],
        *,
        project: str,
        entity: str | None,
        run_name: str,
        tags: Sequence[str],
        mode: str,
        config: Mapping[str, Any],
        logged_until: int | None,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"observe.wandb_project={project!r} needs W&B on the workers: {WANDB_INSTALL} "
                "(or set observe.wandb_project: null)"
            ) from err
        run_id, resumed = wandb_run_id(uri, storage_options, project=project, entity=entity)
        self.logged_until = logged_until if resumed else None
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            tags=list(tags),
            # W&B's own variables win over the spec; init's arguments would win over them.
            mode=None if os.environ.get("WANDB_MODE") else mode,  # type: ignore[arg-type]
            dir=None if os.environ.get("WANDB_DIR") else str(wandb_dir()),
            config=dict(config),
            id=run_id,
            resume="allow",
            # A run an earlier attempt in this process left open (it raised) is finished,
            # not returned as this one; Ray's restarts start new processes anyway.
            reinit="finish_previous",
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if self.logged_until is not None and step <= self.logged_until:
            return  # the W&B run holds this step from before the restart
        metrics = {tensorboard_tag(key): value for key, value in scalar_metrics(record).items()}
        # commit: the row is written now, not when the next step comes (a killed worker's
        # last record would be lost, and not sent again after the resume).
        self.run.log(metrics, step=step, commit=True)

    def close(self, *, final_checkpoint: str | None) -> None:
        if final_checkpoint is not None:
            self.run.summary[WANDB_CHECKPOINT_KEY] = final_checkpoint
        self.run.finish()


class MetricsLog:
    """Rank 0's metrics logger: each `append` goes to `metrics.jsonl` and to TensorBoard,
    MLflow and W&B when asked; `close()` at the end of training finishes them."""

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, Any],
        *,
        tensorboard: bool = False,
        mlflow_tracking_uri: str | None = None,
        mlflow_experiment: str = "smolvla-ray",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        wandb_run_name: str | None = None,
        wandb_tags: Sequence[str] = (),
        wandb_mode: str = "online",
    ) -> None:
        self.uri = uri
        jsonl = JsonlSink(uri, storage_options)
        self.sinks: list[MetricSink] = [jsonl]
        name = run_name or uri.rstrip("/").rsplit("/", 1)[-1]
        if tensorboard:
            self.sinks.append(TensorBoardSink(uri, storage_options))
        if mlflow_tracking_uri is not None:
            self.sinks.append(
                MlflowSink(
                    uri,
                    tracking_uri=mlflow_tracking_uri,
                    experiment=mlflow_experiment,
                    run_name=name,
                    params=params or {},
                )
            )
        if wandb_project is not None:
            self.sinks.append(
                WandbSink(
                    uri,
                    storage_options,
                    project=wandb_project,
                    entity=wandb_entity,
                    run_name=wandb_run_name or name,
                    tags=wandb_tags,
                    mode=wandb_mode,
                    config=params or {},
                    # metrics.jsonl is written first, so it holds every step sent before.
                    logged_until=jsonl.last_step,
                )
            )
        self.last_step: int | None = None

    def append(self, record: Mapping[str, Any]) -> None:
        """Log one record (must have `step`) to every sink."""
        for sink in self.sinks:
            sink.log(record)
        self.last_step = int(record["step"])

    def close(self) -> None:
        """Finish every sink. The loop checkpoints at its last step, so the final checkpoint
        is the one of the last step logged."""
        from smolvla_ray.run_layout import checkpoint_dir_name

        final = None
        if self.last_step is not None:
            final = join(self.uri, checkpoint_dir_name(self.last_step))
        for sink in self.sinks:
            sink.close(final_checkpoint=final)
        self.sinks = []


def read_metrics(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """The records of a run's `metrics.jsonl` (URI of the run directory)."""
    fs, root = filesystem(uri, storage_options or {})
    path = join(root, METRICS_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}/{METRICS_FILE} does not exist")
    lines = metrics_lines(fs.cat_file(path).decode(errors="replace"), f"{uri}/{METRICS_FILE}")
    return [json.loads(line) for line in lines]
