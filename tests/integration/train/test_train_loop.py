"""The Ray adapter on a real embedded Ray with real video data (tiny policy, CPU, gloo): two
Ray Train worker processes train exactly as one worker with their combined batch, keep their
replicas in sync and all-reduce exactly the trainable gradients. Learning, resume and the
rest of the trainer's behaviour are tested in-process (tests/train, tests/integration)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def final_trainable(result) -> dict[str, torch.Tensor]:
    with result.checkpoint.as_directory() as directory:
        return load_file(str(Path(directory) / "trainable.safetensors"))


def trainable_at(storage: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    (info,) = [i for i in list_checkpoints(run_uri(str(storage), name)) if i.step == step]
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(str(fetch_checkpoint(info.uri, Path(tmp)) / "trainable.safetensors"))


def trainable_gradient_bytes(dataset: str) -> int:
    from smolvla_ray.data.meta import load_meta
    from smolvla_ray.features import dataset_cameras
    from smolvla_ray.policy import PolicyConfig, SmolVLAPolicy

    meta = load_meta(dataset)
    config = PolicyConfig.preset("tiny").with_features(
        state_dim=6,
        action_dim=6,
        cameras={
            k.removeprefix("observation.images."): v
            for k, v in dataset_cameras(meta.features).items()
        },
    )
    trainable = SmolVLAPolicy(config).trainable_parameters()
    return sum(p.numel() * 4 for p in trainable.values())


def test_two_workers_stay_in_sync_and_equal_one_worker_with_double_batch(
    tmp_path: Path, demo_dataset: str
) -> None:
    # Adam's first steps divide by |grad| + eps, which turns float-summation-order noise in
    # near-zero gradients into visible parameter noise; eps=1e-6 keeps that below 1e-6.
    train = {"steps": 4, "log_every": 1, "check_replicas_every": 1,
             "optimizer": {"lr": 1e-3, "eps": 1e-6}}  # fmt: skip
    result = driver.run(spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "two", train=train)))
    records = read_metrics(run_uri(str(tmp_path), "two"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # check_replicas_every=1: after every step the loop compared the trainable digests of
    # both workers and the frozen tensors against their start (it raises on a mismatch).
    assert {r["frozen_fingerprint"] for r in records} == {records[0]["frozen_fingerprint"]}
    # Every step all-reduced exactly the trainable gradients (fp32), nothing frozen.
    expected = trainable_gradient_bytes(demo_dataset)
    assert [r["comm_bytes"] for r in records] == [expected] * 4
    a = final_trainable(result)  # Ray's Result carries the final checkpoint
    assert len(a) == 4 * 9 + 1 + 10  # tiny: 4 expert layers + norm + projections

    # The same job as one worker (this process, no Ray) with the two workers' batch.
    one = tiny_spec_dict(
        demo_dataset, tmp_path, "one", train={**train, "batch_size": 8},
        scaling={"num_workers": 1},
    )  # fmt: skip
    train_in_process(spec_from_dict(one))
    b = trainable_at(tmp_path, "one", 4)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)
    start = tiny_spec_dict(
        demo_dataset, tmp_path, "zero", train={**train, "steps": 1}, scaling={"num_workers": 1}
    )
    train_in_process(spec_from_dict(start))
    moved = trainable_at(tmp_path, "zero", 1)
    assert any(not torch.equal(moved[n], a[n]) for n in a)  # training did change them


def test_a_full_finetune_with_the_cache_on_auto_trains_two_workers_to_the_end(
    tmp_path: Path, demo_dataset: str, capfd
) -> None:
    # train_expert_only: false makes the connector trainable, and the cache holds its
    # output: the cache must not be used (DDP would wait for the connector's gradients).
    spec = spec_from_dict(
        tiny_spec_dict(
            demo_dataset, tmp_path, "full",
            policy={"preset": "tiny", "train_expert_only": False},
            data={"uri": demo_dataset, "num_loader_workers": 0, "feature_cache": "auto"},
            train={"steps": 4, "log_every": 1},
            scaling={"num_workers": 2},
        )
    )  # fmt: skip
    result = driver.run(spec)
    assert result.metrics["step"] == 4
    said = capfd.readouterr().err
    assert "feature cache not used: the policy's connector trains" in said, said[-2000:]
    assert not (tmp_path / "feature-cache").exists()
