"""The Ray Train loop on a real embedded Ray with real video data (tiny policy, CPU, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray import driver
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics, run_uri
from tests.integration.conftest import tiny_spec_dict

pytestmark = pytest.mark.usefixtures("ray_local")


def final_trainable(result) -> dict[str, torch.Tensor]:
    with result.checkpoint.as_directory() as directory:
        return load_file(str(Path(directory) / "trainable.safetensors"))


def test_two_workers_learn_in_sync(tmp_path: Path, demo_dataset: str) -> None:
    spec = spec_from_dict(
        tiny_spec_dict(
            demo_dataset,
            tmp_path,
            "learn",
            train={"steps": 40, "log_every": 5, "check_replicas_every": 1},
        )
    )
    result = driver.run(spec)
    records = read_metrics(run_uri(str(tmp_path), "learn"))
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0]["loss"], records[-1]["loss"]  # means over 5 steps each
    assert last < 0.8 * first, (first, last)
    # check_replicas_every=1: after every step the loop compared the trainable digests of
    # both workers and the frozen tensors against their start (it raises on a mismatch).
    assert {r["frozen_fingerprint"] for r in records} == {records[0]["frozen_fingerprint"]}
    trainable = final_trainable(result)
    assert len(trainable) == 4 * 9 + 1 + 10  # tiny: 4 expert layers + norm + projections


def test_comm_bytes_equal_trainable_gradient_bytes(tmp_path: Path, demo_dataset: str) -> None:
    from smolvla_ray.data.meta import load_meta
    from smolvla_ray.features import dataset_cameras
    from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy

    spec = spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "comm", train={"steps": 3}))
    driver.run(spec)
    records = read_metrics(run_uri(str(tmp_path), "comm"))
    meta = load_meta(demo_dataset)
    config = PolicyConfig.preset("tiny").with_features(
        state_dim=6,
        action_dim=6,
        cameras={
            k.removeprefix("observation.images."): v
            for k, v in dataset_cameras(meta.features).items()
        },
    )
    trainable = SmolVLAPolicy(config).trainable_parameters()
    expected = sum(p.numel() * 4 for p in trainable.values())
    assert [r["comm_bytes"] for r in records] == [expected] * 3


def test_two_workers_equal_one_worker_with_double_batch(tmp_path: Path, demo_dataset: str) -> None:
    # Adam's first steps divide by |grad| + eps, which turns float-summation-order noise in
    # near-zero gradients into visible parameter noise; eps=1e-6 keeps that below 1e-6.
    train = {"steps": 4, "optimizer": {"lr": 1e-3, "eps": 1e-6}}
    two = spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "two", train=train))
    one = spec_from_dict(
        tiny_spec_dict(
            demo_dataset,
            tmp_path,
            "one",
            train={**train, "batch_size": 8},
            scaling={"num_workers": 1},
        )
    )
    a, b = final_trainable(driver.run(two)), final_trainable(driver.run(one))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    start = spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "zero", train={"steps": 1}))
    moved = final_trainable(driver.run(start))
    assert any(not torch.equal(moved[n], a[n]) for n in a)  # training did change them
