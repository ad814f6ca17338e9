"""Spec -> Ray Train: ScalingConfig, RunConfig (storage through fsspec), TorchTrainer.

`run(spec)` trains on an embedded local Ray (or `address=` an existing cluster) and blocks
until the run ends. Everything that can be checked before starting is checked first
(docs/design.md, invariant 6): nothing starts, and no cluster resource is held, on bad input.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smolvla_ray import hub
from smolvla_ray.run_layout import WRITE_PROBE
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec
from smolvla_ray.stop import (
    RunStopped,
    abort_on_signals,
    call_off_main_thread,
    graceful_stop,
    signals_ignored,
)
from smolvla_ray.storage import absolute, filesystem, join
from smolvla_ray.waits import (
    ResourceWaitTimeout,
    check_endpoint,
    reachable,
    resource_message,
    show_resources,
)

if TYPE_CHECKING:
    from smolvla_ray.features import FeatureResolution
    from smolvla_ray.observe.progress import Progress, ProgressMode


@dataclass(frozen=True)
class StorageTarget:
    """Where Ray Train persists the run: a path and, for non-local URLs, a pyarrow fs."""

    path: str
    filesystem: Any | None  # pyarrow.fs.FileSystem


def storage_target(uri: str, storage_options: Mapping[str, Any]) -> StorageTarget:
    """Any fsspec URL as Ray Train storage (pyarrow's PyFileSystem over the fsspec fs)."""
    if "://" not in uri or uri.startswith("file://"):
        return StorageTarget(str(absolute(uri)), None)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage_options)
    return StorageTarget(path, PyFileSystem(FSSpecHandler(fs)))


def resolve_local_paths(spec: JobSpec) -> JobSpec:
    """Relative local paths made absolute against the driver's working directory: Ray
    workers run elsewhere. A hub id such as `lerobot/smolvla_base` is left alone."""
    pretrained = spec.policy.pretrained
    if pretrained and os.path.exists(pretrained):
        pretrained = absolute(pretrained)

    def local(uri: str | None) -> str | None:
        return uri if uri is None or hub.is_hub_id(uri) else absolute(uri)

    data: dict[str, Any] = {"uri": local(spec.data.uri), "cache_dir": absolute(spec.data.cache_dir)}
    if spec.data.datasets is not None:
        data["datasets"] = [
            d.model_copy(update={"uri": local(d.uri), "name": d.resolved_name})
            for d in spec.data.datasets
        ]
    return spec.model_copy(
        update={
            "policy": spec.policy.model_copy(update={"pretrained": pretrained}),
            "data": spec.data.model_copy(update=data),
            "checkpoint": spec.checkpoint.model_copy(
                update={
                    "storage": absolute(spec.checkpoint.storage),
                    "from_checkpoint": absolute(spec.checkpoint.from_checkpoint),
                }
            ),
        }
    )


