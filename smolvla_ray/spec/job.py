"""`JobSpec`: the sections together, cross-section checks, credentials and `SpecError`.

Secrets in `storage_options` are `SecretStr`: masked in repr, str and `model_dump(mode="json")`,
dropped by `public_dict()`, revealed only by `storage_options_plain()` for fsspec.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from smolvla_ray.spec.sections import (
    SECTION_CONFIG,
    CheckpointSpec,
    DataSpec,
    EvalSpec,
    FailureSpec,
    ObserveSpec,
    PolicySpec,
    ScalingSpec,
    TrainSpec,
)
from smolvla_ray.storage import mask_secrets_in

ENV_STORAGE_OPTIONS = "SMOLVLA_STORAGE_OPTIONS"
MASK = "**********"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Strings in storage_options are secrets unless their key is one of these well-known
# non-secret fsspec/botocore options: unknown keys are masked, never leaked.
PUBLIC_STORAGE_KEYS = frozenset(
    {
        "endpoint_url", "region_name", "region", "profile", "project", "account_name",
        "anon", "use_ssl", "requester_pays", "version_aware", "default_block_size",
        "default_cache_type", "addressing_style", "signature_version",
        "s3", "config_kwargs", "client_kwargs",
    }
)  # fmt: skip


class SpecError(ValueError):
    """An invalid job spec; the message lists every problem with its field and fix."""

    @classmethod
    def from_validation_error(cls, err: ValidationError, *, source: str = "job spec") -> SpecError:
        """One readable line per problem: dotted field path, message, offending value.

        A value that fits no member of a union gets one line, not one per member."""
        problems: dict[str, tuple[list[str], str]] = {}
        for item in _prune_union_roots(err.errors(include_url=False)):
            loc = [p for p in item["loc"] if not _is_tag(p)]
            names = [str(p) for p in loc]
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = f"unknown field; {valid_keys_hint(names[:-1], names[-1])}"
            value = item.get("input")
            shown = names[:1] != ["storage_options"] and isinstance(value, str | int | float | bool)
            suffix = f" (got {value!r})" if shown and item["type"] != "extra_forbidden" else ""
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
            problems.setdefault(where.lstrip("."), ([], suffix))[0].append(message)
        lines = [f"{source} is invalid ({len(problems)} problem(s)):"]
        for where, (messages, suffix) in problems.items():
            # Cross-section errors (no location) name their fields themselves.
            label = f"{where}: " if where else ""
            lines.append(f"  {label}{_join_alternatives(messages)}{suffix}")
        return cls("\n".join(lines))


def _is_tag(part: object) -> bool:
    # pydantic puts union member names ('list[int]', 'str', 'function-after[...]') in locations.
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _prune_union_roots(errors: list[Any]) -> list[Any]:
    """Drop 'not a list'-style errors of union members when another member of the same union
    got further (e.g. a mapping that is a range with a typo: report the typo only)."""
    deep = set()
    for item in errors:
        loc = item["loc"]
        for i, part in enumerate(loc):
            if _is_tag(part) and len(loc) > i + 1:
                deep.add(loc[:i])

    def is_shallow_member(loc: tuple) -> bool:
        return bool(loc) and _is_tag(loc[-1]) and loc[:-1] in deep

    return [e for e in errors if not is_shallow_member(e["loc"])]


StorageValue = Union[SecretStr, str, int, float, bool, None, dict[str, Any]]  # noqa: UP007


class JobSpec(BaseModel):
    """A complete finetuning job, from YAML; see docs/job-spec.md."""

    model_config = SECTION_CONFIG
    name: str = Field(pattern=NAME_PATTERN.pattern)
    """Job name: Ray Train run name and storage folder (lowercase, digits, . _ -)."""
    policy: PolicySpec
    data: DataSpec
    train: TrainSpec
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec
    failure: FailureSpec = Field(default_factory=FailureSpec)
    observe: ObserveSpec = Field(default_factory=ObserveSpec)
    eval: EvalSpec | None = None
    """Held-out evaluation; None = no episode is held out and nothing is evaluated."""
    storage_options: dict[str, StorageValue] = Field(default_factory=dict)
    """fsspec options for every URI in the spec (merged over $SMOLVLA_STORAGE_OPTIONS)."""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        if isinstance(value, str) and not NAME_PATTERN.match(value):
            slug = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("-._")[:63] or "my-job"
            raise ValueError(
                "must be 1-63 of a-z 0-9 . _ - starting with a letter or digit "
                f"(it names the Ray run and its storage folder); e.g. {slug!r}"
            )
        return value

    @field_validator("storage_options")
    @classmethod
    def _secrets(cls, value: dict[str, StorageValue]) -> dict[str, StorageValue]:
        return _mark_secrets(value, "storage_options")

    @model_validator(mode="after")
    def _cross_check(self) -> JobSpec:
        train, scaling = self.train, self.scaling
        every = self.checkpoint.every_steps
        if every is not None and every > train.steps:
            raise ValueError(
                f"checkpoint.every_steps={every} exceeds train.steps={train.steps}; lower it "
                "or set it to null (checkpoint only at the end)"
            )
        if train.ema.enable and train.ema.start_step >= train.steps:
            raise ValueError(
                f"train.ema.start_step={train.ema.start_step} is not below train.steps="
                f"{train.steps}: the EMA would only copy the weights; lower start_step or set "
                "train.ema.enable: false"
            )
        if train.precision == "bf16" and not scaling.use_gpu:
            raise ValueError(
                "train.precision='bf16' needs scaling.use_gpu=true (got false); "
                "use precision auto or fp32 on CPU"
            )
        if train.frozen_dtype == "bf16" and self.resolved_precision() != "bf16":
            raise ValueError(
                "train.frozen_dtype='bf16' needs bf16 autocast, but training runs in fp32 "
                f"(precision={train.precision!r}, use_gpu={scaling.use_gpu}); "
                "set frozen_dtype auto or fp32"
            )
        if self.data.feature_cache == "on":
            reason = self.feature_cache_blocker()
            if reason is not None:
                raise ValueError(
                    f"data.feature_cache='on' but {reason}, so cached vision features would "
                    "not equal what training sees; set data.feature_cache to auto or off"
                )
        if self.data.rename_map and self.policy.pretrained is None:
            raise ValueError(
                "data.rename_map renames dataset cameras to a pretrained policy's, but "
                f"policy.preset={self.policy.preset!r} takes the dataset's cameras as they "
                "are named; remove data.rename_map (or pick cameras with data.cameras)"
            )
        self._check_mixture()
        self._check_eval()
        gpus = (scaling.resources_per_worker or {}).get("GPU")
        if gpus is not None and (gpus > 0) != scaling.use_gpu:
            raise ValueError(
                f"scaling.resources_per_worker.GPU={gpus} contradicts scaling.use_gpu="
                f"{scaling.use_gpu}; make them agree (GPU > 0 exactly when use_gpu)"
            )
        if scaling.use_gpu and gpus is not None and gpus != 1:
            # One process per GPU: a fraction puts two NCCL ranks on one GPU (NCCL refuses);
            # more than one gives a worker GPUs that only its first device would use.
            raise ValueError(
                f"scaling.resources_per_worker.GPU={gpus}: each worker drives exactly one GPU "
                "(a fraction shares one GPU between NCCL ranks, more leaves GPUs idle); set "
                "it to 1, or leave it out, and use scaling.num_workers for more GPUs"
            )
        return self

    def _check_mixture(self) -> None:
        """What a mixture of datasets (`data.datasets`) does not do yet is refused, never
        ignored: held-out episodes listed by hand and asynchronous evaluation."""
        if not self.data.is_mixture or self.eval is None:
            return
        if self.eval.episodes is not None:
            raise ValueError(
                f"eval.episodes={self.eval.episodes!r} lists one dataset's episodes, but "
                "data.datasets is a mixture, whose held-out episodes are each dataset's per-task "
                "split by eval.split; remove eval.episodes (or select a dataset's episodes "
                "with its data.datasets episodes)"
            )
        if self.eval.mode == "async":
            raise ValueError(
                "eval.mode='async' is not implemented for a mixture (data.datasets): the "
                "validation task evaluates one dataset; use eval.mode: inline"
            )

    def _check_eval(self) -> None:
        """Best-checkpoint retention and patience need evaluations, and retention needs
        every checkpoint evaluated (async evaluations run on checkpoints)."""
        ev, every = self.eval, self.checkpoint.every_steps
        if ev is None:
            if self.checkpoint.keep_best:
                raise ValueError(
                    "checkpoint.keep_best ranks checkpoints by an evaluation metric, but there "
                    "is no eval section; add one (e.g. eval: {split: 0.1}) or set keep_best: 0"
                )
            return
        inline_best = ev.mode == "inline" and self.checkpoint.keep_best
        if inline_best and every is not None and every % ev.every_steps:
            raise ValueError(
                f"checkpoint.keep_best needs every checkpoint evaluated, but "
                f"checkpoint.every_steps={every} is not a multiple of "
                f"eval.every_steps={ev.every_steps}"
            )
        if ev.mode == "async" and every is not None and ev.every_steps % every:
            raise ValueError(
                f"eval.mode=async evaluates checkpoints, but eval.every_steps="
                f"{ev.every_steps} is not a multiple of checkpoint.every_steps={every}"
            )
        if ev.mode == "async" and every is None and ev.every_steps < self.train.steps:
            raise ValueError(
                "eval.mode=async evaluates checkpoints, and checkpoint.every_steps is null "
                "(a checkpoint only at the end); set checkpoint.every_steps to a divisor of "
                "eval.every_steps"
            )

    def eval_batch_size(self) -> int:
        """Samples per worker per evaluation batch."""
        if self.eval is None or self.eval.batch_size is None:
            return self.train.batch_size
        return self.eval.batch_size

    def feature_cache_blocker(self) -> str | None:
        """Why vision features are not constant per frame (None when they are, as far as
        the spec tells; a pretrained checkpoint's own overrides are checked on the workers)."""
        if self.data.augment.enable:
            return "data.augment.enable is true (random augmentation changes every image)"
        policy = self.policy
        if policy.freeze_vision_encoder is False and policy.train_expert_only is False:
            return "the vision encoder trains (freeze_vision_encoder and train_expert_only false)"
        return None

    def resolved_precision(self) -> Literal["fp32", "bf16"]:
        """The autocast dtype the run uses: 'auto' becomes bf16 on GPU, fp32 on CPU."""
        if self.train.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.train.precision

    def resolved_frozen_dtype(self) -> Literal["fp32", "bf16"]:
        """The dtype the frozen weights are held in ('auto' follows the precision)."""
        if self.train.frozen_dtype == "auto":
            return self.resolved_precision()
        return self.train.frozen_dtype

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.train.batch_size * self.train.grad_accum_steps * self.scaling.num_workers

    def policy_config_updates(self) -> dict[str, Any]:
        """PolicyConfig updates for the run: the policy section's, plus the optimizer and
        scheduler values so an exported LeRobot config.json records what was used."""
        opt, sched = self.train.optimizer, self.train.scheduler
        return {
            **self.policy.config_updates(),
            "optimizer_lr": opt.lr,
            "optimizer_betas": opt.betas,
            "optimizer_eps": opt.eps,
            "optimizer_weight_decay": opt.weight_decay,
            "optimizer_grad_clip_norm": opt.grad_clip_norm,
            "scheduler_warmup_steps": sched.warmup_steps,
            "scheduler_decay_steps": sched.decay_steps,
            "scheduler_decay_lr": sched.decay_lr,
        }

    def storage_options_plain(self, *, environ: Mapping[str, str] | None = None) -> dict:
        """Options to hand to fsspec, secrets revealed: $SMOLVLA_STORAGE_OPTIONS (read at
        call time, so workers use their own environment) with the spec's on top."""
        return _merge(env_storage_options(environ), _reveal(self.storage_options))

    def public_dict(self) -> dict[str, Any]:
        """JSON-safe dump with secrets removed (not masked), for logs, params, checkpoints.
        It validates back into a JobSpec; credentials then come from the environment."""
        data = self.model_dump(mode="json")
        data["storage_options"] = _reveal(self.storage_options, drop_secrets=True)
        return mask_secrets_in(data)  # user:password@ inside any URL, e.g. endpoint_url


def _join_alternatives(messages: list[str]) -> str:
    prefix = "Input should be "
    unique = list(dict.fromkeys(messages))
    if len(unique) > 1 and all(m.startswith(prefix) for m in unique):
        return prefix + " or ".join(m.removeprefix(prefix) for m in unique)
    return "; ".join(unique)


def _mark_secrets(value: Any, where: str, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mark_secrets(v, f"{where}.{k}", k) for k, v in value.items()}
    plain = value.get_secret_value() if isinstance(value, SecretStr) else value
    if plain == MASK:
        raise ValueError(
            f"{where} holds the mask {MASK!r} from a dump, not a credential; give the real "
            f"value or set it in ${ENV_STORAGE_OPTIONS}"
        )
    if isinstance(plain, str):
        return plain if key in PUBLIC_STORAGE_KEYS else SecretStr(plain)
    return value


def _reveal(value: Any, *, drop_secrets: bool = False) -> Any:
    if isinstance(value, dict):
        out = {k: _reveal(v, drop_secrets=drop_secrets) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, SecretStr):
        return _DROP if drop_secrets else value.get_secret_value()
    return value


_DROP = object()


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def env_storage_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON object in $SMOLVLA_STORAGE_OPTIONS ({} when unset); its text is never echoed."""
    text = (os.environ if environ is None else environ).get(ENV_STORAGE_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(
            f"${ENV_STORAGE_OPTIONS} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f'{err.msg}); set it to an object like \'{{"key": "...", "secret": "..."}}\''
        ) from None
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise SpecError(f"${ENV_STORAGE_OPTIONS} must hold a JSON object, not a {kind}")
    return value


def schema_child(annotation: Any) -> type[BaseModel] | Literal["dict"] | None:
    """What sits below a field: a section model, a free-form mapping, or nothing (scalar)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else ()
    for option in options or (annotation,):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
        if option is dict or get_origin(option) is dict:
            return "dict"
    return None


def valid_keys_hint(path: Sequence[str], key: str) -> str:
    """'did you mean ...? valid keys at <path>: ...' for an unknown `key` below `path`."""
    model: Any = JobSpec
    for part in path:
        fields = model.model_fields if isinstance(model, type) else {}
        model = schema_child(fields[part].annotation) if part in fields else None
    if not isinstance(model, type):
        return "remove it"
    valid = list(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=3)
    where = ".".join(path) or "the top level"
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}valid keys at {where}: {', '.join(valid)}"
