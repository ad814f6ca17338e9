"""The policy's processor: what LeRobot's SmolVLA pre/post-processor pipelines do, saved in
their file layout so either side loads the other's.

Pre: add a batch dim to single observations, append a newline to the task, tokenize it (right
padding to the longest, at most `tokenizer_max_length`), normalize state and action
(MEAN_STD: `(x - mean) / (std + eps)`). Post: un-normalize actions (`x * std + mean`).
Images are left as they are (IDENTITY), uint8 ones too (the training loader sends uint8
frames, which the step's `to_device` scales to [0, 1] on the device); resizing happens inside
the policy, as in LeRobot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from smolvla_ray.keys import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from smolvla_ray.policy.backbone import load_tokenizer, resolve_vlm_source
from smolvla_ray.policy.config import PolicyConfig

PRE_JSON = "policy_preprocessor.json"
POST_JSON = "policy_postprocessor.json"
PRE_STATE = "policy_preprocessor_step_5_normalizer_processor.safetensors"
POST_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
EPS = 1e-8

Stats = dict[str, dict[str, Tensor]]


class PolicyProcessor:
    """Normalization statistics plus the tokenizer, for one policy config."""

    def __init__(
        self,
        config: PolicyConfig,
        stats: Mapping[str, Mapping[str, Any]],
        rename_map: Mapping[str, str] | None = None,
    ) -> None:
        """`stats` are keyed as the dataset names its features; `rename_map` (dataset key ->
        policy key, LeRobot's `rename_observations_processor`) renames raw observations
        first, and the statistics with them, as LeRobot's training script does."""
        self.config = config
        self.rename_map = dict(rename_map or {})
        self.stats: Stats = {
            self.rename_map.get(key, key): {
                name: torch.as_tensor(value, dtype=torch.float32) for name, value in entry.items()
            }
            for key, entry in stats.items()
        }
        for key, feature in self._normalized_features().items():
            entry = self.stats.get(key)
            if entry is None or "mean" not in entry or "std" not in entry:
                raise ValueError(
                    f"dataset stats lack mean/std for {key!r}, which {feature} normalization "
                    "needs; recompute the dataset's meta/stats.json"
                )

    def _normalized_features(self) -> dict[str, str]:
        """Feature key -> mode, for the features whose mode is MEAN_STD."""
        features = {**self.config.input_features, **self.config.output_features}
        modes = {}
        for key, feature in features.items():
            mode = self.config.normalization_mapping.get(feature.type, "IDENTITY")
            if mode == "MEAN_STD":
                modes[key] = mode
            elif mode != "IDENTITY":
                raise ValueError(
                    f"normalization_mapping[{feature.type!r}]={mode!r} is not supported; "
                    "SmolVLA uses MEAN_STD for state/action and IDENTITY for images"
                )
        return modes

    def takes_uint8_images(self) -> bool:
        """Whether images may arrive as uint8, to be scaled to [0, 1] after `preprocess`: only
        when it leaves them alone (IDENTITY, SmolVLA's mapping), since normalizing them here
        needs [0, 1] floats."""
        return not any(key in self.config.image_features for key in self._normalized_features())

    # -- tokenization ---------------------------------------------------------------------

    def tokenize(self, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Task strings (newline appended) -> token ids and attention mask, (B, L)."""
        texts = [t if t.endswith("\n") else f"{t}\n" for t in tasks]
        padding = "longest" if self.config.pad_language_to == "longest" else "max_length"
        encoded = load_tokenizer(self.config.vlm_model_name)(
            texts,
            max_length=self.config.tokenizer_max_length,
            truncation=True,
            padding=padding,
            padding_side="right",
            return_tensors="pt",
        )
        return encoded["input_ids"], encoded["attention_mask"].bool()

    # -- normalization --------------------------------------------------------------------

    def normalize(self, key: str, value: Tensor) -> Tensor:
        entry = self.stats[key]
        mean, std = entry["mean"].to(value), entry["std"].to(value)
        return (value - mean) / (std + EPS)

    def unnormalize(self, key: str, value: Tensor) -> Tensor:
        entry = self.stats[key]
        return value * entry["std"].to(value) + entry["mean"].to(value)

    def preprocess(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """A raw batch (or one observation) -> the batch `SmolVLAPolicy.forward` takes."""
        batch = {self.rename_map.get(key, key): value for key, value in raw.items()}
        for key, value in batch.items():
            if not isinstance(value, Tensor):
                continue
            # A single observation gains a batch dim (cached features are already batched).
            if (key in self.config.image_features and value.ndim == 3) or (
                key == "observation.state" and value.ndim == 1
            ):
                batch[key] = value.unsqueeze(0)
        if "task" in batch:
            tasks = [batch["task"]] if isinstance(batch["task"], str) else list(batch["task"])
            tokens, mask = self.tokenize(tasks)
            batch[OBS_LANGUAGE_TOKENS] = tokens
            batch[OBS_LANGUAGE_ATTENTION_MASK] = mask
        for key in self._normalized_features():
            if key in batch:
                if batch[key].dtype == torch.uint8:
                    raise ValueError(f"{key} is uint8 but normalized; send [0, 1] float images")
                batch[key] = self.normalize(key, batch[key].to(torch.float32))
        return batch

    def postprocess(self, actions: Tensor) -> Tensor:
        """Normalized actions from the policy -> robot units."""
        if ACTION in self._normalized_features():
            return self.unnormalize(ACTION, actions)
        return actions

    # -- LeRobot's processor files --------------------------------------------------------

    def flat_stats(self) -> dict[str, Tensor]:
        """The statistics as LeRobot's processor state file keys them (`<key>.<stat>`)."""
        return self._flat_stats()

    def _flat_stats(self) -> dict[str, Tensor]:
        return {
            f"{key}.{name}": value.contiguous()
            for key, entry in self.stats.items()
            for name, value in entry.items()
        }

    def save(self, directory: str | Path) -> None:
        """Write LeRobot's four processor files into `directory`."""
        directory = Path(directory)
        features = {
            key: feature.model_dump(mode="json")
            for key, feature in {
                **self.config.input_features,
                **self.config.output_features,
            }.items()
        }
        norm = {"eps": EPS, "features": features, "norm_map": self.config.normalization_mapping}
        device = {
            "registry_name": "device_processor",
            "config": {"device": "cpu", "float_dtype": None},
        }
        tokenizer = {
            "max_length": self.config.tokenizer_max_length,
            "task_key": "task",
            "padding_side": "right",
            "padding": self.config.pad_language_to,
            "truncation": True,
            "tokenizer_name": resolve_vlm_source(self.config.vlm_model_name),
        }
        pre = {
            "name": "policy_preprocessor",
            "steps": [
                {
                    "registry_name": "rename_observations_processor",
                    "config": {"rename_map": self.rename_map},
                },
                {"registry_name": "to_batch_processor", "config": {}},
                {"registry_name": "smolvla_new_line_processor", "config": {}},
                {"registry_name": "tokenizer_processor", "config": tokenizer},
                device,
                {"registry_name": "normalizer_processor", "config": norm, "state_file": PRE_STATE},
            ],
        }
        post_norm = {**norm, "features": {ACTION: features[ACTION]}} if ACTION in features else norm
        post = {
            "name": "policy_postprocessor",
            "steps": [
                {
                    "registry_name": "unnormalizer_processor",
                    "config": post_norm,
                    "state_file": POST_STATE,
                },
                device,
            ],
        }
        (directory / PRE_JSON).write_text(json.dumps(pre, indent=2))
        (directory / POST_JSON).write_text(json.dumps(post, indent=2))
        flat = self._flat_stats()
        save_file(flat, str(directory / PRE_STATE))
        save_file(flat, str(directory / POST_STATE))

    @classmethod
    def load(cls, config: PolicyConfig, directory: str | Path) -> PolicyProcessor:
        """Read the normalizer statistics LeRobot (or `save`) wrote."""
        path = Path(directory) / PRE_STATE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: a pretrained_model/ needs its processor files for the "
                "normalization statistics"
            )
        stats: Stats = {}
        for flat_key, value in load_file(str(path)).items():
            key, _, name = flat_key.rpartition(".")
            stats.setdefault(key, {})[name] = value
        processor = cls(config, stats)  # saved statistics are keyed by policy keys already
        processor.rename_map = _saved_rename_map(Path(directory) / PRE_JSON)
        return processor


def _saved_rename_map(path: Path) -> dict[str, str]:
    """The rename map of a saved preprocessor's `rename_observations_processor` step."""
    if not path.exists():
        return {}
    for step in json.loads(path.read_text()).get("steps", []):
        if step.get("registry_name") == "rename_observations_processor":
            return dict(step.get("config", {}).get("rename_map") or {})
    return {}