def preflight(spec: JobSpec) -> FeatureResolution:
    """Fail before starting on what can be known now: the dataset reachable, the pretrained
    policy's config.json readable, the dataset's features resolvable against the policy's
    (cameras, rename map, widths), storage writable. Returns the feature resolution."""
    from smolvla_ray.build import (
        cached_episodes,
        mixture_episodes,
        mixture_run_episodes,
        open_dataset,
        open_mixture,
        resolve_dataset_features,
    )
    from smolvla_ray.checkpoint.discovery import inspect_checkpoint
    from smolvla_ray.data.meta import check_readable, select_episodes
    from smolvla_ray.keys import ACTION, OBS_STATE
    from smolvla_ray.policy.weights_file import weights_problem
    from smolvla_ray.prepare import check_hub_ids, check_resume_spec

    check_hub_ids(spec)  # hub ids and revisions exist (offline: are in the cache)
    options = spec.storage_options_plain()
    check_endpoint(options)
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options=options)
    metas = open_mixture(settings, storage_options=options)  # {} for one dataset
    if metas:
        for name, selected in mixture_episodes(settings, metas).items():
            check_readable(metas[name], selected, needs_stats=[OBS_STATE, ACTION])
        mixture_run_episodes(settings, metas)  # a dataset held out whole is refused now
    else:
        try:
            select_episodes(meta, settings.data.episodes)
        except ValueError as err:
            raise ValueError(f"data.episodes: {err}") from None
        episodes = cached_episodes(settings, meta)  # training and held-out (errors say eval.)
        check_readable(meta, episodes, needs_stats=[OBS_STATE, ACTION])
    source = spec.checkpoint.from_checkpoint
    if source:
        info = inspect_checkpoint(absolute(source), options, hashes=False)
        if not info.valid:
            raise ValueError(
                f"checkpoint.from_checkpoint={source!r} cannot be started from: {info.problem}"
            )
    if spec.policy.pretrained:
        _refuse_adapter_base(spec.policy.pretrained, options)
    _, resolution = resolve_dataset_features(
        settings, meta, storage_options=options, metas=metas or None
    )
    if spec.policy.pretrained:
        problem = weights_problem(spec.policy.pretrained, options)
        if problem:
            raise ValueError(f"policy.pretrained: {problem}; copy the pretrained_model/ again")
    _check_writable(spec.checkpoint.storage, options)
    tracking = spec.observe.mlflow_tracking_uri
    if tracking and tracking.startswith(("http://", "https://")):
        port = 443 if tracking.startswith("https") else 80
        reachable(tracking, default_port=port, what="observe.mlflow_tracking_uri: MLflow")
    # A resume that changes what cannot change fails here, before Ray (docs/job-spec.md).
    check_resume_spec(resolve_local_paths(spec), options)
    return resolution


def check_address(address: str | None) -> None:
    """A named cluster (host:port, ray://) must answer before `run` waits on it: Ray's own
    connect retries take minutes."""
    chosen = ray_address(address)
    if chosen in ("local", "auto"):
        return
    port = 10001 if chosen.startswith("ray://") else 6379
    reachable(chosen, default_port=port, what="the Ray cluster")


def check_sink_packages(spec: JobSpec, address: str | None) -> None:
    """A metric sink whose package is missing fails here, before Ray starts, rather than on
    rank 0 once the workers are up. Only a private local Ray's workers run in this
    environment; a cluster's image may have what the driver lacks."""
    import importlib.util

    from smolvla_ray.train.metrics import WANDB_INSTALL

    if ray_address(address) != "local":
        return
    observe = spec.observe
    if observe.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ValueError(
            f"observe.mlflow_tracking_uri={observe.mlflow_tracking_uri!r} needs MLflow: pip "
            "install 'mlflow-skinny>=2.10', or set observe.mlflow_tracking_uri: null"
        )
    if observe.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"observe.wandb_project={observe.wandb_project!r} needs W&B: {WANDB_INSTALL}, or "
            "set observe.wandb_project: null"
        )


def check_peft_package(spec: JobSpec) -> None:
    """LoRA adapters (`policy.peft`) need the peft package: here, for the cache decision,
    and on the workers. Missing, the run fails before Ray starts, naming the extra."""
    import importlib.util

    if spec.policy.peft is not None and importlib.util.find_spec("peft") is None:
        raise ValueError(
            "policy.peft trains LoRA adapters, which need the peft package: pip install "
            "'smolvla-ray[peft]' (peft>=0.18,<1.0), or remove policy.peft"
        )


def _refuse_adapter_base(pretrained: str, options: Mapping[str, Any]) -> None:
    """A PEFT adapter directory (LeRobot's `use_peft` layout) holds no base weights to
    finetune; name its base instead. (`evaluate` and `SmolVLAPolicy.from_pretrained` load
    it on top of that base.)"""
    from smolvla_ray.policy.weights_file import ADAPTER_CONFIG

    if hub.is_hub_id(pretrained) and not os.path.isdir(pretrained):
        return
    fs, root = filesystem(absolute(pretrained), options)
    path = join(root, ADAPTER_CONFIG)
    if not fs.exists(path):
        return
    import json

    base = json.loads(fs.cat_file(path)).get("base_model_name_or_path")
    raise ValueError(
        f"policy.pretrained={pretrained!r} is a PEFT adapter (adapter_config.json) on top of "
        f"{base!r}, not a full policy: finetuning on top of an adapter is not supported. Set "
        f"policy.pretrained: {base} (add policy.peft for new adapters); `smolvla-ray "
        "evaluate` and SmolVLAPolicy.from_pretrained load the adapter itself"
    )


