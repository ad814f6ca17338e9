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
from smolvla_ray.train.evaluation import read_tables
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


def test_async_evaluation_runs_beside_training_and_keeps_the_best(
    tmp_path: Path, demo_dataset: str
) -> None:
    """eval.mode async: Ray Train validation tasks evaluate each checkpoint while training
    goes on; each result is logged one evaluation later, naming its checkpoint, the last
    one at the end; they equal an inline evaluation of the same weights; keep_best copies
    the best checkpoint."""
    spec = spec_from_dict(
        tiny_spec_dict(
            demo_dataset, tmp_path, "async-eval", scaling={"num_workers": 1},
            train={"steps": 6, "batch_size": 4, "log_every": 1, "optimizer": {"lr": 3e-3}},
            eval={"episodes": [3], "every_steps": 2, "max_samples": 8, "mode": "async"},
            checkpoint={"storage": str(tmp_path), "every_steps": 2, "keep_last": 3,
                        "keep_best": 1},
        )
    )  # fmt: skip
    driver.run(spec)
    run = run_uri(str(tmp_path), "async-eval")
    records = read_metrics(run)
    logged = [r for r in records if "eval/checkpoint_step" in r]
    for r in logged:  # a result is logged at or after its checkpoint's step, never before
        assert r["eval/checkpoint_step"] <= r["step"]
    assert logged[-1]["eval/checkpoint_step"] == 6 and logged[-1]["step"] == 6  # waited for
    # Every checkpoint was evaluated; the sinks get the newest result at each report.
    evaluated = {t["step"]: t["summary"]["eval/action_mse"] for t in read_tables(run, {})}
    assert sorted(evaluated) == [2, 4, 6]
    for r in logged:
        assert r["eval/action_mse"] == evaluated[int(r["eval/checkpoint_step"])]
    best = min(evaluated, key=evaluated.__getitem__)
    assert [p.name for p in (Path(run) / "best").iterdir() if p.is_dir()] == [
        f"checkpoint_{best:09d}"
    ]
    # The same weights evaluated inline (in-process, same samples and noise) agree.
    inline = spec_from_dict({**spec.public_dict(), "name": "inline-eval",
                             "eval": {**spec.public_dict()["eval"], "mode": "inline"}})  # fmt: skip
    train_in_process(inline)
    same = {
        r["step"]: r["eval/action_mse"]
        for r in read_metrics(run_uri(str(tmp_path), "inline-eval"))
        if "eval/action_mse" in r
    }
    for step, value in evaluated.items():
        assert value == pytest.approx(same[step], rel=1e-5), step


def test_keep_best_survives_ray_rotating_keep_last_and_the_run_resumes(
    tmp_path: Path, demo_dataset: str
) -> None:
    """Ray Train rotates the last checkpoints (keep_last 1); the best one by the held-out
    metric stays, as a copy Ray never sees; the run resumes from Ray's newest and goes on."""
    sections = dict(
        scaling={"num_workers": 1},
        eval={"episodes": [3], "every_steps": 2, "max_samples": 8},
        checkpoint={"storage": str(tmp_path), "every_steps": 2, "keep_last": 1, "keep_best": 1},
    )
    train = {"steps": 8, "batch_size": 4, "log_every": 1, "optimizer": {"lr": 3e-3}}
    driver.run(spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "rotate", train=train,
                                             **sections)))  # fmt: skip
    run = run_uri(str(tmp_path), "rotate")
    assert [i.step for i in list_checkpoints(run)] == [8]  # Ray kept the last one only
    values = {r["step"]: r["eval/action_mse"] for r in read_metrics(run) if "eval/action_mse" in r}
    best = min(values, key=values.__getitem__)
    (copy,) = [p for p in (Path(run) / "best").iterdir() if p.is_dir()]
    assert copy.name == f"checkpoint_{best:09d}"
    with tempfile.TemporaryDirectory() as tmp:  # a complete checkpoint: it verifies
        assert (fetch_checkpoint(str(copy), Path(tmp)) / "trainable.safetensors").is_file()

    longer = {**train, "steps": 12}
    result = driver.run(spec_from_dict(tiny_spec_dict(demo_dataset, tmp_path, "rotate",
                                                      train=longer, **sections)))  # fmt: skip
    assert result.metrics["step"] == 12 and result.metrics["resumed_from_step"] == 8
    assert [i.step for i in list_checkpoints(run)] == [12]
    values = {r["step"]: r["eval/action_mse"] for r in read_metrics(run) if "eval/action_mse" in r}
    assert sorted(values) == [2, 4, 6, 8, 10, 12]
    best = min(values, key=values.__getitem__)
    assert [p.name for p in (Path(run) / "best").iterdir() if p.is_dir()] == [
        f"checkpoint_{best:09d}"
    ]
