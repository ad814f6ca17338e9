"""Checkpoints on local disk and a real S3 server: manifests, exact resume, skipping broken
checkpoints, what a checkpoint holds, export to a LeRobot pretrained_model/ (the trainer
in-process, tests/inprocess.py); and, through Ray Train, its retention (keep_last), the
run's Result, resuming from what Ray stored, and going on after every checkpoint of a run
was corrupted or deleted."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray import driver
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.checkpoint.export import export_checkpoint, policy_from_checkpoint
from smolvla_ray.policy import SmolVLAPolicy
from smolvla_ray.run_layout import RAY_RUN_STATE, run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict

# decay_steps <= steps: LeRobot's schedule is then the same for runs of 4 and 8 steps.
TRAIN = {"log_every": 2, "scheduler": {"warmup_steps": 1, "decay_steps": 4}}


def spec_for(dataset: str, storage: str, name: str, steps: int, **extra):
    train = {**TRAIN, "steps": steps}
    extra.setdefault("scaling", {"num_workers": 1})
    return spec_from_dict(tiny_spec_dict(dataset, storage, name, train=train, **extra))


def resumed_from(spec) -> int:
    """Train `spec` in-process to its end; the step it resumed from (0: from scratch)."""
    state, reporter = train_in_process(spec)
    assert state is not None and state.step == spec.train.steps
    assert reporter.reports[0]["resumed_from_step"] == state.resumed_from_step
    return state.resumed_from_step


def trainable_of(checkpoint_uri: str, options: dict | None = None) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(checkpoint_uri, Path(tmp), options)
        return load_file(str(local / "trainable.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_local_manifests_and_exact_resume(tmp_path: Path, demo_dataset: str) -> None:
    storage = str(tmp_path / "runs")
    checkpoint = {"storage": storage, "every_steps": 2}
    assert resumed_from(spec_for(demo_dataset, storage, "straight", 8, checkpoint=checkpoint)) == 0
    infos = list_checkpoints(run_uri(storage, "straight"))
    assert [i.step for i in infos] == [2, 4, 6, 8] and all(i.valid for i in infos)

    # The same job stopped right after its step-4 checkpoint, then run again to step 8.
    assert resumed_from(spec_for(demo_dataset, storage, "resumed", 4, checkpoint=checkpoint)) == 0
    assert resumed_from(spec_for(demo_dataset, storage, "resumed", 8, checkpoint=checkpoint)) == 4
    resumed = list_checkpoints(run_uri(storage, "resumed"))
    assert_same(trainable_of(resumed[-1].uri), trainable_of(infos[-1].uri))
    # Optimizer moments, too, equal the uninterrupted run's.
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        left = load_file(str(fetch_checkpoint(resumed[-1].uri, Path(a)) / "optimizer.safetensors"))
        right = load_file(str(fetch_checkpoint(infos[-1].uri, Path(b)) / "optimizer.safetensors"))
    assert_same(left, right)
    steps = [r["step"] for r in read_metrics(run_uri(storage, "resumed"))]
    assert steps == [2, 4, 6, 8]


def test_checkpoint_holds_no_frozen_tensor(tmp_path: Path, demo_dataset: str) -> None:
    storage = str(tmp_path / "runs")
    train_in_process(spec_for(demo_dataset, storage, "small", 2, checkpoint={"storage": storage}))
    (info,) = list_checkpoints(run_uri(storage, "small"))
    policy = policy_from_checkpoint(info.uri)
    trainable = set(policy.trainable_parameters())
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_checkpoint(info.uri, Path(tmp))
        assert set(load_file(str(local / "trainable.safetensors"))) == trainable
        moments = load_file(str(local / "optimizer.safetensors"))
        assert {k.split("/", 1)[1] for k in moments} == trainable
        assert not frozen & {k.split("/", 1)[1] for k in moments}
        manifest = json.loads((local / "manifest.json").read_text())
        assert set(manifest["files"]) == {p.name for p in local.iterdir()} - {"manifest.json"}
    # Trainable weights + two Adam moments + small metadata: nothing of the frozen backbone.
    trainable_bytes = sum(p.numel() * 4 for p in policy.trainable_parameters().values())
    assert 3 * trainable_bytes < info.num_bytes < 3 * trainable_bytes + 100_000


def test_broken_newest_checkpoint_is_skipped(tmp_path: Path, demo_dataset: str) -> None:
    storage = str(tmp_path / "runs")
    checkpoint = {"storage": storage, "every_steps": 2}
    resumed_from(spec_for(demo_dataset, storage, "broken", 4, checkpoint=checkpoint))
    infos = list_checkpoints(run_uri(storage, "broken"))
    assert [i.step for i in infos] == [2, 4]
    newest = Path(infos[-1].uri) / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    assert not list_checkpoints(run_uri(storage, "broken"))[-1].valid
    assert resumed_from(spec_for(demo_dataset, storage, "broken", 6, checkpoint=checkpoint)) == 2

    # Altered content with the same size, and a checkpoint without a manifest.
    resumed_from(spec_for(demo_dataset, storage, "altered", 4, checkpoint=checkpoint))
    infos = list_checkpoints(run_uri(storage, "altered"))
    target = Path(infos[-1].uri) / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    (Path(infos[0].uri) / "manifest.json").unlink()
    # Neither broken checkpoint was used.
    assert resumed_from(spec_for(demo_dataset, storage, "altered", 6, checkpoint=checkpoint)) == 0


def test_s3_checkpoints_resume_and_export(
    tmp_path: Path, demo_dataset: str, s3_server, s3_bucket: str
) -> None:
    storage = s3_server.url(s3_bucket, "runs")
    options = s3_server.storage_options
    checkpoint = {"storage": storage, "every_steps": 2}
    extra = {"checkpoint": checkpoint, "storage_options": options}
    resumed_from(spec_for(demo_dataset, storage, "s3run", 2, **extra))
    assert resumed_from(spec_for(demo_dataset, storage, "s3run", 4, **extra)) == 2
    infos = list_checkpoints(run_uri(storage, "s3run"), options)
    assert [i.step for i in infos] == [2, 4] and all(i.valid for i in infos)
    fs, _ = fsspec.core.url_to_fs(infos[-1].uri, **options)
    assert fs.exists(f"{infos[-1].uri}/manifest.json")

    # Export to a LeRobot pretrained_model/ and load it back: same actions as trained.
    out = tmp_path / "pretrained_model"
    trained = export_checkpoint(infos[-1].uri, str(out), options).policy
    loaded = SmolVLAPolicy.from_pretrained(str(out))
    config = trained.config
    g = torch.Generator().manual_seed(0)
    batch = {
        key: torch.rand(2, *feature.shape, generator=g)
        for key, feature in config.image_features.items()
    }
    batch["observation.state"] = torch.randn(2, config.state_dim, generator=g)
    batch["task"] = ["pick the cube", "push the cube"]
    noise = torch.randn(2, config.chunk_size, config.max_action_dim, generator=g)
    ours = trained.predict_action_chunk(trained.processor.preprocess(batch), noise)
    theirs = loaded.predict_action_chunk(loaded.processor.preprocess(batch), noise)
    assert torch.equal(ours, theirs)
    assert_same(
        {n: p.detach() for n, p in loaded.trainable_parameters().items()},
        trainable_of(infos[-1].uri, options),
    )


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ray_keeps_the_last_checkpoints_returns_the_final_one_and_resumes_from_them(
    demo_dataset: str, s3_server, s3_bucket: str
) -> None:
    """Through Ray Train, on S3 (Ray's storage filesystem over fsspec): keep_last prunes,
    Result.checkpoint is the final checkpoint, a second run of the job resumes from them."""
    storage = s3_server.url(s3_bucket, "runs")
    options = s3_server.storage_options
    checkpoint = {"storage": storage, "every_steps": 2, "keep_last": 2}
    extra = {"checkpoint": checkpoint, "storage_options": options}
    result = driver.run(spec_for(demo_dataset, storage, "kept", 6, **extra))
    infos = list_checkpoints(run_uri(storage, "kept"), options)
    assert [i.step for i in infos] == [4, 6] and all(i.valid for i in infos)  # keep_last=2
    assert result.metrics["step"] == 6
    with result.checkpoint.as_directory() as directory:
        final = load_file(str(Path(directory) / "trainable.safetensors"))
    assert_same(final, trainable_of(infos[-1].uri, options))

    result = driver.run(spec_for(demo_dataset, storage, "kept", 8, **extra))
    assert result.metrics["resumed_from_step"] == 6
    # A new listing (s3fs caches the one above).
    infos = list_checkpoints(run_uri(storage, "kept"), {**options, "use_listings_cache": False})
    assert [i.step for i in infos] == [6, 8] and all(i.valid for i in infos)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ray_runs_go_on_after_every_checkpoint_is_corrupt_or_deleted(
    tmp_path: Path, demo_dataset: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ray Train remembers the run's checkpoints (RAY_RUN_STATE) and refuses to start when
    one is gone; its retention would delete new checkpoints written under old names. The
    driver moves that state aside, says so, and the run starts afresh and resumes later."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == RAY_RUN_STATE
    storage = str(tmp_path / "runs")
    run = Path(run_uri(storage, "bad"))
    extra = {"checkpoint": {"storage": storage, "every_steps": 2, "keep_last": 2}}

    def go(steps: int):
        spec = spec_for(demo_dataset, storage, "bad", steps, **extra)
        result = driver.run(spec)
        final = driver.final_checkpoint(spec, result)
        infos = list_checkpoints(str(run))
        assert final == infos[-1].uri and infos[-1].valid and infos[-1].step == steps
        return result, infos

    go(4)
    for info in list_checkpoints(str(run)):  # every checkpoint corrupt
        target = Path(info.uri) / "trainable.safetensors"
        target.write_bytes(target.read_bytes()[:-10])
    capfd.readouterr()
    result, infos = go(6)
    err = capfd.readouterr().err
    assert f"no checkpoint of {run} verifies (checkpoint_000000002: trainable.safetensors" in err
    assert "starting from step 0; Ray Train's stale run state moved to" in err
    assert result.metrics["resumed_from_step"] == 0
    assert [i.step for i in infos] == [4, 6] and all(i.valid for i in infos)
    assert len(list(run.glob(f"{RAY_RUN_STATE}.stale-*"))) == 1

    result, infos = go(8)  # Ray's new state and our checkpoints agree: a plain resume
    assert result.metrics["resumed_from_step"] == 6
    assert [i.step for i in infos] == [6, 8]

    for info in infos:  # deleted by hand
        shutil.rmtree(info.uri)
    capfd.readouterr()
    result, infos = go(10)
    assert (
        "(checkpoint_000000006: missing, checkpoint_000000008: missing)" in capfd.readouterr().err
    )
    assert result.metrics["resumed_from_step"] == 0
    assert [i.step for i in infos] == [8, 10]