def repair_run_dir(spec: JobSpec) -> None:
    """Before Ray Train starts: move its stale bookkeeping aside when it names checkpoints
    that are missing or invalid (else Ray refuses to start, or its retention deletes the new
    checkpoints), saying so in one line. See checkpoint/recovery.py."""
    import sys

    from smolvla_ray.checkpoint.recovery import recover_run_dir
    from smolvla_ray.run_layout import run_uri

    line = recover_run_dir(
        run_uri(spec.checkpoint.storage, spec.name),
        spec.storage_options_plain(),
        fallback=spec.checkpoint.from_checkpoint,
    )
    if line is not None:
        sys.stderr.write(f"[smolvla-ray] {line}\n")
        sys.stderr.flush()


def final_checkpoint(spec: JobSpec, result: Any) -> str | None:
    """The checkpoint a finished run names: the run's newest valid one (what a resume or an
    export would use), else the one Ray's `result` holds."""
    from smolvla_ray.checkpoint.discovery import list_checkpoints
    from smolvla_ray.run_layout import run_uri

    spec = resolve_local_paths(spec)
    run = run_uri(spec.checkpoint.storage, spec.name)
    options = {**spec.storage_options_plain(), "use_listings_cache": False}
    valid = [i for i in list_checkpoints(run, options, hashes=False) if i.valid]
    if valid:
        return valid[-1].uri
    checkpoint = getattr(result, "checkpoint", None)
    return checkpoint.path if checkpoint is not None else None


def _check_writable(uri: str, options: Mapping[str, Any]) -> None:
    fs, root = filesystem(uri, options)
    probe = join(root, WRITE_PROBE)
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except Exception as err:  # any backend error means the same thing to the user
        raise PermissionError(
            f"checkpoint.storage={uri!r} is not writable ({type(err).__name__}: {err}); fix "
            "the URL or the credentials in storage_options"
        ) from err


