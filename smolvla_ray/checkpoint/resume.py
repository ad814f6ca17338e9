"""What may change when a run resumes: one table, `RESUME_RULES`, of the spec fields that may
differ between a checkpoint's recorded spec (`state.json`'s `spec`) and the resuming spec,
and what each change does. docs/job-spec.md ("What may change on resume") is its user-facing
copy.

A change is either APPLIED (the resumed run uses the new value, and rank 0 announces it in
one line) or REFUSED (the checkpoint's state means nothing under the new value, or would be
lost: the run does not start, and the error names the field and the fix). A switch may be
applied one way and refused the other (`train.ema.enable`). A differing field the table does not
name is refused too: a setting is never silently ignored. The driver checks before Ray
starts (`prepare.check_resume_spec`); the trainer checks again on the checkpoint it
restores. Both compare public spec dicts (`RunSettings.spec_json`, `JobSpec.public_dict()`).

Two fields are judged together: a run keeps its global batch for life, so it may resume on
another `scaling.num_workers` (a preempted job back with fewer or more GPUs) with each
worker's `train.batch_size` derived from the recorded global batch (`resumed_spec`), and is
refused, naming the worker counts that work, when that batch does not divide across the new
count. The data cursor counts global samples and noise, time and augmentation are keyed by
sample, so the resumed run sees the samples and draws the uninterrupted run would have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smolvla_ray.checkpoint.format import STATE
from smolvla_ray.settings import normalized_spec_json
from smolvla_ray.storage import filesystem, join, with_retries


@dataclass(frozen=True)
class Rule:
    """What a change of one spec field does on resume."""

    applied: bool
    effect: str
    """Applied: what the change does. Refused: what in the checkpoint depends on the value."""
    turned_off: Rule | None = None
    """For a switch: the rule of a change from true to false, where it differs."""

    def for_change(self, old: Any, new: Any) -> Rule:
        """The rule of a change from `old` to `new`."""
        if self.turned_off is not None and old is True and new is False:
            return self.turned_off
        return self


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
    "data.datasets": _refused(
        "the mixture (its datasets, selections, camera maps and weights) sets every epoch's "
        "order, which the data cursor indexes, and the run so far trained on it"
    ),
    "data.epoch_samples": _refused("the length of a mixture epoch sets its order"),
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
    "train.ema.enable": Rule(
        True,
        "the EMA starts from the weights of the resumed step",
        turned_off=_refused(
            "the checkpoint holds the run's EMA of its weights, which would be lost; to drop "
            "it, start a new run from this checkpoint (checkpoint.from_checkpoint)"
        ),
    ),
    "train.ema.decay": _applied("the EMA continues with the new decay from the next update"),
    "train.ema.start_step": _applied(
        "the steps up to it copy the weights into the EMA, later ones average"
    ),
    "train.ema.update_every": _applied("the EMA is updated every this many steps from now on"),
    "train.batch_size": _refused(
        "the data cursor counts global batches of train.batch_size x scaling.num_workers "
        "samples; to resume on another scaling.num_workers, leave train.batch_size as it was "
        "and each worker's batch is derived"
    ),
    "train.grad_accum_steps": _refused("the data cursor counts micro-batches per step"),
    "train.seed": _refused(
        "noise, flow-matching time, augmentation and data order are keyed by it"
    ),
    "scaling.num_workers": _applied(
        "the global batch is kept: each worker's train.batch_size is derived from it, and the "
        "data order goes on from the same sample"
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
    override: Rule | None = None
    """What this change does where it depends on other fields (the batch and worker count)."""

    @property
    def rule(self) -> Rule | None:
        rule = self.override or rule_for(self.field)
        return rule.for_change(self.old, self.new) if rule is not None else None

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


def spec_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every leaf field whose value differs between a checkpoint's `recorded` spec (with
    this version's defaults filled in: an older version may lack newer fields) and the
    resuming run's public spec dict, in field order."""
    old, new = _flatten(normalized_spec_json(recorded)), _flatten(current)
    fields = list(dict.fromkeys([*new, *old]))
    return [
        Change(f, old.get(f, _MISSING), new.get(f, _MISSING))
        for f in fields
        if old.get(f, _MISSING) != new.get(f, _MISSING)
    ]


