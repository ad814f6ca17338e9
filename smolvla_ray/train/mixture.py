"""A mixture's samples made to share one batch, and the batch transform that follows.

Each dataset of a mixture (`data.datasets`) keeps its own cameras, widths and statistics;
in the loader processes `ConformSample` turns each of its samples into the policy's shape:
cameras renamed to the policy's keys, a policy camera the dataset lacks filled with an all
-1 image (zeros before the device's scaling to [-1, 1]; with the feature cache, the features
the encoder makes of that image) and its per-sample mask off, state and action normalized
with the dataset's own statistics (its processor's `normalize`, the same arithmetic as the
batched one) and then zero-padded to the policy's widths, with the sample's real action
dims in `action_dim_mask` (the loss is masked to them). The batch transform then only
tokenizes the tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from smolvla_ray.features import FeatureResolution
from smolvla_ray.keys import (
    ACTION,
    ACTION_DIM_MASK,
    DATASET_INDEX,
    FEATURES_SUFFIX,
    IMAGE_PREFIX,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
    PADDING_MASK_SUFFIX,
)
from smolvla_ray.policy.processor import PolicyProcessor

Sample = dict[str, Any]


class ConformSample:
    """One mixture dataset's samples in the policy's shape (see the module docstring).
    Picklable: it runs in the loader processes."""

    def __init__(
        self,
        own: FeatureResolution,
        policy: FeatureResolution,
        processor: PolicyProcessor,
        *,
        image_dtype: torch.dtype,
        empty_features: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.sources = {k: v for k, v in own.sources.items() if v is not None}
        self.cameras = policy.image_features  # policy camera key -> (C, H, W)
        self.processor = processor
        self.image_dtype = image_dtype
        # With the feature cache (samples carry `<policy key>.features`): per camera, the
        # cached features of the all -1 image, for the cameras this dataset lacks.
        self.empty_features = (
            {k: v for k, v in empty_features.items() if k not in self.sources}
            if empty_features is not None
            else None
        )
        self.state_dim, self.action_dim = policy.state_dim, policy.action_dim
        self.dims = torch.arange(policy.action_dim) < own.action_dim

    def __call__(self, sample: Sample) -> Sample:
        out = {k: v for k, v in sample.items() if not k.startswith(IMAGE_PREFIX)}
        for key, shape in self.cameras.items():
            source = self.sources.get(key)
            has = source is not None
            if self.empty_features is not None:
                cached = f"{key}{FEATURES_SUFFIX}"
                out[cached] = sample[cached] if has else self.empty_features[key]
            else:
                out[key] = sample[source] if has else torch.zeros(shape, dtype=self.image_dtype)
            out[f"{key}{PADDING_MASK_SUFFIX}"] = torch.tensor(has)
        state = self.processor.normalize(OBS_STATE, sample[OBS_STATE].to(torch.float32))
        action = self.processor.normalize(ACTION, sample[ACTION].to(torch.float32))
        out[OBS_STATE] = _pad(state, self.state_dim)
        out[ACTION] = _pad(action, self.action_dim)
        out[ACTION_DIM_MASK] = self.dims.clone()
        return out


class ConformedDataset(Dataset):
    """One mixture dataset's frames as the mixture yields them (conformed, with its
    `dataset_index`), outside the mixture's weighted order: its held-out samples."""

    def __init__(self, frames: Dataset, conform: ConformSample, position: int) -> None:
        self.frames, self.conform, self.position = frames, conform, position

    def __len__(self) -> int:
        return len(self.frames)  # type: ignore[arg-type]

    def __getitem__(self, row: int) -> Sample:
        sample = self.conform(self.frames[row])
        sample[DATASET_INDEX] = torch.tensor(self.position, dtype=torch.int64)
        return sample


def _pad(value: Tensor, width: int) -> Tensor:
    return F.pad(value, (0, width - value.shape[-1])) if value.shape[-1] < width else value


class TokenizeTasks:
    """A mixture batch's transform: its samples are renamed and normalized already, so only
    the tasks are tokenized (over the whole batch, padded to its longest, as one dataset's)."""

    def __init__(self, processor: PolicyProcessor) -> None:
        self.processor = processor

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        tokens, mask = self.processor.tokenize(list(batch["task"]))
        out[OBS_LANGUAGE_TOKENS] = tokens
        out[OBS_LANGUAGE_ATTENTION_MASK] = mask
        return out