def build_trainer(
    spec: JobSpec,
    *,
    feature_cache: str | Mapping[str, str] | None = None,
    stop_key: str | None = None,
    shared_token: str | None = None,
):  # -> TorchTrainer
    """The TorchTrainer for `spec` (gloo on CPU, NCCL on GPU); `stop_key`: where the
    driver's stop request is written (see `smolvla_ray.stop`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from smolvla_ray.train.loop import loop_config, train_loop_per_worker

    options = spec.storage_options_plain()
    target = storage_target(spec.checkpoint.storage, options)
    scaling = ScalingConfig(
        num_workers=spec.scaling.num_workers,
        use_gpu=spec.scaling.use_gpu,
        resources_per_worker=spec.scaling.resources_per_worker,
        placement_strategy=spec.scaling.placement_strategy,
    )
    run_config = RunConfig(
        name=spec.name,
        storage_path=target.path,
        storage_filesystem=target.filesystem,
        # controller_failure_limit=0: a worker group that cannot be placed within
        # failure.resource_wait_s (see `resource_wait`) fails the run instead of waiting again.
        failure_config=FailureConfig(
            max_failures=spec.failure.max_failures, controller_failure_limit=0
        ),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
    )
    config = loop_config(
        RunSettings.from_spec(spec),
        options,
        feature_cache=feature_cache,
        stop_key=stop_key,
        shared_token=shared_token,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        validation_config=validation_config(spec, feature_cache, config["storage_options_ref"]),
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(
            backend="nccl" if spec.scaling.use_gpu else "gloo",
            timeout_s=spec.failure.collective_timeout_s,
        ),
    )


def validation_config(
    spec: JobSpec, feature_cache: str | Mapping[str, str] | None, storage_options_ref
):
    """Ray Train's ValidationConfig for `eval.mode: async` (None otherwise): our
    `validate_checkpoint` on `eval.async_resources`, one at a time (evaluation/validation.py).
    The spec travels without secrets; the storage options by object reference."""
    if spec.eval is None or spec.eval.mode != "async":
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    from smolvla_ray.evaluation.validation import validate_checkpoint

    resources = dict(spec.eval.async_resources)
    remote = {"num_cpus": resources.pop("CPU", 1), "num_gpus": resources.pop("GPU", 0)}
    if resources:
        remote["resources"] = resources
    return ValidationConfig(
        fn=functools.partial(validate_checkpoint, storage_options_ref=storage_options_ref),
        task_config=ValidationTaskConfig(
            fn_kwargs={"spec_json": spec.public_dict(), "feature_cache": feature_cache}
        ),
        ray_remote_kwargs=remote,
    )


def run(
    spec: JobSpec,
    *,
    address: str | None = None,
    check: bool = True,
    progress: ProgressMode | Progress | None = None,
    force: bool = False,
):  # -> ray Result
    """Train `spec` and block until it ends; a private local Ray unless `address` (or
    $RAY_ADDRESS) names a cluster, see `ray_address`.

    `progress` shows live progress (a mode: bar, lines, json, quiet; or a `Progress`) from
    the run's metrics.jsonl, polled in a background thread; None shows none.

    One writer per run: the run directory's lease is taken before Ray starts and held
    (renewed in a thread) until the run ends; LeaseHeldError if another run holds it.
    `force` takes over a lease whose holder died (an expired one), never a live one."""
    import ray

    from smolvla_ray import lease as run_lease
    from smolvla_ray.observe.progress import MetricsWatcher, Progress
    from smolvla_ray.prepare import pin_hub_revisions
    from smolvla_ray.run_layout import run_uri

    spec = resolve_local_paths(spec)
    check_peft_package(spec)
    if check:
        preflight(spec)
    run_dir = run_uri(spec.checkpoint.storage, spec.name)
    held = run_lease.acquire(run_dir, spec.storage_options_plain(), force=force)
    with held:  # renewed across Ray Train's worker-group restarts; released however it ends
        repair_run_dir(spec)  # Ray's stale checkpoint bookkeeping moved aside (recovery.py)
        spec = pin_hub_revisions(spec)  # workers, restarts and exports see the same commits
        check_sink_packages(spec, address)
        display = progress
        if isinstance(progress, str):
            display = None if progress == "quiet" else Progress(progress, spec.train.steps)
        if not ray.is_initialized():
            # JSON mode is for scripts: keep workers' output off stdout (it stays in Ray's logs).
            to_driver = not (isinstance(display, Progress) and display.mode == "json")
            start_ray(ray_address(address), log_to_driver=to_driver)
        from smolvla_ray.cache.build import ensure_feature_cache

        stop_key = f"{spec.name}/{uuid.uuid4().hex}"
        with abort_on_signals():
            shared_token = check_shared_storage(spec)  # every node sees the run directory
            feature_cache = ensure_feature_cache(spec, spec.storage_options_plain())
            trainer = build_trainer(
                spec, feature_cache=feature_cache, stop_key=stop_key, shared_token=shared_token
            )
        uri = run_uri(spec.checkpoint.storage, spec.name)
        watcher = (
            MetricsWatcher(uri, spec.storage_options_plain(), display)
            if isinstance(display, Progress)
            else contextlib.nullcontext()
        )
        with watcher, resource_wait(spec), graceful_stop(stop_key) as stopping:
            result = call_off_main_thread(trainer.fit)
        if stopping.signum is not None and (result.metrics or {}).get("step") != spec.train.steps:
            raise RunStopped(result, stopping.signum)
        return result


class StorageNotSharedError(ValueError):
    """A node of the cluster does not see the run directory the driver writes."""


def check_shared_storage(spec: JobSpec, *, timeout_s: float = 120.0) -> str | None:
    """On a cluster (anything but one node that is the driver's own), write the run
    directory's shared-storage marker and have every alive node read it back, in a zero-CPU
    task pinned to it; StorageNotSharedError names the first node that does not see it.
    Returns the marker's token for the workers to check again, or None on a single-node
    Ray the driver runs on (nothing to share). See shared_storage.py."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from smolvla_ray.run_layout import run_uri
    from smolvla_ray.shared_storage import marker_problem, not_shared_message, write_marker

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return None
    options = spec.storage_options_plain()
    run_dir = run_uri(spec.checkpoint.storage, spec.name)
    token = write_marker(run_dir, options)
    look = ray.remote(num_cpus=0, max_retries=0)(marker_problem)
    pending = {
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(run_dir, token, options)
        for node in nodes
    }
    # One deadline for all nodes (they check in parallel), not one per node in turn.
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
    for node, ref in pending.items():
        problem = (
            ray.get(ref)
            if ref in ready
            else f"did not answer the storage check within {timeout_s:g} s"
        )
        if problem:
            raise StorageNotSharedError(not_shared_message(spec.checkpoint.storage, node, problem))
    return token


def ray_address(address: str | None) -> str:
    """Where `run` gets its Ray: `address` when given (`auto`, host:port, ray://...); else
    $RAY_ADDRESS, which Ray sets inside submitted Ray Jobs (and KubeRay RayJobs); else a
    private local Ray (`local`), never a cluster that merely runs on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def start_ray(address: str, *, log_to_driver: bool = True, **init: Any) -> None:
    """`ray.init(address, **init)`; for a private Ray (`local`), its processes are told its address.

    Why: Ray Train's placement-group cleaner asks Ray's state API whether the run's
    controller lives, and with no RAY_ADDRESS that API auto-detects a cluster on the
    machine. Beside another Ray (a `ray start` cluster, a second private run) it either
    fails ("Found multiple active Ray instances") or asks the stranger, which has never heard
    of our controller, and removes our placement group. So the private Ray's GCS port is
    chosen first, and RAY_ADDRESS naming it is in the environment its processes inherit.
    """
    import ray

    env: dict[str, str] = {}
    if address == "local":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        own = f"{ray.util.get_node_ip_address()}:{port}"
        env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": own}
    with environ(env), signals_ignored():  # a local Ray's processes leave Ctrl-C to us
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver, **init)


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in this process's environment (which Ray's processes started meanwhile
    inherit, and which Ray Train's controller reads), the previous values back afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Ray Train reads this in its controller, which gets it from the driver's environment.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def resource_wait(spec: JobSpec) -> Iterator[None]:
    """Bound how long the run waits for its workers' resources, at start and after every
    failure: Ray Train waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` for the worker group's
    placement group (then retries forever by default); we set it to
    `failure.resource_wait_s` for the run (with `controller_failure_limit=0`) and turn the
    timeout into an error that says what was asked and what the cluster has."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    timeout = str(max(spec.failure.resource_wait_s, 1.0))
    try:
        with environ({WORKER_GROUP_START_TIMEOUT_ENV: timeout}):
            yield
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        raise ResourceWaitTimeout(_resource_message(spec)) from err


def _resource_message(spec: JobSpec) -> str:
    scaling = spec.scaling
    per_worker = scaling.resources_per_worker or (
        {"CPU": 1, "GPU": 1} if scaling.use_gpu else {"CPU": 1}
    )
    return resource_message(
        wait_s=spec.failure.resource_wait_s,
        whose="the workers'",
        asks=f"scaling asks {scaling.num_workers} worker(s) x {show_resources(per_worker)} "
        f"placed {scaling.placement_strategy}",
        fix="lower scaling.num_workers or scaling.resources_per_worker",
    )
