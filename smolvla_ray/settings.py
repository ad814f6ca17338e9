"""`RunSettings`: what the worker side reads of a job spec, built once from the validated
`JobSpec` by `RunSettings.from_spec`.

Why a second object: the spec (pydantic, with its validation, defaults and secrets) belongs
to the driver. The trainer and its Ray adapter, the checkpointer, the builders, the
feature-cache store and the async validation task take these plain frozen dataclasses: each
depends on the values it uses, derived ones computed once here (the run directory, the
resolved precision and frozen dtype, the evaluation batch, the episode selections, the
policy config updates), not on the spec's shape. This is the only module below the driver
that imports `smolvla_ray.spec` (tests/unit/test_layers.py). Nothing is validated or
defaulted here: every value comes from a spec that passed validation.

`spec_json` is the spec's public dict (no secrets): what checkpoints (`state.json`'s `spec`)
and metric sinks record, what a resume compares, and what travels to Ray's workers, where
`from_spec_json` validates it again (storage credentials travel apart).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import EpisodeRange, JobSpec

Precision = Literal["fp32", "bf16"]
Episodes = tuple[int, ...] | range


@dataclass(frozen=True)
class PolicySettings:
    """The base policy and how it is built (`policy`)."""

    pretrained: str | None
    revision: str | None
    preset: Literal["tiny", "base"] | None
    prefix_mode: Literal["auto", "joint", "no_grad"]
    config_updates: Mapping[str, Any]
    """PolicyConfig updates: the policy section's, with the optimizer's and scheduler's
    values (`JobSpec.policy_config_updates`)."""
    peft: Mapping[str, Any] | None
    """`policy.peft` as LeRobot's `--peft.*` options (`build.lora_settings` turns them into
    the adapters' settings); None: no adapters."""


@dataclass(frozen=True)
class AugmentSettings:
    """`data.augment` when it is on: what `data/augment.py` reads."""

    enable: bool
    max_num_transforms: int
    random_order: bool
    brightness: tuple[float, float] | None
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    hue: tuple[float, float] | None
    sharpness: tuple[float, float] | None
    affine_degrees: tuple[float, float] | None
    affine_translate: tuple[float, float]


@dataclass(frozen=True)
class DatasetSettings:
    """One dataset of a mixture (`data.datasets`)."""

    name: str
    uri: str
    revision: str | None
    episodes: Episodes | None
    cameras: tuple[str, ...] | None
    rename_map: Mapping[str, str]
    weight: float


@dataclass(frozen=True)
class DataSettings:
    """The dataset and how workers read it (`data`). For a mixture (`mixture` set) `uri`,
    `revision`, `episodes`, `cameras` and `rename_map` are its first dataset's: the one an
    export carries by default."""

    uri: str
    revision: str | None
    episodes: Episodes | None
    """The selected episodes (indices or a range); None = all."""
    cameras: tuple[str, ...] | None
    rename_map: Mapping[str, str]
    mixture: tuple[DatasetSettings, ...] | None
    """The datasets of a weighted mixture, in the spec's order; None: one dataset."""
    epoch_samples: int | None
    """Samples in one mixture epoch; None = the datasets' selected frames together."""
    num_loader_workers: int
    cache_dir: str | None
    cache_max_bytes: int
    augment: AugmentSettings | None
    """None when augmentation is off."""
    feature_cache_dtype: Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's hyperparameters (`train.optimizer`)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip_norm: float


@dataclass(frozen=True)
class SchedulerSettings:
    """The learning-rate schedule (`train.scheduler`)."""

    type: Literal["cosine_decay_with_warmup", "constant"]
    warmup_steps: int
    decay_steps: int
    decay_lr: float


@dataclass(frozen=True)
class EmaSettings:
    """The EMA of the trainable weights (`train.ema`, when enabled; train/ema.py)."""

    decay: float
    start_step: int
    update_every: int


