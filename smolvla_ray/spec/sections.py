"""The sections of a job spec: policy, data, train (optimizer, scheduler), scaling,
checkpoint, failure and observe. Each is a pydantic model with `extra="forbid"`; every setting has
exactly one home. Cross-section checks live on `JobSpec` (job.py).
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from smolvla_ray.policy.config import SMOLVLA_LORA_TARGETS, PolicyConfig
from smolvla_ray.spec.common import SECTION_CONFIG
from smolvla_ray.spec.common import check_uri as _check_uri
from smolvla_ray.spec.data import (  # noqa: F401  (re-exported: the data sections' old home)
    DATASET_NAME_PATTERN,
    AugmentSpec,
    DataSpec,
    EpisodeRange,
    MixtureDatasetSpec,
    default_dataset_name,
)

_OWN_FIELDS = (
    "freeze_vision_encoder", "train_expert_only", "train_state_proj", "chunk_size", "n_action_steps"
)  # fmt: skip
# PolicyConfig fields that a job sets elsewhere, and where.
_OWN_HOME = {
    "freeze_vision_encoder": "policy.freeze_vision_encoder",
    "train_expert_only": "policy.train_expert_only",
    "train_state_proj": "policy.train_state_proj",
    "chunk_size": "policy.chunk_size",
    "n_action_steps": "policy.n_action_steps",
    "pretrained_path": "policy.pretrained",
    "input_features": "data.cameras (features come from the dataset)",
    "output_features": "the dataset (features come from the dataset)",
    "device": "scaling.use_gpu",
    "use_amp": "train.precision",
    "type": "nothing (it is always 'smolvla')",
}

# PolicyConfig fields whose value would change the model or training but that smolvla-ray
# does not implement: refused, never silently ignored. (value, why and what to do)
_NOT_IMPLEMENTED: dict[str, tuple[Any, str]] = {
    "adapt_to_pi_aloha": (True, "the Aloha joint/gripper space conversion is not implemented; "
                          "convert the dataset's state and action instead"),
    "compile_model": (True, "torch.compile of the policy is not implemented; remove it"),
    "use_peft": (True, "LoRA adapters are set by the policy.peft section (e.g. peft: "
                 "{r: 16}); remove it from overrides"),
}  # fmt: skip


class PeftSpec(BaseModel):
    """LoRA adapters as LeRobot 0.6.1 trains them (`--peft.*`): every base parameter
    frozen, only the adapters (and `full_training_modules`) trained, checkpointed and
    exported. Needs `policy.pretrained` and the peft extra (pip install 'smolvla-ray[peft]')."""

    model_config = SECTION_CONFIG
    method_type: Literal["LORA"] = "LORA"
    """The PEFT method (LeRobot's `--peft.method_type`); LoRA is the one implemented."""
    r: int = Field(16, ge=1)
    """LoRA rank (LeRobot's default, 16)."""
    lora_alpha: int = Field(8, ge=1)
    """LoRA scaling numerator (scale = lora_alpha / r); LeRobot leaves it to PEFT's 8."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training (PEFT's default, 0)."""
    target_modules: str | list[str] = SMOLVLA_LORA_TARGETS
    """Modules that get adapters: a regex full-matched against module names, or a list of
    name suffixes (PEFT's rules). Default: LeRobot's SmolVLA targets, the action expert's
    q/v projections and the state/action/time projections."""
    full_training_modules: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (PEFT's
    modules_to_save), by name suffix, e.g. [action_out_proj]."""

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"target_modules is not a valid regex: {err}") from None
            if not value.strip():
                raise ValueError("target_modules is empty; give a regex or a list of names")
        elif not value or not all(name.strip() for name in value):
            raise ValueError("target_modules needs module names, e.g. [q_proj, v_proj]")
        return value


class PolicySpec(BaseModel):
    """Which SmolVLA to finetune and how: weights, freezing overrides, other config fields."""

    model_config = SECTION_CONFIG
    pretrained: str | None = None
    """A LeRobot `pretrained_model/` directory, any fsspec URL to one, or a hub id."""
    revision: str | None = None
    """Hub branch, tag or commit of a hub id in `pretrained` (None = main); the run pins
    it to a commit, recorded in every checkpoint."""
    preset: Literal["tiny", "base"] | None = None
    """Build from a preset instead (random init): tiny (CPU-fast) or base (450M);
    overrides {load_vlm_weights: true} starts the VLM from vlm_model_name's weights."""
    freeze_vision_encoder: bool | None = None
    """Freeze the SigLIP vision encoder (None: keep the checkpoint's/preset's value)."""
    train_expert_only: bool | None = None
    """Train only the action expert and projections (None: keep the checkpoint's value)."""
    train_state_proj: bool | None = None
    """Train the state projection (None: keep the checkpoint's value)."""
    chunk_size: int | None = Field(None, ge=1)
    """Actions predicted per model call (None: keep the checkpoint's value)."""
    n_action_steps: int | None = Field(None, ge=1)
    """Actions executed per model call at inference, <= chunk_size (None: keep)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Any other PolicyConfig field by its LeRobot name, e.g. {num_steps: 5}."""
    prefix_mode: Literal["auto", "joint", "no_grad"] = "auto"
    """How training runs the image/language prefix: no_grad needs a frozen VLM; auto picks."""
    peft: PeftSpec | None = None
    """LoRA adapters instead of the freezing overrides (None: no adapters)."""

    @field_validator("pretrained")
    @classmethod
    def _pretrained_uri(cls, value: str | None) -> str | None:
        return _check_uri(value)

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        fields = PolicyConfig.model_fields
        checked = {}
        for key, item in value.items():
            if key.startswith(("optimizer_", "scheduler_")):
                section = "optimizer" if key.startswith("optimizer_") else "scheduler"
                home = f"train.{section}.{key.split('_', 1)[1]}"
                raise ValueError(f"{key!r} is not a policy override; set {home} instead")
            if key in _OWN_HOME:
                raise ValueError(f"{key!r} is not a policy override; set {_OWN_HOME[key]}")
            if key in _NOT_IMPLEMENTED and item == _NOT_IMPLEMENTED[key][0]:
                raise ValueError(f"{key}={item!r} is not supported: {_NOT_IMPLEMENTED[key][1]}")
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{key!r} is not a PolicyConfig field{hint}")
            try:
                adapter = TypeAdapter(Annotated[fields[key].annotation, fields[key]])
                checked[key] = adapter.validate_python(item)
            except ValidationError as err:
                first = err.errors(include_url=False)[0]
                at = f" (at {'.'.join(map(str, first['loc']))})" if first["loc"] else ""
                raise ValueError(f"{key}={item!r}: {first['msg']}{at}") from None
        return checked

    @model_validator(mode="after")
    def _check(self) -> PolicySpec:
        if (self.pretrained is None) == (self.preset is None):
            raise ValueError(
                "give exactly one of pretrained (e.g. lerobot/smolvla_base) or "
                f"preset (tiny or base); got pretrained={self.pretrained!r}, "
                f"preset={self.preset!r}"
            )
        updates = self.config_updates()
        if self.preset is not None:
            # A preset is known here, so the whole PolicyConfig can be checked now.
            try:
                PolicyConfig.preset(self.preset, **updates)
            except ValidationError as err:
                reason = "; ".join(e["msg"] for e in err.errors(include_url=False))
                raise ValueError(f"with preset {self.preset!r}: {reason}") from None
        elif self.chunk_size is not None and (self.n_action_steps or 0) > self.chunk_size:
            raise ValueError(
                f"n_action_steps={self.n_action_steps} exceeds chunk_size="
                f"{self.chunk_size}; lower n_action_steps or raise chunk_size"
            )
        if self.pretrained is not None and self.overrides.get("load_vlm_weights"):
            raise ValueError(
                "overrides.load_vlm_weights=true does nothing with pretrained: the checkpoint "
                "holds the VLM weights; remove it, or use preset: base to start from the VLM"
            )
        if self.peft is not None:
            self._check_peft()
        if self.prefix_mode == "no_grad" and self.train_expert_only is False:
            raise ValueError(
                "prefix_mode='no_grad' needs a frozen VLM but train_expert_only=False; "
                "use prefix_mode 'auto' or 'joint', or set train_expert_only: true"
            )
        return self

    def _check_peft(self) -> None:
        """As LeRobot: adapters need a pretrained policy, and they freeze the whole base, so
        a freezing override would be ignored: refused instead."""
        if self.pretrained is None:
            raise ValueError(
                f"peft trains adapters on a pretrained policy, but policy.preset="
                f"{self.preset!r} starts from random weights (LeRobot refuses this too); set "
                "policy.pretrained (e.g. lerobot/smolvla_base), or remove policy.peft"
            )
        given = [name for name in _OWN_FIELDS[:3] if getattr(self, name) is not None]
        if given:
            raise ValueError(
                f"peft freezes every base parameter and trains only the adapters, so "
                f"{', '.join(f'policy.{n}' for n in given)} would be ignored; remove "
                f"{'it' if len(given) == 1 else 'them'} (or remove policy.peft to finetune "
                "with the freezing overrides)"
            )

    def config_updates(self) -> dict[str, Any]:
        """The PolicyConfig field updates this section implies (only the ones it sets)."""
        own = {name: getattr(self, name) for name in _OWN_FIELDS if getattr(self, name) is not None}
        return {**self.overrides, **own}


class OptimizerSpec(BaseModel):
    """AdamW with LeRobot's SmolVLA presets; the one place a run sets the learning rate."""

    model_config = SECTION_CONFIG
    type: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-10, ge=0)
    grad_clip_norm: float = Field(10.0, gt=0)
    """Clip the global gradient norm of the trainable parameters to this."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas {list(value)} must each be in [0, 1), e.g. [0.9, 0.95]")
        return value


class SchedulerSpec(BaseModel):
    """Learning-rate schedule with LeRobot's SmolVLA presets.

    Like LeRobot, when the run is shorter than `decay_steps`, warmup and decay are rescaled
    proportionally to fit it (`smolvla_ray.train.optim.resolve_schedule`).
    """

    model_config = SECTION_CONFIG
    type: Literal["cosine_decay_with_warmup", "constant"] = "cosine_decay_with_warmup"
    """cosine_decay_with_warmup (linear warmup, cosine to decay_lr) or constant (lr)."""
    warmup_steps: int = Field(1000, ge=0)
    decay_steps: int = Field(30000, ge=1)
    decay_lr: float = Field(2.5e-6, ge=0)
    """Learning rate at the end of the cosine decay."""

    @model_validator(mode="after")
    def _check(self) -> SchedulerSpec:
        # Only values that differ from the defaults are a mistake: a spec dumped in full
        # (public_dict, re-validated on the workers) sets every field to its default.
        unused = sorted(
            name
            for name in self.model_fields_set - {"type"}
            if getattr(self, name) != type(self).model_fields[name].default
        )
        if self.type == "constant" and unused:
            raise ValueError(
                f"{', '.join(unused)} has no effect with type 'constant'; "
                "remove it or use type cosine_decay_with_warmup"
            )
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds decay_steps="
                f"{self.decay_steps}; warmup is part of the decay span, so lower it"
            )
        return self


class EmaSpec(BaseModel):
    """An exponential moving average of the trainable weights (off by default), kept in
    float32 beside training, saved in every checkpoint, and used by evaluation and export
    when on (`smolvla_ray/train/ema.py`)."""

    model_config = SECTION_CONFIG
    enable: bool = False
    decay: float = 0.999
    """Each update: ema = decay x ema + (1 - decay) x weights; in (0, 1). The EMA averages
    over about 1 / (1 - decay) updates."""
    start_step: int = Field(0, ge=0)
    """Up to this step the EMA is a copy of the weights; it averages from the next."""
    update_every: int = Field(1, ge=1)
    """Update the EMA after every this many steps (counted from step 0)."""

    @field_validator("decay")
    @classmethod
    def _decay(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"decay {value} must be in (0, 1), e.g. 0.999 (about the last 1,000 updates) "
                "or 0.99; to turn the EMA off set train.ema.enable: false"
            )
        return value


class TrainSpec(BaseModel):
    """The optimization: steps, batch, optimizer, schedule, precision, seed, logging."""

    model_config = SECTION_CONFIG
    steps: int = Field(ge=1)
    """Optimizer steps in the whole run."""
    batch_size: int = Field(ge=1)
    """Samples per worker per micro-step; global batch = this x grad_accum x workers."""
    grad_accum_steps: int = Field(1, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU; bf16 needs scaling.use_gpu."""
    seed: int = Field(1000, ge=0)
    log_every: int = Field(10, ge=1)
    """Report metrics every this many steps."""
    frozen_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype of the frozen weights; auto = bf16 when training in bf16, else fp32."""
    attention_fp32: bool = False
    """Under bf16 autocast, run the attention's matmuls and softmax in float32 (LeRobot runs
    them in bf16; measured difference of the attention output: 3.6e-3 relative)."""
    check_replicas_every: int = Field(0, ge=0)
    """Every this many steps, compare the trainable weights across workers and the frozen
    weights against their start, failing on any difference (0 = never)."""
    ema: EmaSpec = Field(default_factory=EmaSpec)
    """An exponential moving average of the trainable weights (off by default)."""


class EvalSpec(BaseModel):
    """Held-out evaluation during training (docs/evaluation.md): which episodes are held out,
    how often they are evaluated, on how many samples, and what ranks evaluations."""

    model_config = SECTION_CONFIG
    split: float = Field(0.1, gt=0, lt=1)
    """Fraction held out, by LeRobot's `dataset.eval_split` rule: the last ceil(n x split)
    episodes of each task (episodes grouped by their task list), in episode order."""
    episodes: list[int] | EpisodeRange | None = None
    """The held-out episodes themselves (indices or a range); overrides `split`."""
    every_steps: int = Field(500, ge=1)
    """Evaluate every this many steps, and at the last step."""
    max_samples: int | None = Field(256, ge=1)
    """Held-out samples per evaluation: evenly spaced over the held-out frames, the same
    samples every time; None = every held-out frame."""
    batch_size: int | None = Field(None, ge=1)
    """Samples per worker per evaluation batch; None = train.batch_size."""
    mode: Literal["inline", "async"] = "inline"
    """inline: sharded across the training workers between steps; async: a Ray Train
    validation task on its own resources at checkpoint steps (its result arrives one
    evaluation later)."""
    async_resources: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"CPU": 1}
    )
    """Ray resources of the async validation task, e.g. {CPU: 4, GPU: 1}."""
    metric: str = "eval/action_mse"
    """The metric that ranks evaluations, for checkpoint.keep_best and patience."""
    metric_mode: Literal["min", "max"] = "min"
    patience: int | None = Field(None, ge=1)
    """Stop the run after this many evaluations in a row without improving `metric`
    (None = never); the run ends with a checkpoint and says why."""

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in EVAL_METRICS:
            raise ValueError(f"{value!r} is not an evaluation metric; one of {EVAL_METRICS}")
        return value


# The summaries an evaluation reports (docs/evaluation.md).
EVAL_METRICS = (
    "eval/loss",
    "eval/action_mse",
    "eval/action_l1",
    "eval/action_mse_robot",
    "eval/action_l1_robot",
)


class ScalingSpec(BaseModel):
    """How many Ray Train workers and what each one gets."""

    model_config = SECTION_CONFIG
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    """One GPU per worker (unless resources_per_worker says otherwise)."""
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """Ray resources per worker, e.g. {CPU: 4, GPU: 1}; None = Ray's default."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class CheckpointSpec(BaseModel):
    """Where the run's checkpoints go and how many stay."""

    model_config = SECTION_CONFIG
    storage: str
    """Storage URI for the run: path, file://, s3://, gs://, az://, or a shared filesystem."""
    every_steps: int | None = Field(None, ge=1)
    """Checkpoint every this many steps; None = only at the end."""
    keep_last: int = Field(3, ge=1)
    keep_best: int = Field(0, ge=0)
    """Besides the last `keep_last`, keep this many best checkpoints by `eval.metric` /
    `eval.metric_mode` (copies under `<run>/best/`; needs `eval`)."""
    upload_mode: Literal["async", "sync"] = "async"
    """async: upload in the background while training continues."""
    from_checkpoint: str | None = None
    """Start from this smolvla-ray checkpoint URI (trainable state, optimizer, step)."""

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        return _check_uri(value, writable=True) or value

    @field_validator("from_checkpoint")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        return _check_uri(value)


