"""The job spec: one YAML file that describes a finetune, validated before anything starts.

`JobSpec` is made of sections (policy, data, train, scaling, checkpoint, failure,
storage_options). Nothing here imports torch, ray or transformers, so `validate` is instant.
Errors name the field, the value and the fix; `SpecError` gathers them into one message.
User documentation: docs/job-spec.md.
"""

from smolvla_ray.spec.job import (
    ENV_STORAGE_OPTIONS,
    MASK,
    PUBLIC_STORAGE_KEYS,
    JobSpec,
    SpecError,
    env_storage_options,
)
from smolvla_ray.spec.loading import apply_overrides, json_schema, load_spec, spec_from_dict
from smolvla_ray.spec.sections import (
    AugmentSpec,
    CheckpointSpec,
    DataSpec,
    EmaSpec,
    EpisodeRange,
    EvalSpec,
    FailureSpec,
    ObserveSpec,
    OptimizerSpec,
    PeftSpec,
    PolicySpec,
    ScalingSpec,
    SchedulerSpec,
    TrainSpec,
)

__all__ = [
    "ENV_STORAGE_OPTIONS",
    "MASK",
    "PUBLIC_STORAGE_KEYS",
    "AugmentSpec",
    "CheckpointSpec",
    "DataSpec",
    "EmaSpec",
    "EpisodeRange",
    "EvalSpec",
    "FailureSpec",
    "JobSpec",
    "ObserveSpec",
    "OptimizerSpec",
    "PeftSpec",
    "PolicySpec",
    "ScalingSpec",
    "SchedulerSpec",
    "SpecError",
    "TrainSpec",
    "apply_overrides",
    "env_storage_options",
    "json_schema",
    "load_spec",
    "spec_from_dict",
]
