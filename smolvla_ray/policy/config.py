"""`PolicyConfig`: LeRobot's SmolVLAConfig as a pydantic model, read from and written to the
`config.json` LeRobot 0.6.1 writes (same field names, same defaults, same JSON encoding).

LeRobot parses `config.json` strictly, so `to_lerobot_json` writes exactly LeRobot's field set
and nothing of ours; settings that only smolvla-ray knows live in the job spec.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smolvla_ray.keys import ACTION, OBS_IMAGES, OBS_STATE

FeatureType = Literal["STATE", "VISUAL", "ACTION", "ENV", "LANGUAGE", "REWARD"]
NormalizationMode = Literal["IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10"]

BASE_VLM_NAME = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
TINY_VLM_NAME = "smolvla-ray/tiny-smolvlm"
# LeRobot 0.6.1's SmolVLAPolicy._get_default_peft_targets: the action expert's q/v projections
# and the state/action/time projections (a regex PEFT full-matches against module names);
# nothing upstream of the image and language tokens.
SMOLVLA_LORA_TARGETS = (
    r"(model\.vlm_with_expert\.lm_expert\..*\.(q|v)_proj|model\.(state_proj|action_in_proj"
    r"|action_out_proj|action_time_mlp_in|action_time_mlp_out))"
)
# The tiny preset names its VLM by this directory's path so that LeRobot, given the same
# config.json on this machine, builds the very same backbone and tokenizer.
TINY_VLM_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_smolvlm"


class PolicyFeature(BaseModel):
    """One input or output of the policy, as LeRobot's `PolicyFeature`."""

    model_config = ConfigDict(extra="forbid")

    type: FeatureType
    shape: tuple[int, ...]


def _default_normalization() -> dict[str, NormalizationMode]:
    return {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}