@dataclass(frozen=True)
class TrainSettings:
    """The optimization (`train`), its precisions resolved for this run."""

    steps: int
    batch_size: int
    grad_accum_steps: int
    seed: int
    log_every: int
    check_replicas_every: int
    attention_fp32: bool
    precision: Precision
    """The autocast dtype: `train.precision` with auto resolved (bf16 on GPU)."""
    frozen_dtype: Precision
    """The frozen weights' dtype: `train.frozen_dtype` with auto resolved."""
    optimizer: OptimizerSettings
    scheduler: SchedulerSettings
    ema: EmaSettings | None
    """None: the run keeps no EMA."""


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation (`eval`)."""

    episodes: Episodes | None
    """The held-out episodes when given (indices or a range), else None: `split` decides."""
    split: float
    every_steps: int
    max_samples: int | None
    batch_size: int
    """Samples per worker per evaluation batch (`eval.batch_size`, else train.batch_size)."""
    mode: Literal["inline", "async"]
    metric: str
    metric_mode: Literal["min", "max"]
    patience: int | None


@dataclass(frozen=True)
class CheckpointSettings:
    """Where checkpoints go and when (`checkpoint`)."""

    storage: str
    every_steps: int | None
    keep_best: int
    upload_mode: Literal["async", "sync"]
    from_checkpoint: str | None


@dataclass(frozen=True)
class ObserveSettings:
    """Where rank 0 sends metrics besides `metrics.jsonl` (`observe`)."""

    tensorboard: bool
    mlflow_tracking_uri: str | None
    mlflow_experiment: str
    wandb_project: str | None
    wandb_entity: str | None
    wandb_run_name: str | None
    wandb_tags: tuple[str, ...]
    wandb_mode: Literal["online", "offline"]


@dataclass(frozen=True)
class RunSettings:
    """What the worker side of a run reads of its job spec; see the module's docstring."""

    name: str
    run_uri: str
    """The run directory, `<checkpoint.storage>/<name>`."""
    use_gpu: bool
    on_nonfinite: Literal["skip", "stop"]
    """`failure.on_nonfinite`."""
    policy: PolicySettings
    data: DataSettings
    train: TrainSettings
    eval: EvalSettings | None
    """None: no episode is held out and nothing is evaluated."""
    checkpoint: CheckpointSettings
    observe: ObserveSettings
    spec_json: Mapping[str, Any]
    """The spec's public dict (no secrets), as checkpoints and metric sinks record it."""

    @classmethod
    def from_spec(cls, spec: JobSpec) -> RunSettings:
        """The settings of `spec`, a validated spec (the driver resolves its local paths and
        pins its hub ids first)."""
        data, train, ev = spec.data, spec.train, spec.eval
        augment = data.augment
        mixture = (
            tuple(_dataset(entry) for entry in data.datasets) if data.datasets is not None else None
        )
        primary: Any = data.datasets[0] if data.datasets is not None else data
        return cls(
            name=spec.name,
            run_uri=run_uri(spec.checkpoint.storage, spec.name),
            use_gpu=spec.scaling.use_gpu,
            on_nonfinite=spec.failure.on_nonfinite,
            policy=_take(
                PolicySettings,
                spec.policy,
                config_updates=spec.policy_config_updates(),
                peft=spec.policy.peft.model_dump() if spec.policy.peft is not None else None,
            ),
            data=_take(
                DataSettings,
                primary,
                mixture=mixture,
                epoch_samples=data.epoch_samples,
                episodes=_episodes(primary.episodes),
                cameras=tuple(primary.cameras) if primary.cameras is not None else None,
                rename_map=dict(primary.rename_map),
                num_loader_workers=data.num_loader_workers,
                cache_dir=data.cache_dir,
                cache_max_bytes=int(data.cache_max_bytes),
                augment=_take(AugmentSettings, augment) if augment.enable else None,
                feature_cache_dtype=data.feature_cache_dtype,
            ),
            train=_take(
                TrainSettings,
                train,
                precision=spec.resolved_precision(),
                frozen_dtype=spec.resolved_frozen_dtype(),
                optimizer=_take(OptimizerSettings, train.optimizer),
                scheduler=_take(SchedulerSettings, train.scheduler),
                ema=_take(EmaSettings, train.ema) if train.ema.enable else None,
            ),
            eval=(
                _take(
                    EvalSettings,
                    ev,
                    episodes=_episodes(ev.episodes),
                    batch_size=spec.eval_batch_size(),
                )
                if ev is not None
                else None
            ),
            checkpoint=_take(CheckpointSettings, spec.checkpoint),
            observe=_take(ObserveSettings, spec.observe, wandb_tags=tuple(spec.observe.wandb_tags)),
            spec_json=spec.public_dict(),
        )

    @classmethod
    def from_spec_json(cls, spec_json: Mapping[str, Any]) -> RunSettings:
        """The settings of a spec's public dict, validated again: on a Ray worker, from what
        the driver sent (Ray records it, so it holds no secrets), or from a checkpoint's
        recorded spec."""
        return cls.from_spec(JobSpec.model_validate(dict(spec_json)))


def normalized_spec_json(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A spec a checkpoint recorded, dumped as this version dumps `spec_json` (the defaults
    of fields added since filled in), so the two compare field by field; as recorded when
    it no longer validates."""
    try:
        return JobSpec.model_validate(dict(recorded)).public_dict()
    except ValueError:
        return dict(recorded)


T = TypeVar("T")


def _take(cls: type[T], section: Any, **derived: Any) -> T:
    """`cls` with every field from `section`'s attribute of the same name, or `derived`."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: derived[n] if n in derived else getattr(section, n) for n in names})


def _dataset(entry: Any) -> DatasetSettings:
    return _take(
        DatasetSettings,
        entry,
        name=entry.resolved_name,
        episodes=_episodes(entry.episodes),
        cameras=tuple(entry.cameras) if entry.cameras is not None else None,
        rename_map=dict(entry.rename_map),
    )


def _episodes(selection: Sequence[int] | EpisodeRange | None) -> Episodes | None:
    if selection is None:
        return None
    if isinstance(selection, EpisodeRange):
        return range(selection.start, selection.stop)
    return tuple(selection)
