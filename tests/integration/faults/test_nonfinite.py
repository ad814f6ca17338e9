"""Numerical faults on the embedded Ray: an absurd learning rate makes the loss non-finite
after the first update; `stop` fails naming the step, `skip` counts the skipped steps and
still writes a checkpoint that holds only finite values."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics, run_uri
from tests.integration.conftest import tiny_spec_dict

pytestmark = pytest.mark.usefixtures("ray_local")
# lr 1e30: the first step is finite and blows the weights up, every later loss is inf/NaN.
TRAIN = {"steps": 4, "log_every": 1, "optimizer": {"lr": 1e30, "grad_clip_norm": 1e30}}


def spec_for(dataset: str, storage: str, name: str, on_nonfinite: str):
    train = {**TRAIN, "scheduler": {"warmup_steps": 0, "decay_steps": 1000}}
    failure = {"on_nonfinite": on_nonfinite}
    return spec_from_dict(
        tiny_spec_dict(
            dataset, storage, name, train=train, scaling={"num_workers": 1}, failure=failure
        )
    )


def test_stop_fails_naming_the_step(tmp_path: Path, demo_dataset: str) -> None:
    storage = str(tmp_path / "runs")
    with pytest.raises(Exception, match=r"non-finite loss .* at step 2; parameters were not"):
        driver.run(spec_for(demo_dataset, storage, "stop", "stop"))
    assert list_checkpoints(run_uri(storage, "stop")) == []  # nothing diverged was saved


def test_skip_counts_skipped_steps_and_checkpoints_finite_values(
    tmp_path: Path, demo_dataset: str
) -> None:
    storage = str(tmp_path / "runs")
    result = driver.run(spec_for(demo_dataset, storage, "skip", "skip"))
    assert result.metrics["step"] == 4
    assert result.metrics["skipped_steps"] == 3  # steps 2, 3 and 4
    skipped = [r["skipped_steps"] for r in read_metrics(run_uri(storage, "skip"))]
    assert skipped == [0, 1, 2, 3]
    (info,) = list_checkpoints(run_uri(storage, "skip"))
    assert info.valid and info.step == 4
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(info.uri, Path(tmp))
        for file in ("trainable.safetensors", "optimizer.safetensors"):
            for name, tensor in load_file(str(local / file)).items():
                assert torch.isfinite(tensor).all(), (file, name)
