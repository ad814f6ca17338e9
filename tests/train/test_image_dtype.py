"""Frames travel from the loader to the device as uint8 and are scaled there: the losses of a
training run are exactly those of float32 frames scaled on the host."""

from __future__ import annotations

from pathlib import Path

import torch

from smolvla_ray.build import build_policy, open_dataset
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec, spec_from_dict
from smolvla_ray.train.setup import build_loader
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

# The float32 path: augmentation on, with one transform that changes nothing (brightness x1
# is exact), so images stay float32 in [0, 1] on the host, exactly the uint8 frames / 255.
IDENTITY = {
    "enable": True, "max_num_transforms": 1, "brightness": [1.0, 1.0], "contrast": None,
    "saturation": None, "hue": None, "sharpness": None, "affine_degrees": None,
}  # fmt: skip


def spec_for(dataset: str, storage: Path, name: str, augment: dict) -> JobSpec:
    return spec_from_dict(
        tiny_spec_dict(
            dataset, storage, name, scaling={"num_workers": 1},
            data={"uri": dataset, "num_loader_workers": 0, "feature_cache": "off",
                  "augment": augment},
            train={"steps": 4, "log_every": 1, "optimizer": {"lr": 1e-3}},
        )
    )  # fmt: skip


def first_batch_images(spec: JobSpec) -> torch.Tensor:
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options={})
    policy = build_policy(settings, meta, storage_options={})
    loader = build_loader(
        settings, meta, policy, rank=0, world_size=1, cursor=None, storage_options={},
        device=torch.device("cpu"),
    )  # fmt: skip
    batch = next(iter(loader))
    return batch[next(iter(policy.config.image_features))]


def test_uint8_frames_train_exactly_as_float32_frames(tmp_path: Path, demo_dataset: str) -> None:
    uint8 = spec_for(demo_dataset, tmp_path, "uint8", {"enable": False})
    floats = spec_for(demo_dataset, tmp_path, "float32", IDENTITY)
    a, b = first_batch_images(uint8), first_batch_images(floats)
    assert a.dtype == torch.uint8 and b.dtype == torch.float32
    assert torch.equal(a.float() / 255, b)

    _, reporter_a = train_in_process(uint8)
    _, reporter_b = train_in_process(floats)
    losses_a = [r["loss"] for r in reporter_a.reports]
    losses_b = [r["loss"] for r in reporter_b.reports]
    assert len(losses_a) == 4
    assert losses_a == losses_b  # bit for bit: to_device scales uint8 as the host did
