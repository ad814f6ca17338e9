"""What may change when a run resumes: one table, `RESUME_RULES`, of the spec fields that may
differ between a checkpoint's recorded spec (`state.json`'s `spec`) and the resuming spec,
and what each change does. docs/job-spec.md ("What may change on resume") is its user-facing
copy.

A change is either APPLIED (the resumed run uses the new value, and rank 0 announces it in
one line) or REFUSED (the checkpoint's state means nothing under the new value: the run does
not start, and the error names the field and the fix). A differing field the table does not
name is refused too: a setting is never silently ignored. The driver checks before Ray
starts (`check_resume_spec`); the trainer checks again on the checkpoint it restores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smolvla_ray import hub
from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.checkpoint.format import STATE
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import JobSpec
from smolvla_ray.storage import filesystem, join, with_retries


@dataclass(frozen=True)
class Rule:
    """What a change of one spec field does on resume."""

    applied: bool
    effect: str
    """Applied: what the change does. Refused: what in the checkpoint depends on the value."""


def _applied(effect: str) -> Rule:
    return Rule(True, effect)


def _refused(why: str) -> Rule:
    return Rule(False, why)


_BASE = "the checkpoint's tensors were trained on that base"
_FREEZING = "freezing decides which tensors the checkpoint (and its optimizer state) holds"
_DATA = "the data cursor indexes that data, and the run so far trained on it"
_PIPELINE = "applied by the services that read it"

# Field (a dotted path; an entry covers everything below it) -> what a change does.
RESUME_RULES: dict[str, Rule] = {
    "name": _applied("the run directory's name; the run was found under it"),
    "policy.pretrained": _refused(_BASE),
    "policy.revision": _refused(_BASE),
    "policy.preset": _refused(_BASE),
    "policy.freeze_vision_encoder": _refused(_FREEZING),
    "policy.train_expert_only": _refused(_FREEZING),
    "policy.train_state_proj": _refused(_FREEZING),
    "policy.peft": _refused(
        "the adapters (their targets, rank and scale) are the tensors the checkpoint holds"
    ),
    "policy.chunk_size": _refused("the action chunk sets the model's shapes and targets"),
    "policy.overrides": _refused("policy config fields can change the architecture or freezing"),
    "policy.n_action_steps": _applied("inference only; recorded in the exported config"),
    "policy.prefix_mode": _applied("how the frozen prefix is computed; same losses"),
    "data.uri": _refused(_DATA),
    "data.revision": _refused(_DATA),
    "data.episodes": _refused(_DATA),
    "data.cameras": _refused("the cameras are the policy's image inputs"),
    "data.rename_map": _refused("the rename map decides which camera feeds which input"),
    "data.augment": _refused("augmentation is part of what the run so far trained on"),
    "data.num_loader_workers": _applied("decode processes per worker"),
    "data.cache_dir": _applied("the node-local video and feature-shard caches"),
    "data.cache_max_bytes": _applied("the bound of each node-local cache"),
    "data.feature_cache": _applied("where the frozen vision features come from"),
    "data.feature_cache_dtype": _applied("the precision of cached vision features"),
    "train.steps": _applied(
        "the run is extended or shortened; a schedule fitted to the run's length "
        "(steps < decay_steps) is refitted and continues at the current step"
    ),
    "train.optimizer": _applied(
        "set on the restored optimizer; the schedule continues at the new peak lr"
    ),
    "train.scheduler": _applied("the schedule is rebuilt and continues at the current step"),
    "train.precision": _applied("the autocast dtype of the remaining steps"),
    "train.frozen_dtype": _applied("the dtype the frozen weights are held in"),
    "train.attention_fp32": _applied("the attention's precision in the remaining steps"),
    "train.log_every": _applied("how often metrics are reported"),
    "train.check_replicas_every": _applied("how often replicas are compared"),
    "train.batch_size": _refused("the data cursor counts batches of that size"),
    "train.grad_accum_steps": _refused("the data cursor counts micro-batches per step"),
    "train.seed": _refused(
        "noise, flow-matching time, augmentation and data order are keyed by it"
    ),
    "scaling.num_workers": _refused(
        "resuming on another number of workers is not supported: the data cursor and the RNG "
        "states are per worker"
    ),
    "scaling.use_gpu": _applied("where the remaining steps run"),
    "scaling.resources_per_worker": _applied("what each worker is granted"),
    "scaling.placement_strategy": _applied("where workers are placed"),
    "checkpoint.storage": _applied("where the run directory is; the run was found there"),
    "checkpoint.every_steps": _applied("when checkpoints are written"),
    "checkpoint.keep_last": _applied("how many checkpoints Ray Train keeps"),
    "checkpoint.upload_mode": _applied("how checkpoints are uploaded"),
    "checkpoint.from_checkpoint": _refused(
        "the run resumes from its own checkpoints, so a new from_checkpoint would be ignored"
    ),
    "checkpoint.keep_best": _applied("how many best checkpoints are kept from now on"),
    "eval": _refused(
        "held-out episodes are taken out of training: adding or removing the eval section "
        "changes the data the cursor indexes"
    ),
    "eval.split": _refused(_DATA),
    "eval.episodes": _refused(_DATA),
    "eval.every_steps": _applied("when the next evaluations run"),
    "eval.max_samples": _applied("the samples of the next evaluations (curves may jump)"),
    "eval.batch_size": _applied("the evaluation batch"),
    "eval.mode": _applied("how the next evaluations run"),
    "eval.async_resources": _applied("the resources of the next async evaluations"),
    "eval.metric": _applied("the metric that ranks evaluations; the best so far starts afresh"),
    "eval.metric_mode": _applied("the ranking direction; the best so far starts afresh"),
    "eval.patience": _applied("the evaluations without improvement that end the run"),
    "failure": _applied("how failures are handled from now on"),
    "observe": _applied("where metrics go from now on"),
    "storage_options": _applied("how storage is reached (secrets are never recorded)"),
}


def rule_for(field: str) -> Rule | None:
    """The table's rule for a dotted field (its own entry or its nearest parent's)."""
    parts = field.split(".")
    for end in range(len(parts), 0, -1):
        rule = RESUME_RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    return None


@dataclass(frozen=True)
class Change:
    """One spec field whose value differs between the checkpoint and the resuming spec."""

    field: str
    old: Any
    new: Any

    @property
    def rule(self) -> Rule | None:
        return rule_for(self.field)

    @property
    def applied(self) -> bool:
        return self.rule is not None and self.rule.applied

    def describe(self) -> str:
        rule = self.rule
        why = rule.effect if rule else "the table of what may change on resume does not name it"
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)} ({why})"


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _normalized(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded spec with this version's defaults filled in, as the current spec is
    dumped (a checkpoint of an older version may lack newer fields)."""
    try:
        return JobSpec.model_validate(dict(recorded)).public_dict()
    except ValueError:  # not a valid spec any more: compare what was recorded
        return dict(recorded)