class ResumeRefused(ValueError):
    """The resuming spec changes what cannot change on resume."""


@dataclass(frozen=True)
class _Batch:
    """A spec's batch: samples per worker per micro-batch, workers, micro-batches per step."""

    per_worker: int
    workers: int
    accum: int

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> _Batch | None:
        try:
            train, scaling = spec["train"], spec.get("scaling") or {}
            return cls(
                int(train["batch_size"]),
                int(scaling.get("num_workers", 1)),
                int(train.get("grad_accum_steps", 1)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    @property
    def across_workers(self) -> int:
        """Samples of one micro-batch on all workers together (the loader's global batch,
        which its cursor counts)."""
        return self.per_worker * self.workers

    def describe(self) -> str:
        return (
            f"the global batch of {self.across_workers * self.accum} samples "
            f"(train.batch_size {self.per_worker} x grad_accum_steps {self.accum} x "
            f"{self.workers} worker(s))"
        )


def resumed_spec(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The public spec dict `current` as it resumes a checkpoint whose spec was `recorded`:
    on another `scaling.num_workers`, with `train.batch_size` left as recorded, each
    worker's batch is derived from the recorded global batch (`batch_size x grad_accum_steps
    x num_workers`, with grad_accum_steps unchanged). Otherwise `current` as it is, also when
    the global batch does not divide across the new count (`check_resume_changes` refuses
    that)."""
    old, new = _Batch.of(normalized_spec_json(recorded)), _Batch.of(current)
    if old is None or new is None or new.workers == old.workers:
        return dict(current)  # nothing to derive
    if new.per_worker != old.per_worker or old.across_workers % new.workers:
        return dict(current)  # a batch the user chose (checked as such), or refused
    train = {**current["train"], "batch_size": old.across_workers // new.workers}
    return {**current, "train": train}


def _batch_rules(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Rule]:
    """What changes of `train.batch_size` and `scaling.num_workers` do together: applied
    when the samples per micro-batch across all workers (so the global batch) stay, refused
    otherwise, naming the worker counts that keep it."""
    old, new = _Batch.of(normalized_spec_json(recorded)), _Batch.of(current)
    if old is None or new is None or old.accum != new.accum:
        return {}  # a grad_accum_steps change is refused by the table
    if old.across_workers == new.across_workers:
        return {
            "train.batch_size": _applied(
                f"derived: {old.describe()} is kept on {new.workers} worker(s)"
            )
        }
    if new.per_worker != old.per_worker:
        return {}  # the table refuses a batch the user changed
    valid = [n for n in range(1, old.across_workers + 1) if old.across_workers % n == 0]
    return {
        "scaling.num_workers": _refused(
            f"{old.describe()} does not divide across {new.workers} workers; resume with "
            f"scaling.num_workers {', '.join(map(str, valid))} (each worker then takes "
            f"{old.across_workers} / num_workers samples per micro-batch)"
        )
    }


def resume_changes_of(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every change from `recorded` to the public spec dict `current`, each with the rule it
    falls under, `current` taken as it would run (`resumed_spec`: a batch derived for
    another worker count)."""
    current = resumed_spec(recorded, current)
    rules = _batch_rules(recorded, current)
    return [
        Change(c.field, c.old, c.new, rules.get(c.field)) for c in spec_changes(recorded, current)
    ]


def check_resume_changes(
    recorded: Mapping[str, Any], current: Mapping[str, Any], *, checkpoint_uri: str
) -> list[str]:
    """Raise ResumeRefused listing every refused (or unknown) change from `recorded` to the
    public spec dict `current`; else the lines that announce the applied ones (empty when
    nothing changed)."""
    changes = resume_changes_of(recorded, current)
    refused = [c for c in changes if not c.applied]
    if refused:
        listing = "\n".join(f"  {c.describe()}" for c in refused)
        raise ResumeRefused(
            f"cannot resume run {current['name']!r} from {checkpoint_uri}: the spec changes "
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