class PolicyConfig(BaseModel):
    """SmolVLA's configuration with LeRobot 0.6.1's names and defaults.

    Architecture, freezing overrides and the optimizer/scheduler presets all sit here because
    that is where LeRobot's `config.json` keeps them; a job spec's optimizer section takes
    its defaults from the presets and is the one place a run sets them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: Literal["smolvla"] = "smolvla"
    # Input / output structure.
    n_obs_steps: int = 1
    input_features: dict[str, PolicyFeature] = Field(default_factory=dict)
    output_features: dict[str, PolicyFeature] = Field(default_factory=dict)
    device: str | None = "cpu"
    use_amp: bool = False
    use_peft: bool = False  # an adapter directory (policy/adapters.py) says true
    push_to_hub: bool = True
    repo_id: str | None = None
    private: bool | None = None
    tags: list[str] | None = None
    license: str | None = None
    pretrained_path: str | None = None
    pretrained_revision: str | None = None
    chunk_size: int = Field(50, ge=1)
    n_action_steps: int = Field(50, ge=1)
    normalization_mapping: dict[str, NormalizationMode] = Field(
        default_factory=_default_normalization
    )
    # Shorter state and action vectors are zero-padded to these widths.
    max_state_dim: int = Field(32, ge=1)
    max_action_dim: int = Field(32, ge=1)
    resize_imgs_with_padding: tuple[int, int] | None = (512, 512)
    empty_cameras: int = Field(0, ge=0)
    adapt_to_pi_aloha: bool = False
    use_delta_joint_actions_aloha: bool = False
    tokenizer_max_length: int = Field(48, ge=1)
    num_steps: int = Field(10, ge=1)
    use_cache: bool = True
    # Finetuning settings (the freezing overrides).
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    # Training presets.
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-10
    optimizer_grad_clip_norm: float = 10
    scheduler_warmup_steps: int = 1_000
    scheduler_decay_steps: int = 30_000
    scheduler_decay_lr: float = 2.5e-6
    vlm_model_name: str = BASE_VLM_NAME
    load_vlm_weights: bool = False
    add_image_special_tokens: bool = False
    attention_mode: Literal["cross_attn", "self_attn"] = "cross_attn"
    prefix_length: int = -1
    pad_language_to: Literal["longest", "max_length"] = "longest"
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = Field(0.75, gt=0)
    min_period: float = Field(4e-3, gt=0)
    max_period: float = Field(4.0, gt=0)
    rtc_config: dict[str, Any] | None = None
    compile_model: bool = False
    compile_mode: str = "max-autotune"

    @field_validator("rtc_config")
    @classmethod
    def _no_rtc(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("enabled", False):
            raise ValueError("rtc_config: real-time chunking is not supported; set it to null")
        return value

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps={self.n_action_steps} exceeds chunk_size={self.chunk_size}; "
                "the chunk size bounds the actions executed per model call"
            )
        # Refused rather than ignored: each would change the model or how it is trained.
        if self.adapt_to_pi_aloha:
            raise ValueError(
                "adapt_to_pi_aloha=True (Aloha joint/gripper conversion) is not implemented"
            )
        if self.use_delta_joint_actions_aloha:
            raise ValueError("use_delta_joint_actions_aloha is not supported (nor by LeRobot)")
        if self.add_image_special_tokens:
            raise ValueError("add_image_special_tokens=True is not supported; use false")
        if self.prefix_length > 0:
            raise ValueError("prefix_length > 0 (fixed prefix padding) is not supported; use -1")
        return self

    # -- features -------------------------------------------------------------------------

    @property
    def image_features(self) -> dict[str, PolicyFeature]:
        """Camera inputs in the order the prefix embeds them."""
        return {k: f for k, f in self.input_features.items() if f.type == "VISUAL"}

    @property
    def robot_state_feature(self) -> PolicyFeature | None:
        return self.input_features.get(OBS_STATE)

    @property
    def action_feature(self) -> PolicyFeature | None:
        return self.output_features.get(ACTION)

    @property
    def state_dim(self) -> int:
        feature = self.robot_state_feature
        if feature is None:
            raise ValueError(f"input_features has no {OBS_STATE!r}; add it with its shape")
        return feature.shape[0]

    @property
    def action_dim(self) -> int:
        feature = self.action_feature
        if feature is None:
            raise ValueError(f"output_features has no {ACTION!r}; add it with its shape")
        return feature.shape[0]

    def with_features(
        self, *, state_dim: int, action_dim: int, cameras: Mapping[str, tuple[int, int, int]]
    ) -> PolicyConfig:
        """A copy with the given robot: state/action widths and camera shapes (C, H, W)."""
        inputs = {
            f"{OBS_IMAGES}.{name}": PolicyFeature(type="VISUAL", shape=tuple(shape))
            for name, shape in cameras.items()
        }
        inputs[OBS_STATE] = PolicyFeature(type="STATE", shape=(state_dim,))
        outputs = {ACTION: PolicyFeature(type="ACTION", shape=(action_dim,))}
        return self.model_copy(update={"input_features": inputs, "output_features": outputs})

    def validate_features(self) -> None:
        """Raise a clear error when the features cannot drive the model."""
        if not self.image_features:
            raise ValueError(
                "input_features has no VISUAL feature; SmolVLA needs at least one camera "
                "(e.g. 'observation.images.top' with shape [3, H, W])"
            )
        if self.state_dim > self.max_state_dim:
            raise ValueError(
                f"observation.state has {self.state_dim} dims, more than max_state_dim="
                f"{self.max_state_dim}; raise max_state_dim"
            )
        if self.action_dim > self.max_action_dim:
            raise ValueError(
                f"action has {self.action_dim} dims, more than max_action_dim="
                f"{self.max_action_dim}; raise max_action_dim"
            )

    # -- presets and LeRobot's config.json ------------------------------------------------

    @classmethod
    def preset(cls, name: Literal["tiny", "base"], **overrides: Any) -> PolicyConfig:
        """`tiny`: a few million parameters, CPU-fast, offline tokenizer shipped in the
        package. `base`: LeRobot's defaults, the SmolVLM2-500M-based 450M-parameter model."""
        if name == "base":
            values: dict[str, Any] = {}
        elif name == "tiny":
            values = {
                "vlm_model_name": str(TINY_VLM_DIR),
                "resize_imgs_with_padding": (64, 64),
                "num_vlm_layers": 4,
                "chunk_size": 10,
                "n_action_steps": 10,
                "max_state_dim": 8,
                "max_action_dim": 8,
                "num_steps": 4,
            }
        else:
            raise ValueError(f"unknown policy preset {name!r}; choose 'tiny' or 'base'")
        values.update(overrides)
        return cls(**values)

    def to_lerobot_json(self) -> str:
        """The `config.json` text LeRobot's `SmolVLAConfig` parses."""
        data = self.model_dump(mode="json")
        return json.dumps(data, indent=4)

    @classmethod
    def from_lerobot_json(cls, text: str, *, source: str = "config.json") -> PolicyConfig:
        """Parse a LeRobot SmolVLA `config.json`; unknown fields are an error naming them."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object")
        if data.get("type", "smolvla") != "smolvla":
            raise ValueError(f"{source} has type {data.get('type')!r}; expected 'smolvla'")
        return cls.model_validate(data)
