"""The trainer in-process, without Ray: a whole finetune, a killed run that resumes to the
very same weights, non-finite steps stopped or skipped, and what a checkpoint holds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.format import read_checkpoint
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.inprocess import recorded, train_in_process
from tests.integration.conftest import tiny_spec_dict

TRAIN = {"steps": 12, "log_every": 2, "optimizer": {"lr": 1e-3}}


def spec_for(dataset: str, storage: Path, name: str, **sections):
    sections.setdefault("train", TRAIN)
    sections.setdefault("checkpoint", {"storage": str(storage), "every_steps": 4})
    return spec_from_dict(
        tiny_spec_dict(dataset, storage, name, scaling={"num_workers": 1}, **sections)
    )


def trainable(storage: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    infos = {i.step: i for i in list_checkpoints(run_uri(str(storage), name))}
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(infos[step].uri, Path(tmp))
        return load_file(str(local / "trainable.safetensors"))


def test_finetune_learns_and_a_killed_run_resumes_to_the_same_weights(
    tmp_path: Path, demo_dataset: str
) -> None:
    whole = spec_for(demo_dataset, tmp_path, "whole", train={**TRAIN, "steps": 24})
    state, reporter = train_in_process(whole)
    assert state is not None and state.step == 24
    losses = [r["loss"] for r in reporter.reports]
    assert losses[-1] < 0.8 * losses[0], losses
    assert [r["step"] for r in read_metrics(run_uri(str(tmp_path), "whole"))] == list(
        range(2, 25, 2)
    )

    killed = spec_for(demo_dataset, tmp_path, "killed", train={**TRAIN, "steps": 24})
    state, _ = train_in_process(killed, stop_after=10)  # dies after step 10; newest ckpt: 8
    assert state is None
    state, reporter = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 8
    assert reporter.reports[0]["step"] == 10 and reporter.reports[0]["resumed_from_step"] == 8
    # Checkpoints record the run's optimizer values in the policy config (export writes it).
    with tempfile.TemporaryDirectory() as tmp:
        info = list_checkpoints(run_uri(str(tmp_path), "whole"))[-1]
        state_json = read_checkpoint(fetch_checkpoint(info.uri, Path(tmp))).state
    assert state_json.policy_config["optimizer_lr"] == 1e-3
    assert state_json.policy_config["scheduler_decay_steps"] == whole.train.scheduler.decay_steps
    a, b = trainable(tmp_path, "whole", 24), trainable(tmp_path, "killed", 24)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_killed_run_on_a_dataset_lerobot_wrote_resumes_to_the_same_weights(
    tmp_path: Path, lerobot_dataset: str
) -> None:
    """Shapes we did not choose: LeRobot's own writer, one camera `front`, 5-D state, 4-D
    action (zero-padded to the tiny policy's 8)."""
    train = {**TRAIN, "steps": 10, "batch_size": 4}
    whole = spec_for(lerobot_dataset, tmp_path, "whole", train=train)
    state, _ = train_in_process(whole)
    assert state is not None and state.step == 10
    killed = spec_for(lerobot_dataset, tmp_path, "killed", train=train)
    assert train_in_process(killed, stop_after=6)[0] is None  # dies after 6; newest ckpt: 4
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    a, b = trainable(tmp_path, "whole", 10), trainable(tmp_path, "killed", 10)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_non_finite_steps_stop_or_are_skipped(
    tmp_path: Path, demo_dataset: str, on_nonfinite: str
) -> None:
    # lr 1e30: the first step is finite and blows the weights up, every later loss is inf/NaN.
    train = {"steps": 4, "log_every": 1, "optimizer": {"lr": 1e30, "grad_clip_norm": 1e30},
             "scheduler": {"warmup_steps": 0, "decay_steps": 1000}}  # fmt: skip
    spec = spec_for(
        demo_dataset, tmp_path, on_nonfinite, train=train,
        checkpoint={"storage": str(tmp_path)}, failure={"on_nonfinite": on_nonfinite},
    )  # fmt: skip
    run = run_uri(str(tmp_path), on_nonfinite)
    if on_nonfinite == "stop":
        with pytest.raises(RuntimeError, match=r"non-finite loss .* at step 2; parameters were"):
            train_in_process(spec)
        assert list_checkpoints(run) == []  # nothing diverged was saved
        return
    state, _ = train_in_process(spec)
    assert state is not None and state.skipped_steps == 3  # steps 2, 3 and 4
    assert [r["skipped_steps"] for r in read_metrics(run)] == [0, 1, 2, 3]
    (info,) = list_checkpoints(run)
    assert info.valid and info.step == 4
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(info.uri, Path(tmp))
        for file in ("trainable.safetensors", "optimizer.safetensors"):
            for name, tensor in load_file(str(local / file)).items():
                assert torch.isfinite(tensor).all(), (file, name)


def test_the_trainer_imports_no_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'ray' or name.startswith('ray.'):\n"
        "        raise ImportError('the trainer imported ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import smolvla_ray.train.trainer\n"
        "import smolvla_ray.train.checkpointer\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_first_step_is_read_before_the_first_collective_after_resume(
    tmp_path: Path, demo_dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow first read (video files fetched into the node's cache) must not hold the other
    workers inside a collective (the fingerprints' all_gather, DDP's broadcast): each rank
    reads its first step's micro-batches, from the resumed cursor, before either."""
    import smolvla_ray.train.trainer as trainer
    from smolvla_ray.data.loader import ShardedLoader

    order: list[str] = []
    real_iter = ShardedLoader.__iter__

    def batches(loader):
        for batch in real_iter(loader):
            order.append(f"batch {batch['index'].tolist()}")
            yield batch

    monkeypatch.setattr(ShardedLoader, "__iter__", batches)
    monkeypatch.setattr(
        trainer,
        "check_frozen_fingerprint",
        recorded(order, "fingerprint", trainer.check_frozen_fingerprint),
    )
    monkeypatch.setattr(trainer, "wrap_ddp", recorded(order, "ddp", trainer.wrap_ddp))

    train = {**TRAIN, "steps": 6, "grad_accum_steps": 2, "batch_size": 2}
    whole = spec_for(demo_dataset, tmp_path, "whole", train=train)
    train_in_process(whole)
    uninterrupted = [o for o in order if o.startswith("batch")]
    assert len(uninterrupted) == 12  # 6 steps x 2 micro-batches, nothing read ahead in vain

    killed = spec_for(demo_dataset, tmp_path, "killed", train=train)
    assert train_in_process(killed, stop_after=4)[0] is None  # dies after its step-4 checkpoint
    order.clear()
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    assert [o.split(" ")[0] for o in order[:4]] == ["batch", "batch", "fingerprint", "ddp"]
    # From the resumed cursor: exactly the batches of steps 5 and 6 of the uninterrupted run.
    assert [o for o in order if o.startswith("batch")] == uninterrupted[8:]