def spec_changes(recorded: Mapping[str, Any], current: JobSpec) -> list[Change]:
    """Every leaf field whose value differs, in field order."""
    old, new = _flatten(_normalized(recorded)), _flatten(current.public_dict())
    fields = list(dict.fromkeys([*new, *old]))
    return [
        Change(f, old.get(f, _MISSING), new.get(f, _MISSING))
        for f in fields
        if old.get(f, _MISSING) != new.get(f, _MISSING)
    ]


class ResumeRefused(ValueError):
    """The resuming spec changes what cannot change on resume."""


def check_resume_changes(
    recorded: Mapping[str, Any], current: JobSpec, *, checkpoint_uri: str
) -> list[str]:
    """Raise ResumeRefused listing every refused (or unknown) change; else the lines that
    announce the applied ones (empty when nothing changed)."""
    changes = spec_changes(recorded, current)
    refused = [c for c in changes if not c.applied]
    if refused:
        listing = "\n".join(f"  {c.describe()}" for c in refused)
        raise ResumeRefused(
            f"cannot resume run {current.name!r} from {checkpoint_uri}: the spec changes "
            f"{len(refused)} setting(s) that cannot change on resume:\n{listing}\n"
            "Set them back to the checkpoint's values to resume, or start a new run (another "
            "name or checkpoint.storage; checkpoint.from_checkpoint can start it from this "
            "checkpoint). See docs/job-spec.md, 'What may change on resume'"
        )
    return [f"resume: {c.describe()}" for c in changes]


def recorded_spec(checkpoint_uri: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The spec recorded in a checkpoint's state.json (a small read, no tensors)."""
    fs, root = filesystem(checkpoint_uri, storage_options)
    raw = with_retries(lambda: fs.cat_file(join(root, STATE)), what=f"read of {checkpoint_uri}")
    return dict(json.loads(raw)["spec"])


def check_resume_spec(spec: JobSpec, storage_options: Mapping[str, Any]) -> list[str]:
    """Before Ray starts: compare `spec` (local paths resolved) with the spec recorded in
    the run's newest checkpoint whose files have their manifest's sizes (hashes are the
    trainer's). Raises ResumeRefused; returns the announcements (nothing to resume: [])."""
    run = run_uri(spec.checkpoint.storage, spec.name)
    for info in reversed(list_checkpoints(run, storage_options, hashes=False)):
        if not info.valid:
            continue
        try:
            recorded = recorded_spec(info.uri, storage_options)
        except (ValueError, KeyError, TypeError):  # altered in place: the trainer skips it
            continue
        pinned = hub.pin(spec)  # the run records hub revisions as the commits they named
        return check_resume_changes(recorded, pinned, checkpoint_uri=info.uri)
    return []