class FailureSpec(BaseModel):
    """What to do when things go wrong."""

    model_config = SECTION_CONFIG
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the latest checkpoint; -1 = unlimited (as Ray)."""
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """A NaN/inf loss or gradient: skip that step, or stop the run."""
    resource_wait_s: float = Field(600, ge=0)
    """How long to wait for the cluster to grant the workers' resources."""
    collective_timeout_s: int = Field(1800, ge=1)
    """How long a collective (all-reduce, broadcast, barrier) waits for every worker: a hung
    worker then fails the group, which Ray Train restarts under max_failures, instead of
    stalling it. Ray's and PyTorch's default, 1800 s."""


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@")
_WANDB_BAD_CHARS = "/\\#?%:"  # W&B refuses these in project and entity names


class ObserveSpec(BaseModel):
    """Where rank 0 sends metrics besides `metrics.jsonl` (docs/observability.md)."""

    model_config = SECTION_CONFIG
    tensorboard: bool = True
    """Write TensorBoard event files to `<storage>/<name>/tensorboard/`."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (http(s)://..., databricks, file:/path); None = no MLflow."""
    mlflow_experiment: str = Field("smolvla-ray", min_length=1)
    """MLflow experiment the run is logged in (created when missing)."""

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _tracking_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; give a URI like http://mlflow:5000 or null")
        if value is not None and _USERINFO.match(value):
            # The URI is logged (MLflow params, checkpoints): credentials must not be in it.
            raise ValueError(
                "holds a user:password; remove it and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return value

    wandb_project: str | None = None
    """Weights & Biases project the run is logged in; None = no W&B. Needs the wandb package
    on the workers: pip install 'smolvla-ray[wandb]'."""
    wandb_entity: str | None = None
    """W&B user or team that owns the project; None = the API key's default entity."""
    wandb_run_name: str | None = None
    """Display name of the W&B run; None = the job name."""
    wandb_tags: list[str] = Field(default_factory=list)
    """Tags of the W&B run."""
    wandb_mode: Literal["online", "offline"] = "online"
    """online: stream to the W&B server; offline: write run files for `wandb sync`. W&B's own
    WANDB_MODE variable, where set on the workers, wins."""

    @field_validator("wandb_project", "wandb_entity")
    @classmethod
    def _wandb_name(cls, value: str | None) -> str | None:
        # Checked here so that a bad name fails validation, not wandb.init on rank 0.
        if value is None:
            return None
        if not value.strip() or len(value) > 128:
            raise ValueError("must be 1 to 128 characters, or null")
        bad = sorted({c for c in value if c in _WANDB_BAD_CHARS})
        if bad:
            raise ValueError(f"must not contain {' '.join(bad)} (W&B refuses them)")
        return value

    @field_validator("wandb_run_name")
    @classmethod
    def _wandb_run_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; give a name or null for the job name")
        return value

    @field_validator("wandb_tags")
    @classmethod
    def _wandb_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not 1 <= len(tag) <= 64:
                raise ValueError(f"tag {tag[:70]!r} must be 1 to 64 characters (W&B's limit)")
        return value
